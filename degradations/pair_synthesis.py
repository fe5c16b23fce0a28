"""One training pair from one planned clip: read the source frames, filter, make HR and LR, encode latents.

`ClipSynthesizer` is built once per process (the degradations, the quality filter and the upstream model are
expensive to build) and then called for each clip; everything random about a clip comes from its own seed, so
a clip comes out the same whichever process makes it and in whatever order.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import numpy as np

from cascade_vsr.degradations.pair_planning import clip_seed
from cascade_vsr.degradations.pair_settings import SPACE_TO_DEPTH, PairSettings, classic_config, load_callable
from cascade_vsr.pair_dataset import PairDatasetWriter, clip_path, write_frames, write_latents


def load_upstream(path: str) -> Any:
    """A diffusers pipeline saved with save_pretrained, loaded offline (nothing is downloaded), or the
    space-to-depth autoencoder for `space_to_depth`."""
    if path == SPACE_TO_DEPTH:
        from cascade_vsr.models.space_to_depth import SpaceToDepthAutoencoder

        return SpaceToDepthAutoencoder()
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)  # one SDEdit call per clip: make-pairs shows its own progress
    return pipeline


class ClipSynthesizer:
    """Makes the files and the manifest record of one clip: `synthesizer(clip, writer) -> record`.

    Args:
        settings: The dataset's settings (with `latent_space` filled in when it has an upstream).
        upstream: The upstream model already loaded from `settings.upstream`, to reuse; loaded here when None.
    """

    def __init__(self, settings: PairSettings, upstream: Any = None):
        from cascade_vsr.degradations.classic import ClassicDegradation
        from cascade_vsr.degradations.flow_based import FlowBasedDegradation, FlowDegradationConfig
        from cascade_vsr.degradations.quality import QualityFilter, QualityFilterConfig

        self.settings = settings
        self.degradations = {
            "flow": FlowBasedDegradation(FlowDegradationConfig(dis_preset=settings.dis_preset)),
            "classic1": ClassicDegradation(classic_config(settings.classic_options, order=1)),
            "classic2": ClassicDegradation(classic_config(settings.classic_options, order=2)),
        }
        self.quality = QualityFilter(
            QualityFilterConfig(min_learned_score=settings.min_quality_score),
            learned_score=load_callable(settings.quality_score) if settings.quality_score else None,
        )
        self.adapter = self.vae = self.model_guided = None
        if settings.upstream:
            from cascade_vsr.pipelines.adapters import get_adapter

            upstream = load_upstream(settings.upstream) if upstream is None else upstream
            self.adapter = get_adapter(upstream)
            self.vae = getattr(upstream, "vae", upstream)  # a pipeline's VAE, or the VAE itself
            if settings.upstream != SPACE_TO_DEPTH:
                from cascade_vsr.degradations.model_guided import ModelGuidedDegradation, ModelGuidedDegradationConfig

                self.model_guided = ModelGuidedDegradation(
                    upstream,
                    ModelGuidedDegradationConfig(
                        alpha=settings.alpha,
                        num_inference_steps=settings.sdedit_steps,
                        prompt=settings.prompt,
                        guidance_scale=settings.sdedit_guidance_scale,
                    ),
                )

    def __call__(self, clip: dict, writer: PairDatasetWriter) -> dict:
        """The manifest record of `clip` ({"id", "source", "start"}) once its folder is in place, or
        {"id", "rejected": reasons} when the quality filter drops it or its latents are not finite (NaN / inf, which
        would poison training: nothing is written, and a warning names the clip)."""
        from cascade_vsr.core.video import read_video

        settings = self.settings
        cid, seed = clip["id"], clip_seed(settings.seed, clip["id"])
        source = read_video(clip["source"], clip["start"], settings.span)[:: settings.stride]
        if len(source) < settings.num_frames:
            raise ValueError(f"`inputs`: {clip['source']!r} ended before frame {clip['start'] + settings.span}")
        if settings.quality_filter:
            report = self.quality(source)
            if not report.passed:
                return {"id": cid, "rejected": report.reasons}

        rng = np.random.default_rng(seed)
        names = sorted(settings.degradations)
        kind = names[rng.choice(len(names), p=[settings.degradations[n] for n in names])]
        hr, still = self.make_hr(source, seed)
        lr, lr_latents, degradation = self.make_lr(hr, kind, seed)
        tensors = self.latent_tensors(hr, lr, lr_latents) if settings.upstream else None
        bad = non_finite(tensors or {})
        if bad:
            reason = f"non-finite latents ({', '.join(bad)})"
            warnings.warn(f"make-pairs: clip {cid!r} rejected: {reason}", stacklevel=2)
            return {"id": cid, "rejected": [reason]}
        with writer.clip_folder(cid) as folder:
            hr_name = write_frames(folder, "hr", hr, settings.frames_format, settings.crf)
            lr_name = write_frames(folder, "lr", lr, settings.frames_format, settings.crf)
            latents_name = write_latents(folder, tensors, self.adapter.name) if tensors else None
        return {
            "id": cid,
            "source": clip["source"],
            "start": clip["start"],
            "num_frames": settings.num_frames,
            "stride": settings.stride,
            "hr_size": list(settings.hr_size),
            "lr_size": list(settings.lr_size),
            "degradation": json.loads(json.dumps(degradation, default=float)),
            "still": still,
            "seed": seed,
            "hr": clip_path(cid, hr_name),
            "lr": clip_path(cid, lr_name),
            "latents": clip_path(cid, latents_name) if latents_name else None,
            "latent_space": settings.latent_space,
        }

    def make_hr(self, source: np.ndarray, seed: int) -> tuple[np.ndarray, dict | None]:
        """The HR clip (the source centre-cropped to the HR aspect and area-resized), made a still shot of its
        middle frame for a share `still_fraction` of the clips; and the still-shot record (None otherwise)."""
        from cascade_vsr.core.video import resize_frames

        settings = self.settings
        hr = resize_frames(source, settings.hr_size, crop_to_aspect=True)
        still_rng = np.random.default_rng([seed, 1])  # its own stream: the other clips stay as without stills
        if still_rng.random() >= settings.still_fraction:
            return hr, None
        from cascade_vsr.degradations.still import still_clip

        middle = settings.num_frames // 2
        hr = still_clip(hr[middle], settings.num_frames, settings.still_noise, still_rng)
        return hr, {"frame": middle, "noise_std": settings.still_noise}

    def make_lr(self, hr: np.ndarray, kind: str, seed: int) -> tuple[np.ndarray, Any, dict]:
        """(LR frames, the LR latents when the degradation made them (model-guided) or None, the degradation
        record) of the HR clip, degraded by `kind` after an area resize to the LR size."""
        from cascade_vsr.core.video import resize_frames

        settings = self.settings
        lr_clean = resize_frames(hr, settings.lr_size)
        if kind == "model_guided":
            lr_latents, params = self.model_guided.apply(lr_clean, seed)
            lr = self.model_guided.decode(lr_latents)[: settings.num_frames]
            if lr.shape[1:3] != tuple(settings.lr_size):
                lr = resize_frames(lr, settings.lr_size, crop_to_aspect=True)
            return lr, lr_latents, {"kind": "model_guided", "params": params}
        if kind == "none":  # a clean share keeps the stage faithful on inputs that are already sharp
            return lr_clean, None, {"kind": "none", "params": {}}
        lr, params = self.degradations[kind].apply(lr_clean, seed)
        return lr, None, {"kind": "flow" if kind == "flow" else "classic", "params": {"name": kind, **params}}

    def latent_tensors(self, hr: np.ndarray, lr: np.ndarray, lr_latents) -> dict:
        """The tensors of latents.safetensors: HR (and LR, unless the degradation made its latents) encoded with
        the upstream, and the prompt embeddings when asked; float32 (masks int64), on the CPU."""
        import torch

        from cascade_vsr.core.video import frames_to_tensor

        adapter, vae = self.adapter, self.vae
        with torch.no_grad():
            tensors = {"hr_latents": adapter.encode(vae, frames_to_tensor(hr).to(vae.dtype))[0]}
            if lr_latents is None:
                lr_latents = adapter.encode(vae, frames_to_tensor(lr).to(vae.dtype))
        tensors["lr_latents"] = lr_latents[0]
        if self.settings.text_embeds:
            embeds, mask = self.model_guided.encode_prompt(self.settings.prompt)
            tensors["prompt_embeds"], tensors["prompt_attention_mask"] = embeds[0], mask[0]
        return {
            k: v.detach().cpu().contiguous().to(torch.int64 if "mask" in k else torch.float32)
            for k, v in tensors.items()
        }


def non_finite(tensors: dict) -> list[str]:
    """'name: N of M values' for each tensor that holds NaN or inf."""
    import torch

    bad = []
    for name, tensor in tensors.items():
        count = int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else 0
        if count:
            bad.append(f"{name}: {count} of {tensor.numel()} values")
    return bad
