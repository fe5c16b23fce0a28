"""The upstream text-to-video families as pipelines: their classes, and their prompt encoding.

A stage trained for a family is conditioned on that family's own prompt embeddings, so `prompt=` must give the
embeddings the upstream pipeline itself computes (Wan's cleaned, zero-padded umT5 states; CogVideoX's T5 states
over every padded position; HunyuanVideo's Llama states under its prompt template, cropped; LTX-Video's and
Mochi's T5 states with their masks). `encode_upstream_prompt` runs the family's own `encode_prompt` on a text-only
instance of its pipeline class, built from the text components alone, and reads (embeddings, mask) from its
outputs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class UpstreamFamily:
    """A family's pipeline class (in `diffusers`) and how its text conditioning is built.

    Attributes:
        name: the family, as in `cascade_vsr.pipelines.adapters.FAMILIES`.
        title: the family's name for messages.
        pipeline_class: the diffusers text-to-video pipeline whose `encode_prompt` and denoising loop are used.
        text_components: the pipeline's components that `encode_prompt` needs.
        text_encoder_name: what the sequence embeddings come from, for messages.
    """

    name: str
    title: str
    pipeline_class: str
    text_components: tuple[str, ...]
    text_encoder_name: str

    def load_pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    @property
    def default_max_sequence_length(self) -> int:
        """The text length the family's pipeline encodes prompts with by default (its `__call__`'s)."""
        parameters = inspect.signature(self.load_pipeline_class().__call__).parameters
        return int(parameters["max_sequence_length"].default)


UPSTREAM_FAMILIES = {
    "wan": UpstreamFamily("wan", "Wan", "WanPipeline", ("text_encoder", "tokenizer"), "umT5 encoder"),
    "cogvideox": UpstreamFamily(
        "cogvideox", "CogVideoX", "CogVideoXPipeline", ("text_encoder", "tokenizer"), "T5 encoder"
    ),
    "hunyuan_video": UpstreamFamily(
        "hunyuan_video",
        "HunyuanVideo",
        "HunyuanVideoPipeline",
        ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
        "Llama text encoder",
    ),
    "ltx_video": UpstreamFamily("ltx_video", "LTX-Video", "LTXPipeline", ("text_encoder", "tokenizer"), "T5 encoder"),
    "mochi": UpstreamFamily("mochi", "Mochi", "MochiPipeline", ("text_encoder", "tokenizer"), "T5 encoder"),
}


def family_of_latent_space(latent_space: str | None) -> UpstreamFamily | None:
    """The upstream family of a latent-space name ("wan_z48" is Wan 2.2 TI2V's space), or None for spaces that
    belong to no text-to-video family (space_to_depth)."""
    if latent_space is None:
        return None
    return UPSTREAM_FAMILIES.get(latent_space.split("_z")[0] if latent_space.startswith("wan_z") else latent_space)


def text_width(text_encoder: Any) -> int | None:
    """The width of a text encoder's sequence embeddings, from its config (None if it does not say)."""
    config = getattr(text_encoder, "config", None)
    for key in ("hidden_size", "d_model"):
        width = getattr(config, key, None)
        if isinstance(width, int):
            return width
    return None


def check_text_dim(family: UpstreamFamily, text_encoder: Any, text_dim: int) -> None:
    """The stage's transformer must read the family's embeddings: its `text_dim` is their width."""
    width = text_width(text_encoder)
    if width is not None and width != text_dim:
        raise ValueError(
            f"{family.title}'s prompt embeddings are {width} wide (its {family.text_encoder_name}), but the stage's "
            f"transformer has text_dim={text_dim}: use a stage trained on {family.title} text embeddings, or pass "
            f"`prompt_embeds` of width {text_dim}"
        )


def text_pipeline(family: UpstreamFamily, components: dict[str, Any]) -> Any:
    """A text-only instance of the family's pipeline class (no transformer, VAE or scheduler)."""
    missing = [name for name in family.text_components if components.get(name) is None]
    if missing:
        raise ValueError(
            f"encoding a prompt the way {family.title} does needs the pipeline's {', '.join(missing)} "
            f"({family.pipeline_class}.encode_prompt uses {', '.join(family.text_components)})"
        )
    cls = family.load_pipeline_class()
    parameters = inspect.signature(cls.__init__).parameters
    kwargs = {name: None for name in parameters if name not in ("self", "args", "kwargs")}
    for name in family.text_components:
        kwargs[name] = components[name]
    for name, parameter in parameters.items():  # non-module settings keep their defaults
        if parameter.default is not inspect.Parameter.empty and name not in family.text_components:
            kwargs[name] = parameter.default
    return cls(**kwargs)


@torch.no_grad()
def encode_upstream_prompt(
    family: UpstreamFamily,
    components: dict[str, Any],
    prompt: list[str],
    max_sequence_length: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, D) sequence embeddings and (B, L) int64 mask of `prompt`, from the family's own `encode_prompt`.

    The mask marks what the upstream's transformer sees as text: the tokenizer's mask where the family returns
    one (HunyuanVideo, LTX-Video, Mochi); Wan's non-zero rows (it zeroes the embeddings past each prompt); all
    ones for CogVideoX, whose transformer attends to every padded position."""
    pipe = text_pipeline(family, components)
    length = family.default_max_sequence_length if max_sequence_length is None else int(max_sequence_length)
    device = torch.device(device) if device is not None else components["text_encoder"].device
    common = dict(max_sequence_length=length, device=device, dtype=dtype)
    if family.name == "hunyuan_video":
        embeds, _pooled, mask = pipe.encode_prompt(prompt, **common)
    elif family.name in ("ltx_video", "mochi"):
        embeds, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, **common)
    else:
        embeds, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, **common)
        if family.name == "wan":
            mask = (embeds != 0).any(dim=-1)
        else:
            mask = torch.ones(embeds.shape[:2], device=embeds.device)
    return embeds, mask.to(device=embeds.device, dtype=torch.int64)
