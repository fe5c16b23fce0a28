"""CascadeVSRPipeline: the latent super-resolution stage that chains after a text-to-video pipeline.

upstream pipeline (output_type="latent") -> adapter.to_model -> LatentUpsampler3D -> noise augmentation
-> N flow-matching steps of CascadeVSRTransformer3DModel -> the upstream VAE decodes (model space -> pixels)
-> optional colour fix (`cascade_vsr.core.color`); optionally the mean of runs on flips / transposes of a pixel
input (`self_ensemble`).
"""

from __future__ import annotations

import contextvars
import itertools
import math
import numbers
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLLTXVideo,
    AutoencoderKLMochi,
    AutoencoderKLWan,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from einops import rearrange
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cascade_vsr.core.color import COLOR_FIXES
from cascade_vsr.core.flow import frame_correlated_noise, noise_augment
from cascade_vsr.core.validation import check_latents, safe_loading_kwargs
from cascade_vsr.models.space_to_depth import SpaceToDepthAutoencoder
from cascade_vsr.models.transformer import CascadeVSRTransformer3DModel
from cascade_vsr.models.upsampler import LatentUpsampler3D, resize_frames
from cascade_vsr.pipelines.adapters import LatentAdapter, get_adapter
from cascade_vsr.pipelines.lora_loader import CascadeVSRLoraLoaderMixin
from cascade_vsr.pipelines.sampling import check_sampling, guided_velocity, resolve_sampling, set_schedule
from cascade_vsr.pipelines.self_ensemble import (
    check_self_ensemble,
    dihedral_transform,
    generator_for_run,
    swaps_height_width,
)
from cascade_vsr.pipelines.streaming import StreamingNoise, auto_chunks_per_forward, stream_chunks
from cascade_vsr.pipelines.target_size import check_target_size, resolve_target_size
from cascade_vsr.pipelines.upstream import (
    UpstreamFamily,
    check_text_dim,
    encode_upstream_prompt,
    family_of_latent_space,
)

OUTPUT_TYPES = ("latent", "np", "pt", "pil")

# Set while `from_pipe` runs without an explicit dtype: the ids of the upstream's modules, which `to()` must not
# cast (DiffusionPipeline.from_pipe ends with `new_pipeline.to(dtype=float32)` and would cast them in place).
_FROM_PIPE_KEEP: contextvars.ContextVar[tuple[set[int], torch.dtype | None] | None] = contextvars.ContextVar(
    "cascade_vsr_from_pipe_keep", default=None
)


@dataclass
class CascadeVSRPipelineOutput(BaseOutput):
    r"""
    Output of the cascade stage.

    Args:
        frames (`torch.Tensor`, `np.ndarray` or `list[list[PIL.Image.Image]]`):
            With `output_type="latent"`, the HR latents (B, C, T, H/s, W/s) in the model's latent space (use
            `pipe.adapter.from_model` for the upstream's own format); otherwise the decoded frames, (B, T, H, W, 3)
            in [0, 1] for `"np"`, (B, T, 3, H, W) for `"pt"`, one list of images per video for `"pil"`.
    """

    frames: torch.Tensor | np.ndarray | list[list[PIL.Image.Image]]


def _is_real(value: Any) -> bool:
    """A real number (Python or NumPy), not a bool, a string or a tensor."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _pad_sequence(embeds: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (B, L, D) text embeddings and their (B, L) mask with masked zeros to `length` tokens."""
    extra = length - embeds.shape[1]
    return F.pad(embeds, (0, 0, 0, extra)), F.pad(mask, (0, extra))


def _repeat_to_batch(values: torch.Tensor, batch: int) -> torch.Tensor:
    """(1 or b, ...) -> (batch, ...): one entry shared by all, or each of b entries for its batch / b videos."""
    if values.shape[0] == 1:
        return values.expand(batch, *values.shape[1:])
    return values.repeat_interleave(batch // values.shape[0], dim=0)


def stack_videos(videos: torch.Tensor | list[torch.Tensor], ndim: int, name: str) -> torch.Tensor:
    """A batched tensor of rank `ndim` as it is; a list or tuple of per-video tensors (each of rank `ndim` - 1, or of
    rank `ndim` with a batch of 1), all of one shape, stacked on a new batch dim."""
    if not isinstance(videos, list | tuple):
        return videos
    if not videos or not all(isinstance(v, torch.Tensor) for v in videos):
        raise ValueError(f"`{name}` as a list must be a non-empty list of torch.Tensor, one per video")
    single = []
    for index, video in enumerate(videos):
        if video.ndim == ndim and video.shape[0] == 1:
            video = video[0]
        if video.ndim != ndim - 1:
            raise ValueError(
                f"`{name}[{index}]` must be one video of {ndim - 1} dims (or {ndim} with a batch of 1), got shape "
                f"{tuple(video.shape)}"
            )
        single.append(video)
    shapes = {tuple(v.shape) for v in single}
    if len(shapes) > 1:
        raise ValueError(
            f"the videos of `{name}` must all have one shape to run as a batch, got shapes "
            f"{[tuple(v.shape) for v in single]}"
        )
    return torch.stack(single)


def unit_range_frames(video: Any) -> Any:
    """Pixel frames on the [0, 1] scale `VideoProcessor` expects: uint8 arrays and tensors are divided by 255
    (explicitly, here), float ones must already lie in [0, 1] (values on [0, 255] would saturate); PIL images and
    lists of them pass unchanged."""
    if isinstance(video, list | tuple):
        return [unit_range_frames(item) for item in video]
    if isinstance(video, np.ndarray | torch.Tensor):
        if video.dtype in (np.uint8, torch.uint8):
            return video.astype(np.float32) / 255 if isinstance(video, np.ndarray) else video.float() / 255
        floating = (
            np.issubdtype(video.dtype, np.floating) if isinstance(video, np.ndarray) else video.is_floating_point()
        )
        if not floating:
            raise ValueError(f"`video` must be uint8 or float frames, got dtype {video.dtype}")
        low, high = float(video.min()), float(video.max())
        if low < 0 or high > 1:
            raise ValueError(
                f"`video` as floats must lie in [0, 1], got values in [{low:.4g}, {high:.4g}] (pass uint8 frames "
                "on [0, 255] as uint8: they are divided by 255)"
            )
    return video


class CascadeVSRPipeline(DiffusionPipeline, CascadeVSRLoraLoaderMixin):
    r"""
    Latent video super-resolution stage (SimpleGVR) for diffusers text-to-video pipelines.

    Takes the upstream pipeline's low-resolution latents (`output_type="latent"`) and generates high-resolution
    latents in the same latent space, which the upstream VAE decodes: nothing is decoded and re-encoded in
    between. Chain it with `CascadeVSRPipeline.from_pipe(upstream, upsampler=..., transformer=...)`, which
    shares the upstream's VAE, text encoder and tokenizer without changing their dtype.

    Args:
        upsampler ([`LatentUpsampler3D`]): LR latents -> HR-sized latents (any size).
        transformer ([`CascadeVSRTransformer3DModel`]): The conditional DiT predicting the flow velocity.
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): The flow-matching sampler.
        vae (*optional*): The upstream's VAE; needed to decode, to encode `video`, and for the colour fix.
        text_encoder, tokenizer (*optional*): The upstream's text encoder, needed only to encode `prompt`.
        text_encoder_2, tokenizer_2 (*optional*): The upstream's second text encoder where its `encode_prompt`
            runs one (HunyuanVideo's CLIP).
        sampling (`dict`, *optional*): The sampler settings the model was trained for (`num_inference_steps` or
            `sigmas`, `guidance_scale`, `noise_aug_strength`, `noise_frame_correlation`, `self_ensemble`), saved in
            `model_index.json`: a call without those arguments uses them (`pipelines.sampling`).

    LoRA (`CascadeVSRLoraLoaderMixin`, on diffusers' `LoraBaseMixin`): `load_lora_weights`, `set_adapters`,
    `disable_lora`, `fuse_lora`, `unfuse_lora`, `unload_lora_weights`; `attention_kwargs={"scale": s}` weighs the
    adapters in one call. Save a trained adapter with `CascadeVSRPipeline.save_lora_weights(dir,
    transformer_lora_layers=peft.utils.get_peft_model_state_dict(transformer),
    transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())`.
    Caches: `pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=...))`; every denoising step runs in
    the transformer's `cache_context("cond_uncond")` (both CFG halves are one batch), and the state is reset after
    each call and between the runs of a self-ensemble.
    """

    model_cpu_offload_seq = "text_encoder->upsampler->transformer->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
    _callback_tensor_inputs = ["latents", "condition", "prompt_embeds"]

    def __init__(
        self,
        upsampler: LatentUpsampler3D,
        transformer: CascadeVSRTransformer3DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKLWan
        | AutoencoderKLCogVideoX
        | AutoencoderKLHunyuanVideo
        | AutoencoderKLLTXVideo
        | AutoencoderKLMochi
        | SpaceToDepthAutoencoder
        | None = None,
        text_encoder: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        text_encoder_2: PreTrainedModel | None = None,
        tokenizer_2: PreTrainedTokenizerBase | None = None,
        sampling: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.register_to_config(sampling=check_sampling(sampling) or None)
        self.register_modules(
            upsampler=upsampler,
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )
        self.video_processor = VideoProcessor(vae_scale_factor=1)

    # -- construction --------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> CascadeVSRPipeline:
        """diffusers' `from_pretrained`, after checking the source: a mistyped local folder is an immediate
        FileNotFoundError naming it (not a Hub lookup), and only safetensors weights load."""
        kwargs = safe_loading_kwargs(pretrained_model_name_or_path, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs: Any) -> CascadeVSRPipeline:
        """Build the stage from an upstream pipeline, sharing its vae / text_encoder / tokenizer.

        The shared modules keep their device and dtype. `dtype` / `torch_dtype`, when given, applies only to
        the modules that are not shared (the upsampler and the transformer); without it they stay as passed.
        """
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        shared = {id(module) for module in pipeline.components.values() if isinstance(module, torch.nn.Module)}
        token = _FROM_PIPE_KEEP.set((shared, dtype))
        try:
            return super().from_pipe(pipeline, **kwargs)
        finally:
            _FROM_PIPE_KEEP.reset(token)

    def to(self, *args: Any, **kwargs: Any) -> CascadeVSRPipeline:
        keep = _FROM_PIPE_KEEP.get()
        if keep is None:
            return super().to(*args, **kwargs)
        shared, dtype = keep
        if dtype is not None:
            for module in self.components.values():
                if isinstance(module, torch.nn.Module) and id(module) not in shared:
                    module.to(dtype=dtype)
        return self

    # -- options -------------------------------------------------------------------------------------------------

    @property
    def adapter(self) -> LatentAdapter:
        """The upstream latent format: from the VAE when there is one, else from the transformer's config."""
        if self.vae is not None:
            return get_adapter(self.vae)
        latent_space = self.transformer.config.latent_space
        if latent_space is None:
            raise ValueError(
                "cannot tell the upstream latent format: the pipeline has no `vae` and the transformer's config "
                "has no `latent_space`; pass the upstream's vae (e.g. via `from_pipe`)"
            )
        return get_adapter(latent_space)

    def enable_vae_tiling(self, **kwargs: Any) -> None:
        """Decode (and encode) in overlapping spatial tiles, where the upstream VAE supports it."""
        if self.vae is None or not hasattr(self.vae, "enable_tiling"):
            raise ValueError(f"`vae` ({type(self.vae).__name__}) does not support tiling")
        self.vae.enable_tiling(**kwargs)

    def disable_vae_tiling(self) -> None:
        if self.vae is not None and hasattr(self.vae, "disable_tiling"):
            self.vae.disable_tiling()

    def set_attention_backend(self, backend: str) -> None:
        """Select the transformer's attention kernels: "sdpa" (default), "flex" (FlexAttention for the local
        modes), or a diffusers backend ("native", "flash", "sage", ...) for full and text cross-attention; a
        backend a layer's mode cannot use is an error naming the layer (`CascadeVSRTransformer3DModel`)."""
        self.transformer.set_attention_backend(backend)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def attention_kwargs(self) -> dict[str, Any] | None:
        return self._attention_kwargs

    # -- text ----------------------------------------------------------------------------------------------------

    @property
    def text_family(self) -> UpstreamFamily | None:
        """The upstream family whose prompt encoding `prompt=` uses: that of the model's latent space (None for a
        space of no text-to-video family, or when the pipeline cannot tell its space)."""
        source = self.vae  # a VAE names its latent space, else the transformer's config does
        if source is None and self.transformer is not None:
            source = self.transformer.config.latent_space
        if source is None:
            return None
        return family_of_latent_space(get_adapter(source).name)

    def _encode_text(
        self, prompt: list[str], max_sequence_length: int | None, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) embeddings and their (B, L) attention mask of `prompt`: through the upstream family's own
        `encode_prompt` (`pipelines.upstream`), else by the tokenizer (padded to `max_sequence_length`, 512 by
        default) and the text encoder's last hidden state."""
        family = self.text_family
        if family is not None:
            if self.transformer is not None:
                check_text_dim(family, self.text_encoder, self.transformer.config.text_dim)
            return encode_upstream_prompt(family, self.components, prompt, max_sequence_length, device, dtype)
        inputs = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=max_sequence_length or 512,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = inputs.attention_mask.to(device)
        embeds = self.text_encoder(inputs.input_ids.to(device), attention_mask=mask).last_hidden_state
        return embeds.to(device, dtype), mask

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None = None,
        do_classifier_free_guidance: bool = True,
        num_videos_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        r"""
        Encode the prompt and the negative prompt with the upstream's tokenizer and text encoder (diffusers'
        `encode_prompt`, with masks in LTX-Video's order). Needs only the text components. For a model of an
        upstream family's latent space the text goes through that family's own `encode_prompt` (HunyuanVideo's
        Llama prompt template, Wan's zero padding, ...), so the embeddings are the ones the upstream uses.

        Args:
            prompt (`str` or `list[str]`, *optional*): The prompt(s); or pass `prompt_embeds`.
            negative_prompt (`str` or `list[str]`, *optional*): Used only with `do_classifier_free_guidance`; a
                single string (or a list of one) applies to every prompt. Without it (and without `negative_prompt_embeds`) the
                negative outputs are None: the pipeline's unconditional branch is then the transformer's learned
                null text embedding, not an encoded empty string.
            do_classifier_free_guidance (`bool`): Whether to return negative embeddings at all.
            num_videos_per_prompt (`int`): Each row is repeated this many times, consecutively.
            prompt_embeds, negative_prompt_embeds (`torch.Tensor` (B, L, D), *optional*): Precomputed embeddings,
                used instead of encoding the text.
            prompt_attention_mask, negative_prompt_attention_mask (`torch.Tensor` (B, L), *optional*): Their masks
                (1 = real token); all ones when embeddings are given without a mask.
            max_sequence_length (`int`, *optional*): Tokens per prompt, padded and truncated to it; by default the
                upstream family's own default (Wan 512, CogVideoX 226, HunyuanVideo 256, LTX-Video 128, Mochi 256),
                or 512.
            device (`torch.device`, *optional*): Device of the outputs; the execution device by default.
            dtype (`torch.dtype`, *optional*): dtype of the embeddings; the text encoder's by default.

        Returns:
            `(prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask)`:
            (B * num_videos_per_prompt, L, D) embeddings and (B * num_videos_per_prompt, L) masks; the negative pair
            is `(None, None)` without classifier-free guidance or without a negative prompt.
        """
        device = device or self._execution_device
        needs_encoder = prompt is not None or (do_classifier_free_guidance and negative_prompt is not None)
        if needs_encoder and (self.text_encoder is None or self.tokenizer is None):
            raise ValueError(
                "encoding `prompt` or `negative_prompt` needs the pipeline's `text_encoder` and `tokenizer`"
            )
        if dtype is None:
            dtype = self.text_encoder.dtype if self.text_encoder is not None else prompt_embeds.dtype
        if prompt is not None:
            prompt = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds, prompt_attention_mask = self._encode_text(prompt, max_sequence_length, device, dtype)
        elif prompt_embeds is None:
            raise ValueError("pass `prompt` or `prompt_embeds`")
        else:
            prompt_embeds = prompt_embeds.to(device, dtype)
            if prompt_attention_mask is None:
                prompt_attention_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.long, device=device)
            prompt_attention_mask = prompt_attention_mask.to(device)
        batch_size = prompt_embeds.shape[0]

        if not do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_attention_mask = None
        elif negative_prompt is not None:
            negative_prompt = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negative_prompt) == 1:
                negative_prompt = negative_prompt * batch_size
            if len(negative_prompt) != batch_size:
                raise ValueError(
                    f"`negative_prompt` must be a string or a list of 1 or {batch_size} (the batch of the prompt), "
                    f"got a list of {len(negative_prompt)}"
                )
            negative_prompt_embeds, negative_prompt_attention_mask = self._encode_text(
                list(negative_prompt), max_sequence_length, device, dtype
            )
        elif negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(device, dtype)
            if negative_prompt_attention_mask is None:
                negative_prompt_attention_mask = torch.ones(
                    negative_prompt_embeds.shape[:2], dtype=torch.long, device=device
                )
            negative_prompt_attention_mask = negative_prompt_attention_mask.to(device)

        def per_video(values: torch.Tensor | None) -> torch.Tensor | None:
            return None if values is None else values.repeat_interleave(num_videos_per_prompt, dim=0)

        return (
            per_video(prompt_embeds),
            per_video(prompt_attention_mask),
            per_video(negative_prompt_embeds),
            per_video(negative_prompt_attention_mask),
        )

    def prepare_text_conditioning(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        prompt_attention_mask: torch.Tensor | None,
        negative_prompt_attention_mask: torch.Tensor | None,
        batch: int,
        do_cfg: bool,
        max_sequence_length: int | None,
        device: torch.device,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The transformer's text input for `batch` videos: (batch or 2 batch, L, D) embeddings and their mask, or
        (None, None) for the learned null embedding. With CFG the unconditional half comes first; it is the negative
        prompt, or else the learned null prompt."""
        if prompt is None and prompt_embeds is None:
            return None, None  # the transformer's learned null embedding
        dtype = self.transformer.dtype
        # One row per prompt (1 or the input's batch); `_repeat_to_batch` then pairs rows with videos.
        prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask = (
            self.encode_prompt(
                prompt,
                negative_prompt,
                do_classifier_free_guidance=do_cfg,
                num_videos_per_prompt=1,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                prompt_attention_mask=prompt_attention_mask,
                negative_prompt_attention_mask=negative_prompt_attention_mask,
                max_sequence_length=max_sequence_length,
                device=device,
                dtype=dtype,
            )
        )
        prompt_embeds = _repeat_to_batch(prompt_embeds, batch)
        prompt_attention_mask = _repeat_to_batch(prompt_attention_mask, batch)
        if not do_cfg:
            return prompt_embeds, prompt_attention_mask
        if negative_prompt_embeds is None:
            # The learned null prompt repeated over L fully visible tokens attends exactly like one null token.
            negative_prompt_embeds = self.transformer.null_text_embeds(batch, prompt_embeds.shape[1]).to(device, dtype)
            negative_prompt_attention_mask = torch.ones(
                negative_prompt_embeds.shape[:2], dtype=torch.long, device=device
            )
        negative_prompt_embeds = _repeat_to_batch(negative_prompt_embeds, batch)
        negative_prompt_attention_mask = _repeat_to_batch(negative_prompt_attention_mask, batch)
        length = max(prompt_embeds.shape[1], negative_prompt_embeds.shape[1])
        prompt_embeds, prompt_attention_mask = _pad_sequence(prompt_embeds, prompt_attention_mask, length)
        negative_prompt_embeds, negative_prompt_attention_mask = _pad_sequence(
            negative_prompt_embeds, negative_prompt_attention_mask, length
        )
        return (
            torch.cat([negative_prompt_embeds, prompt_embeds]),
            torch.cat([negative_prompt_attention_mask, prompt_attention_mask]),
        )

    def sampling_settings(self, pixels_in_and_out: bool = True, **explicit: Any) -> dict[str, Any]:
        """The sampler settings a call with these `explicit` arguments uses: explicit values, then the model's
        (`config.sampling`), then the library defaults. The model's self-ensemble applies to pixel input and
        decoded output only (`pixels_in_and_out`)."""
        return resolve_sampling(self.config.get("sampling"), pixels_in_and_out, **explicit)

    # -- checks --------------------------------------------------------------------------------------------------

    def check_inputs(
        self,
        lr_latents: torch.Tensor | None,
        video: Any,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        height: int | None,
        width: int | None,
        scale: float | tuple[float, float] | None,
        num_inference_steps: int,
        sigmas: list[float] | None,
        guidance_scale: float,
        noise_aug_strength: float,
        noise_frame_correlation: float,
        num_videos_per_prompt: int,
        latents: torch.Tensor | None,
        output_type: str,
        color_fix: str | None,
        self_ensemble: int,
        callback_on_step_end_tensor_inputs: list[str],
        decode_chunk_size: int | None,
        max_sequence_length: int | None = None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """Check every argument on its own, and the upstream latent space against the model's (no tensor is read).

        What needs the converted input (its values, batch and size) is checked by `convert_lr_latents`,
        `preprocess_video`, `resolve_target_size` and `check_batch_inputs`, still before any heavy compute."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if color_fix is not None and (not isinstance(color_fix, str) or color_fix not in COLOR_FIXES):
            raise ValueError(f"`color_fix` must be None or one of {tuple(COLOR_FIXES)}, got {color_fix!r}")
        if (lr_latents is None) == (video is None):
            raise ValueError("pass exactly one of `lr_latents` (the upstream's latent output) and `video` (pixels)")
        bad_inputs = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if bad_inputs:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be among {self._callback_tensor_inputs}, got {bad_inputs}"
            )
        for name, value in (
            ("num_inference_steps", num_inference_steps),
            ("num_videos_per_prompt", num_videos_per_prompt),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        if max_sequence_length is not None and (
            isinstance(max_sequence_length, bool)
            or not isinstance(max_sequence_length, int)
            or max_sequence_length < 1
        ):
            raise ValueError(
                f"`max_sequence_length` must be None or a positive int (text tokens), got {max_sequence_length!r}"
            )
        for name, value in (
            ("noise_aug_strength", noise_aug_strength),
            ("noise_frame_correlation", noise_frame_correlation),
        ):
            if not _is_real(value) or not 0.0 <= value <= 1.0:  # NaN fails the comparison too
                raise ValueError(f"`{name}` must be a number in [0, 1], got {value!r}")
        if not _is_real(guidance_scale) or not math.isfinite(guidance_scale) or guidance_scale < 1.0:
            raise ValueError(
                f"`guidance_scale` must be a finite number >= 1 (1 disables guidance), got {guidance_scale!r}"
            )
        if sigmas is not None:
            if not isinstance(sigmas, list | tuple | np.ndarray) or not all(_is_real(s) for s in sigmas):
                raise ValueError(f"`sigmas` must be a list of numbers, got {sigmas!r}")
            values = np.asarray(sigmas, dtype=np.float64)
            if (
                values.ndim != 1
                or len(values) == 0
                or not np.isfinite(values).all()
                or (values <= 0).any()
                or (values > 1).any()
                or (np.diff(values) >= 0).any()
            ):
                raise ValueError(f"`sigmas` must be a non-empty, strictly decreasing list in (0, 1], got {sigmas}")
        if decode_chunk_size is not None and (
            isinstance(decode_chunk_size, bool) or not isinstance(decode_chunk_size, int) or decode_chunk_size < 1
        ):
            raise ValueError(f"`decode_chunk_size` must be a positive int (latent frames), got {decode_chunk_size!r}")
        if attention_kwargs is not None:
            if not isinstance(attention_kwargs, dict) or set(attention_kwargs) - {"scale"}:
                raise ValueError(
                    "`attention_kwargs` must be None or a dict with only the key 'scale' (the LoRA weight), got "
                    f"{attention_kwargs!r}"
                )
            lora_scale = attention_kwargs.get("scale", 1.0)
            if not _is_real(lora_scale) or not math.isfinite(lora_scale):
                raise ValueError(f"`attention_kwargs['scale']` must be a finite number, got {lora_scale!r}")
        if output_type != "latent" and self.vae is None:
            raise ValueError(f"`output_type={output_type!r}` needs the upstream's `vae`; use output_type='latent'")
        if color_fix is not None and self.vae is None:
            raise ValueError("`color_fix` needs the upstream's `vae`")
        check_self_ensemble(self_ensemble, video, output_type, latents)
        check_target_size(height, width, scale)

        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass either `prompt` or `prompt_embeds`, not both")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass either `negative_prompt` or `negative_prompt_embeds`, not both")
        for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if text is None:
                continue
            if not (isinstance(text, str) or (isinstance(text, list) and all(isinstance(t, str) for t in text))):
                raise ValueError(f"`{name}` must be a string or a list of strings, got {type(text).__name__}")
            if self.text_encoder is None or self.tokenizer is None:
                raise ValueError(
                    f"`{name}` needs the upstream's `text_encoder` and `tokenizer`; or pass `{name}_embeds`"
                )

        adapter = self.adapter
        latent_space = self.transformer.config.latent_space
        if latent_space is not None and latent_space != adapter.name:
            raise ValueError(
                f"latent space mismatch: the transformer was trained in latent space {latent_space!r}, but the "
                f"upstream ({type(self.vae).__name__ if self.vae is not None else 'by name'}) produces "
                f"{adapter.name!r}"
            )
        channels = self.transformer.config.latent_channels
        if adapter.latent_channels != channels or self.upsampler.config.latent_channels != channels:
            raise ValueError(
                f"the upstream latent space {adapter.name!r} has {adapter.latent_channels} channels, but the "
                f"transformer has latent_channels={channels} and the upsampler "
                f"{self.upsampler.config.latent_channels}"
            )

    def _check_embeds(self, embeds: torch.Tensor | None, mask: torch.Tensor | None, name: str, batch: int) -> None:
        if embeds is None:
            if mask is not None:
                raise ValueError(f"`{name}_attention_mask` needs `{name}_embeds`")
            return
        text_dim = self.transformer.config.text_dim
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3:
            shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(f"`{name}_embeds` must have shape (B, L, {text_dim}), got {shape}")
        if embeds.shape[0] not in (1, batch) or embeds.shape[-1] != text_dim:
            raise ValueError(
                f"`{name}_embeds` must have shape (1 or {batch}, L, {text_dim}) (batch of the latents, the "
                f"transformer's text_dim), got {tuple(embeds.shape)}"
            )
        if not torch.isfinite(embeds).all():
            raise ValueError(f"`{name}_embeds` must be finite (no NaN / Inf)")
        if mask is not None and (mask.ndim != 2 or tuple(mask.shape) != tuple(embeds.shape[:2])):
            raise ValueError(
                f"`{name}_attention_mask` must have shape {tuple(embeds.shape[:2])}, got {tuple(mask.shape)}"
            )

    def check_batch_inputs(
        self,
        batch_size: int,
        latents_shape: tuple[int, ...],
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        prompt_attention_mask: torch.Tensor | None,
        negative_prompt_attention_mask: torch.Tensor | None,
        latents: torch.Tensor | None,
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> None:
        """Check what must agree with the input's batch (`batch_size` videos) and the target's `latents_shape`
        (B * num_videos_per_prompt, C, T, H/s, W/s)."""
        for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if isinstance(text, list) and len(text) not in (1, batch_size):
                raise ValueError(
                    f"`{name}` must have 1 or {batch_size} (batch of the latents) entries, got {len(text)}"
                )
        num_prompts = len(prompt) if isinstance(prompt, list) else 1
        if isinstance(negative_prompt, list) and len(negative_prompt) not in (1, num_prompts):
            raise ValueError(
                f"`negative_prompt` must have 1 or {num_prompts} (as many as `prompt`) entries, got "
                f"{len(negative_prompt)}"
            )
        self._check_embeds(prompt_embeds, prompt_attention_mask, "prompt", batch_size)
        self._check_embeds(negative_prompt_embeds, negative_prompt_attention_mask, "negative_prompt", batch_size)
        if latents is not None:
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != latents_shape:
                got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise ValueError(f"`latents` must have shape {latents_shape} (B, C, T, H/s, W/s), got {got}")
            if not torch.isfinite(latents).all():
                raise ValueError("`latents` must be finite (no NaN / Inf)")
        if isinstance(generator, list) and len(generator) != latents_shape[0]:
            raise ValueError(
                f"You have passed a list of generators of length {len(generator)}, but the effective batch size is "
                f"{latents_shape[0]} (videos x num_videos_per_prompt): pass one generator, or a list of "
                f"{latents_shape[0]}, one per output video"
            )

    # -- preparation steps ---------------------------------------------------------------------------------------

    def convert_lr_latents(
        self, adapter: LatentAdapter, lr_latents: torch.Tensor, upstream_shape: dict[str, int] | None
    ) -> torch.Tensor:
        """The upstream's latents in its own format (one batched tensor, or a list of per-video tensors) ->
        model-space (B, C, T, h, w), checked finite."""
        lr_latents = stack_videos(lr_latents, adapter.latent_ndim, "lr_latents")
        lr_latents = adapter.to_model(lr_latents, self.vae, **(upstream_shape or {}))
        if not torch.isfinite(lr_latents).all():
            raise ValueError("`lr_latents` must be finite (no NaN / Inf)")
        return lr_latents

    def preprocess_video(self, adapter: LatentAdapter, video: Any, whole_clip: bool = True) -> torch.Tensor:
        """Pixel frames (anything `VideoProcessor.preprocess_video` reads) -> (B, 3, T, H, W) in [-1, 1], checked:
        RGB, finite, in range (`unit_range_frames`), and a frame count and size that the VAE encodes. A piece of a
        stream (`whole_clip=False`, for `adapter.stream_encoder`) may have any frame count: the stream encoder
        checks the whole stream's."""
        video = self.video_processor.preprocess_video(unit_range_frames(video))
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"`video` must be RGB frames, got a video of shape {tuple(video.shape)}")
        if not torch.isfinite(video).all():
            raise ValueError("`video` must be finite (no NaN / Inf)")
        if whole_clip:
            adapter.check_num_frames(video.shape[2], "video frames")
        sc = adapter.spatial_compression
        if video.shape[3] % sc or video.shape[4] % sc:
            raise ValueError(f"`video` height and width must be multiples of {sc}, got {tuple(video.shape[3:])}")
        return video

    def prepare_lr_latents(
        self,
        adapter: LatentAdapter,
        lr_latents: torch.Tensor | None,
        video: torch.Tensor | None,
        num_videos_per_prompt: int,
        device: torch.device,
    ) -> torch.Tensor:
        """Model-space LR latents (B * num_videos_per_prompt, C, T, h, w) in float32: `lr_latents` as converted,
        or the preprocessed `video` encoded with the VAE (the slow path)."""
        if lr_latents is None:
            lr_latents = adapter.encode(self.vae, video.to(device, self.vae.dtype), generator=None)
        return lr_latents.to(device, torch.float32).repeat_interleave(num_videos_per_prompt, dim=0)

    def prepare_condition(
        self,
        lr_latents: torch.Tensor,
        latent_size: tuple[int, int],
        noise_aug_strength: float,
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Upsample once and noise-augment once (the condition is fixed through denoising): returns the upsampled
        latents and the condition `(1 - s) * up + s * eps`."""
        upsampled = self.upsampler(lr_latents, size=latent_size, return_dict=False)[0].float()
        noise = randn_tensor(upsampled.shape, generator=generator, device=upsampled.device, dtype=torch.float32)
        return upsampled, noise_augment(upsampled, noise_aug_strength, noise=noise)

    def sequence_length(self, latent_grid: tuple[int, int, int]) -> int:
        """Transformer tokens of a (T, H, W) latent grid, one per patch: the image sequence length of the
        scheduler's dynamic time shift."""
        return math.prod(latent_grid) // math.prod(self.transformer.config.patch_size)

    def prepare_latents(
        self,
        upsampled: torch.Tensor,
        noise_frame_correlation: float,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Initial latents of the shape of `upsampled`: `latents` when given; else noise, or at a first sigma below 1
        the upsampled input noised to it. Call after the timesteps are set."""
        if latents is None:
            noise = frame_correlated_noise(
                tuple(upsampled.shape), noise_frame_correlation, generator=generator, device=upsampled.device
            )
            sigma_start = float(self.scheduler.sigmas[0])
            latents = noise if sigma_start == 1.0 else (1 - sigma_start) * upsampled + sigma_start * noise
        return latents.to(upsampled.device, torch.float32)

    # -- outputs -------------------------------------------------------------------------------------------------

    def decode_latents(
        self, adapter: LatentAdapter, latents: torch.Tensor, decode_chunk_size: int | None = None
    ) -> torch.Tensor:
        """Model-space latents -> (B, 3, T, H, W) in [-1, 1], optionally `decode_chunk_size` latent frames at a
        time. Each chunk after the first is decoded with one latent frame of left context, whose frames are
        dropped, so a causal VAE gives the frame count of a single decode and the chunks join smoothly."""
        num_frames = latents.shape[2]
        if decode_chunk_size is None or decode_chunk_size >= num_frames:
            return adapter.decode(self.vae, latents)
        chunks = []
        for start in range(0, num_frames, decode_chunk_size):  # chunks bound the VAE's peak memory
            stop = min(start + decode_chunk_size, num_frames)
            context = max(start - 1, 0)
            decoded = adapter.decode(self.vae, latents[:, :, context:stop])
            if start > 0:
                decoded = decoded[:, :, -(stop - start) * adapter.temporal_compression :]
            chunks.append(decoded)
        return torch.cat(chunks, dim=2)

    def apply_color_fix(
        self,
        adapter: LatentAdapter,
        decoded: torch.Tensor,
        color_fix: str,
        lr_latents: torch.Tensor,
        video: torch.Tensor | None,
        decode_chunk_size: int | None = None,
    ) -> torch.Tensor:
        """`color_fix` of the decoded (B, 3, T, H, W) video against the input bilinearly resized to its size (the
        preprocessed `video`, or else the `lr_latents` decoded), clamped to [-1, 1]."""
        if video is None:
            video = self.decode_latents(adapter, lr_latents, decode_chunk_size).float()
        reference = resize_frames(video.to(decoded.device, decoded.dtype), tuple(decoded.shape[-2:]))
        reference = reference.repeat_interleave(decoded.shape[0] // reference.shape[0], dim=0)
        num_frames = min(decoded.shape[2], reference.shape[2])
        return COLOR_FIXES[color_fix](decoded[:, :, :num_frames], reference[:, :, :num_frames]).clamp(-1, 1)

    def _postprocess_mean(self, frames: torch.Tensor, output_type: str) -> torch.Tensor | np.ndarray | list:
        """(B, T, 3, H, W) frames in [0, 1] -> `output_type`, in the layouts of `postprocess_video`."""
        if output_type == "pt":
            return frames
        frames = rearrange(frames, "b t c h w -> b t h w c").cpu().numpy()
        if output_type == "np":
            return frames
        return [self.video_processor.numpy_to_pil(video) for video in frames]

    # -- call ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        lr_latents: torch.Tensor | list[torch.Tensor] | None = None,
        video: Any = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        scale: float | tuple[float, float] | None = None,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        noise_aug_strength: float | None = None,
        noise_frame_correlation: float | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers convention)
        max_sequence_length: int | None = None,
        color_fix: str | None = None,
        self_ensemble: int | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        upstream_shape: dict[str, int] | None = None,
        decode_chunk_size: int | None = None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> CascadeVSRPipelineOutput | tuple:
        r"""
        Super-resolve the upstream's latents (or, slower, a pixel video) to `height` x `width` or `scale`.

        The sampler arguments (`num_inference_steps`, `sigmas`, `guidance_scale`, `noise_aug_strength`,
        `noise_frame_correlation`, `self_ensemble`) default to the model's own settings (`sampling` in its
        `model_index.json`), then to 50 steps, no guidance, condition noise 0.45, independent noise per frame and
        a single run (`sampling_settings` tells what a call will use).

        Args:
            lr_latents (`torch.Tensor` or `list[torch.Tensor]`, *optional*): What the upstream pipeline returned with
                `output_type="latent"`, in its own format (e.g. Wan (B, C, T, h, w), CogVideoX (B, T, C, h, w),
                LTX-Video packed (B, S, D) with `upstream_shape`); or a list of such videos one by one (each without
                the batch dim, or with a batch of 1), all of one shape: the same as their stacked batch.
            video (*optional*): Pixel frames instead (anything `VideoProcessor.preprocess_video` accepts). The
                slow path: the frames are first encoded with the VAE.
            prompt, negative_prompt: Text, encoded with the shared upstream text encoder, the way the upstream
                family encodes it (`encode_prompt`).
            max_sequence_length (`int`, *optional*): Text tokens per prompt; the upstream family's default.
            prompt_embeds, negative_prompt_embeds (`torch.Tensor` (B, L, text_dim), *optional*): Upstream text
                embeddings, used as they are (same text encoder), with optional attention masks.
            height, width (`int`, *optional*): Target size in pixels; output frames have exactly this size.
            scale (`float` or `(float, float)`, *optional*): Target size as a factor of the input (non-integer ok).
            num_inference_steps (`int`): Denoising steps (1 for a one-step model).
            sigmas (`list[float]`, *optional*): An explicit decreasing schedule in (0, 1], used exactly.
            guidance_scale (`float`): Classifier-free guidance; > 1 runs the conditional and unconditional
                (negative prompt, or the model's null text embedding) branches in one batched forward.
            noise_aug_strength (`float`): Noise level s of the upsampled condition, fixed through denoising.
            noise_frame_correlation (`float`): Correlation of the initial noise between frames, in [0, 1]. 0 (the
                default) draws every frame's noise independently; higher values share one noise image across
                frames, so the detail that sampling generates stays in place instead of flickering
                (`flow.frame_correlated_noise`).
            generator, latents: Randomness: the condition's noise is drawn first, then the initial noise
                (or pass `latents`, (B, C, T, H/s, W/s)). A list holds one generator per output video.
            output_type (`str`): "latent" (model-space HR latents), "np", "pt" or "pil".
            callback_on_step_end: Called after every step with `callback_on_step_end_tensor_inputs`; may return
                a replacement `latents`.
            color_fix (`str`, *optional*): "wavelet" or "adain" against the bilinearly upsampled input
                (`cascade_vsr.core.color`).
            self_ensemble (`int`): N in 1..8: the mean of N runs of the stage, run k on the k-th flip / transpose
                of `video` (`self_ensemble.dihedral_transform`) with its output transformed back (EDSR's geometric
                self-ensemble; N times the compute, one run at a time). Run k of an N-ensemble equals a single run
                seeded seed + k on the k-th transform: run 0 uses `generator` as given, run k a generator seeded
                `generator.initial_seed() + k` (per element of a list); without a generator the runs draw from the
                global RNG in turn. Needs `video` and a decoded `output_type`; the mean is float64.
            upstream_shape (`dict`, *optional*): Grid of packed upstream latents (LTX-Video): `num_frames`,
                `height`, `width` of the upstream call.
            decode_chunk_size (`int`, *optional*): Decode this many latent frames at a time (less memory).
            attention_kwargs (`dict`, *optional*): `{"scale": s}` weighs the transformer's loaded LoRA adapters in
                this call (`load_lora_weights`); no other key exists.
        """
        if isinstance(callback_on_step_end, PipelineCallback | MultiPipelineCallbacks):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        settings = self.sampling_settings(
            pixels_in_and_out=video is not None and output_type != "latent",
            num_inference_steps=num_inference_steps,
            sigmas=sigmas,
            guidance_scale=guidance_scale,
            noise_aug_strength=noise_aug_strength,
            noise_frame_correlation=noise_frame_correlation,
            self_ensemble=self_ensemble,
        )
        num_inference_steps, sigmas, guidance_scale = (
            settings[k] for k in ("num_inference_steps", "sigmas", "guidance_scale")
        )
        noise_aug_strength, noise_frame_correlation = (
            settings["noise_aug_strength"],
            settings["noise_frame_correlation"],
        )
        self_ensemble = settings["self_ensemble"]

        # 1. Check the arguments (cheap); the converted input is checked in steps 2-3, before any heavy compute.
        self.check_inputs(
            lr_latents,
            video,
            prompt,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            height,
            width,
            scale,
            num_inference_steps,
            sigmas,
            guidance_scale,
            noise_aug_strength,
            noise_frame_correlation,
            num_videos_per_prompt,
            latents,
            output_type,
            color_fix,
            self_ensemble,
            callback_on_step_end_tensor_inputs,
            decode_chunk_size,
            max_sequence_length,
            attention_kwargs,
        )
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._interrupt = False
        device = self._execution_device
        adapter = self.adapter
        sc = adapter.spatial_compression
        do_cfg = guidance_scale > 1.0 and (prompt is not None or prompt_embeds is not None)

        # 2. The input in model terms: the upstream's latents in model space, or the pixels preprocessed (encoded
        #    in step 5, per run of the self-ensemble).
        if lr_latents is not None:
            lr_latents = self.convert_lr_latents(adapter, lr_latents, upstream_shape)
            batch_size, num_latent_frames = lr_latents.shape[0], lr_latents.shape[2]
            input_size = (lr_latents.shape[3] * sc, lr_latents.shape[4] * sc)
        else:
            video = self.preprocess_video(adapter, video)
            batch_size, num_latent_frames = video.shape[0], adapter.num_latent_frames(video.shape[2])
            input_size = (video.shape[3], video.shape[4])

        # 3. Target size, and what must agree with the batch.
        height, width = resolve_target_size(input_size, height, width, scale)
        batch = batch_size * num_videos_per_prompt
        latents_shape = (
            batch,
            adapter.latent_channels,
            num_latent_frames,
            math.ceil(height / sc),
            math.ceil(width / sc),
        )
        self.check_batch_inputs(
            batch_size,
            latents_shape,
            prompt,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            prompt_attention_mask,
            negative_prompt_attention_mask,
            latents,
            generator,
        )

        # 4. Text conditioning (CFG halves batched: unconditional first).
        prompt_embeds, prompt_attention_mask = self.prepare_text_conditioning(
            prompt,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            prompt_attention_mask,
            negative_prompt_attention_mask,
            batch,
            do_cfg,
            max_sequence_length,
            device,
        )
        noise_level = torch.full((batch * (2 if do_cfg else 1),), float(noise_aug_strength), device=device)

        # 5. One run, or one per transform of the self-ensemble (one at a time: N runs at once need N times the
        #    memory). Run k sees the k-th flip / transpose of the video, at the target size transformed alike.
        ensemble_sum = None
        for run in range(self_ensemble):
            if run > 0:  # each run of the ensemble starts with fresh cache state (`transformer.enable_cache`)
                self.transformer._reset_stateful_cache()
            run_generator = generator_for_run(generator, run)
            run_video = video if video is None else dihedral_transform(video, run)
            run_size = (width, height) if swaps_height_width(run) else (height, width)
            latent_size = (math.ceil(run_size[0] / sc), math.ceil(run_size[1] / sc))

            # 5a. LR latents in model space (the pixels are encoded with the VAE).
            lr = self.prepare_lr_latents(adapter, lr_latents, run_video, num_videos_per_prompt, device)

            # 5b. The condition: upsampled once and noise-augmented once.
            upsampled, condition = self.prepare_condition(lr, latent_size, noise_aug_strength, run_generator)

            # 5c. Timesteps, and the initial latents at the first one.
            set_schedule(
                self.scheduler,
                sigmas,
                num_inference_steps,
                self.sequence_length((num_latent_frames, *latent_size)),
                device,
            )
            timesteps = self.scheduler.timesteps
            self._num_timesteps = len(timesteps)
            run_latents = self.prepare_latents(upsampled, noise_frame_correlation, run_generator, latents)

            # 5d. Denoising loop.
            with self.progress_bar(total=len(timesteps)) as progress_bar:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        continue
                    # The CFG halves run batched: one cache context for both (diffusers' "cond_uncond").
                    with self.transformer.cache_context(
                        "cond_uncond", step_index=i, num_inference_steps=len(timesteps)
                    ):
                        velocity = guided_velocity(
                            self.transformer,
                            run_latents,
                            condition,
                            t,
                            guidance_scale if do_cfg else None,
                            noise_aug_level=noise_level,
                            encoder_hidden_states=prompt_embeds,
                            encoder_attention_mask=prompt_attention_mask,
                            attention_kwargs=attention_kwargs,
                        )
                    run_latents = self.scheduler.step(velocity, t, run_latents, return_dict=False)[0]

                    if callback_on_step_end is not None:
                        callback_kwargs = {
                            "latents": run_latents,
                            "condition": condition,
                            "prompt_embeds": prompt_embeds,
                        }
                        callback_kwargs = {k: callback_kwargs[k] for k in callback_on_step_end_tensor_inputs}
                        callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                        run_latents = callback_outputs.pop("latents", run_latents)
                        condition = callback_outputs.pop("condition", condition)
                        prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    progress_bar.update()

            # 5e. Decode with the upstream VAE, crop to the exact size, optional colour fix; the ensemble's runs are
            #     transformed back and summed in float64.
            if output_type == "latent":
                frames = run_latents  # a single run: the self-ensemble needs pixels
            else:
                decoded = self.decode_latents(adapter, run_latents, decode_chunk_size).float()
                decoded = decoded[..., : run_size[0], : run_size[1]]
                if color_fix is not None:
                    decoded = self.apply_color_fix(adapter, decoded, color_fix, lr, run_video, decode_chunk_size)
                if self_ensemble == 1:
                    frames = self.video_processor.postprocess_video(decoded, output_type=output_type)
                else:
                    run_frames = self.video_processor.postprocess_video(decoded, output_type="pt")  # (B, T, 3, H, W)
                    run_frames = dihedral_transform(run_frames, run, inverse=True).double()
                    ensemble_sum = run_frames if ensemble_sum is None else ensemble_sum + run_frames

        # 6. The self-ensemble's output: the mean of its runs' [0, 1] frames, in float64.
        if ensemble_sum is not None:
            frames = self._postprocess_mean(ensemble_sum / self_ensemble, output_type)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return CascadeVSRPipelineOutput(frames=frames)

    @torch.no_grad()
    def stream(
        self,
        lr_latents: Iterable[torch.Tensor],
        height: int | None = None,
        width: int | None = None,
        scale: float | tuple[float, float] | None = None,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        noise_aug_strength: float | None = None,
        noise_frame_correlation: float | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "np",
        max_sequence_length: int | None = None,
        chunks_per_forward: int | str = 1,
    ) -> Iterator[torch.Tensor | np.ndarray]:
        r"""
        Super-resolve a video of any length chunk by chunk, at constant memory, with a block-causal model
        (`transformer.config.causal_chunk_frames`; `pipelines.streaming` says what makes it exact).

        Args:
            lr_latents (iterable of `torch.Tensor` (B, C, Tc, h, w)): Model-space LR latent chunks of any lengths,
                in order (e.g. `adapter.to_model` of an upstream's output, or frames through a per-frame VAE).
            height, width, scale, num_inference_steps, sigmas, guidance_scale, prompt, negative_prompt,
                prompt_embeds, negative_prompt_embeds, prompt_attention_mask, negative_prompt_attention_mask,
                noise_aug_strength, noise_frame_correlation, max_sequence_length: as in `__call__` (the model's
                sampling settings by default).
            generator (`torch.Generator`, *optional*): The noise of every chunk, drawn in order (`StreamingNoise`).
            output_type (`str`): `"latent"` (HR latent chunks), `"np"` or `"pt"` (decoded frames, chunk by chunk
                through `adapter.stream_decoder`, equal to one decode of the whole clip: a per-frame VAE such as
                space-to-depth, or Wan's causal VAE with its cache carried across chunks; the other families' VAEs
                are refused: stream their latents).
            chunks_per_forward (`int` or `"auto"`): Chunks of `causal_chunk_frames` latent frames that one forward
                pass computes, each attending to exactly the keys it would see alone: the same numbers, with the
                fixed cost of a forward (hundreds of small operations, about 20 ms a frame on 2 CPU cores) spread
                over more frames, for a latency and an activation memory of that many chunks. `"auto"`: as many as
                fit 32k tokens (`streaming.auto_chunks_per_forward`; 8 at 320x192 on the demo model, 1 from about
                960x540 up), for throughput rather than latency.

        Yields:
            HR pieces of `chunks_per_forward` x `causal_chunk_frames` latent frames (the last may be shorter), as
            `__call__` returns frames: (B, C, Tc, H/s, W/s) latents, or the pixel frames each piece completes,
            (B, T', H, W, 3) arrays or (B, T', 3, H, W) tensors (T' = Tc for space-to-depth; for Wan 4 Tc, 4 Tc - 3
            the first).
        """
        if self.transformer.config.causal_chunk_frames is None:
            raise ValueError("`stream` needs a block-causal transformer (`causal_chunk_frames` in its config)")
        auto = isinstance(chunks_per_forward, str) and chunks_per_forward == "auto"
        if not auto and (
            isinstance(chunks_per_forward, bool) or not isinstance(chunks_per_forward, int) or chunks_per_forward < 1
        ):
            raise ValueError(f"`chunks_per_forward` must be an int >= 1 or 'auto', got {chunks_per_forward!r}")
        if output_type not in ("latent", "np", "pt"):
            raise ValueError(f"`output_type` of a stream must be 'latent', 'np' or 'pt', got {output_type!r}")
        adapter = self.adapter
        chunks = iter(lr_latents)
        first = next(chunks, None)
        if not isinstance(first, torch.Tensor) or first.ndim != 5:
            raise ValueError(
                "`lr_latents` must yield (B, C, Tc, h, w) model-space latent chunks; the first is not one"
            )
        settings = resolve_sampling(
            self.config.get("sampling"),
            False,
            num_inference_steps=num_inference_steps,
            sigmas=sigmas,
            guidance_scale=guidance_scale,
            noise_aug_strength=noise_aug_strength,
            noise_frame_correlation=noise_frame_correlation,
        )
        self.check_inputs(
            first, None, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, height, width, scale,
            settings["num_inference_steps"], settings["sigmas"], settings["guidance_scale"],
            settings["noise_aug_strength"], settings["noise_frame_correlation"], 1, None, output_type, None, 1, [],
            None, max_sequence_length, None,
        )  # fmt: skip
        # One decoder per stream (fresh state); it refuses a VAE whose chunks cannot be decoded apart exactly.
        decoder = adapter.stream_decoder(self.vae) if output_type != "latent" else None
        device = self._execution_device
        sc = adapter.spatial_compression
        height, width = resolve_target_size((first.shape[3] * sc, first.shape[4] * sc), height, width, scale)
        latent_size = (math.ceil(height / sc), math.ceil(width / sc))
        chunk_frames = self.transformer.config.causal_chunk_frames
        chunk_tokens = self.sequence_length((chunk_frames, *latent_size))
        if auto:
            chunks_per_forward = auto_chunks_per_forward(chunk_tokens)
        set_schedule(self.scheduler, settings["sigmas"], settings["num_inference_steps"], chunk_tokens, device)
        guidance = settings["guidance_scale"]
        do_cfg = guidance > 1.0 and (prompt is not None or prompt_embeds is not None)
        text = self.prepare_text_conditioning(
            prompt,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            prompt_attention_mask,
            negative_prompt_attention_mask,
            first.shape[0],
            do_cfg,
            max_sequence_length,
            device,
        )

        def checked(chunk_stream: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
            for index, chunk in enumerate(chunk_stream):
                check_latents(chunk, f"lr_latents[{index}]", channels=adapter.latent_channels)
                if chunk.shape[0] != first.shape[0] or chunk.shape[3:] != first.shape[3:]:
                    raise ValueError(
                        f"`lr_latents[{index}]` must have the batch and size of the first chunk "
                        f"{(first.shape[0], *first.shape[3:])}, got {tuple(chunk.shape)}"
                    )
                yield chunk.to(device, torch.float32)

        hr_chunks = stream_chunks(
            self,
            checked(itertools.chain([first], chunks)),
            latent_size,
            self.scheduler.sigmas.to(device, torch.float32),
            text,
            guidance if do_cfg else None,
            settings["noise_aug_strength"],
            StreamingNoise(settings["noise_frame_correlation"], settings["noise_aug_strength"], generator),
            chunks_per_forward,
        )
        for hr in hr_chunks:
            if output_type == "latent":
                yield hr
            else:
                decoded = decoder.decode(hr).float()[..., :height, :width]
                yield self.video_processor.postprocess_video(decoded, output_type=output_type)
