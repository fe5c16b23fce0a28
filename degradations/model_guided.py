"""Model-guided degradation (SimpleGVR section 4.2.2): SDEdit with the upstream text-to-video model.

The LR input of the cascade stage should look like what the base T2V model produces, not like a resized
real video. We encode the downsampled real video with the upstream VAE (through the shared latent adapters,
so the result lives in the model's latent space), noise it to level alpha and let the upstream model
denoise it back to 0: a higher alpha moves the latent further into the T2V output domain and away from the
source's structure (the paper uses alpha in [0.3, 0.4]).

The denoising is the upstream pipeline's own `__call__` (its text encoding, CFG, scheduler, timestep
conventions and expert switching, e.g. Wan 2.2's two transformers), started from the noised latent: while it
runs, its scheduler's `set_timesteps` is followed by a cut of the schedule to the part below alpha.
Flow-matching schedulers (FlowMatchEuler, UniPC with flow sigmas; Mochi's inverted sigmas): the noised latent is
(1 - alpha) c0 + alpha eps and the schedule is alpha itself, then the scheduler's grid below it.
DDPM-type schedulers (CogVideoX's DDIM / DPM): alpha is the fraction of the training timesteps; the schedule is
the grid at or below it, and the latent is noised by the scheduler's `add_noise` at its first step.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cascade_vsr.core.video import check_video, frames_to_tensor, tensor_to_frames
from cascade_vsr.degradations.common import check_range, uniform
from cascade_vsr.pipelines.adapters import get_adapter
from cascade_vsr.pipelines.upstream import UPSTREAM_FAMILIES, encode_upstream_prompt, family_of_latent_space


@dataclass
class ModelGuidedDegradationConfig:
    alpha: tuple[float, float] = (0.3, 0.4)  # noise level, sampled per clip
    num_inference_steps: int = 20  # steps of the full schedule; only those below alpha run
    prompt: str = ""  # a caption of the clip, or empty
    negative_prompt: str | None = None  # None: the upstream's own default
    guidance_scale: float | None = None  # the upstream's `guidance_scale`; None: its own default
    max_sequence_length: int | None = None  # text tokens; None: what the upstream's transformer was built for
    sample_posterior: bool = False  # sample the VAE posterior instead of taking its mode
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)  # more arguments of the upstream's __call__

    def __post_init__(self):
        check_range(self.alpha, "alpha", 0, 1)
        if isinstance(self.num_inference_steps, bool) or not isinstance(self.num_inference_steps, int):
            raise ValueError(f"`num_inference_steps` must be an int >= 1, got {self.num_inference_steps!r}")
        if self.num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be >= 1, got {self.num_inference_steps}")
        if self.guidance_scale is not None and (
            isinstance(self.guidance_scale, bool)
            or not isinstance(self.guidance_scale, int | float)
            or not np.isfinite(self.guidance_scale)
            or self.guidance_scale < 1
        ):
            raise ValueError(f"`guidance_scale` must be None or a finite number >= 1, got {self.guidance_scale!r}")
        reserved = set(self.pipeline_kwargs) & {"latents", "output_type", "return_dict", "num_inference_steps"}
        if reserved:
            raise ValueError(f"`pipeline_kwargs` must not set {sorted(reserved)}: the degradation sets them")


def is_flow_matching(scheduler: Any) -> bool:
    """Whether `scheduler` integrates a flow (sigma is the noise level), rather than a DDPM-type chain."""
    config = scheduler.config
    return (
        type(scheduler).__name__.startswith("FlowMatch")
        or bool(config.get("use_flow_sigmas", False))
        or config.get("prediction_type") == "flow_prediction"
    )


def flow_matching_tail(sigmas: torch.Tensor, noise_level: float, inverted: bool = False) -> torch.Tensor:
    """A flow-matching scheduler's sigmas (N + 1, the terminal last) from `noise_level` on: the level itself, the
    grid strictly below it, the terminal. `inverted` sigmas (Mochi) are 1 - the noise level."""
    levels = 1 - sigmas if inverted else sigmas
    grid = levels[:-1]
    tail = torch.cat([levels.new_tensor([noise_level]), grid[grid < noise_level], levels[-1:]])
    return 1 - tail if inverted else tail


def cut_schedule(scheduler: Any, noise_level: float) -> None:
    """Cut the schedule that `set_timesteps` just set, in place, to the part at noise level `noise_level` and below."""
    num_train_timesteps = scheduler.config.num_train_timesteps
    timesteps = scheduler.timesteps
    if is_flow_matching(scheduler):
        sigmas = flow_matching_tail(scheduler.sigmas, noise_level, bool(scheduler.config.get("invert_sigmas", False)))
        scheduler.sigmas = sigmas
        scheduler.timesteps = (sigmas[:-1] * num_train_timesteps).to(timesteps.device, timesteps.dtype)
    else:  # `num_inference_steps` stays: a DDIM step goes to t - num_train_timesteps // num_inference_steps
        scheduler.timesteps = timesteps[timesteps <= noise_level * num_train_timesteps]


@contextmanager
def schedule_from_noise_level(scheduler: Any, noise_level: float) -> Iterator[None]:
    """While active, every `scheduler.set_timesteps(...)` is followed by `cut_schedule(scheduler, noise_level)`; the
    wrapper keeps the method's signature (pipelines inspect it for `sigmas` / `timesteps` support)."""
    own = scheduler.__dict__.get("set_timesteps")
    set_timesteps = scheduler.set_timesteps

    @functools.wraps(set_timesteps)
    def set_and_cut(*args: Any, **kwargs: Any) -> None:
        set_timesteps(*args, **kwargs)
        cut_schedule(scheduler, noise_level)

    scheduler.set_timesteps = set_and_cut
    try:
        yield
    finally:
        if own is None:
            del scheduler.set_timesteps
        else:
            scheduler.set_timesteps = own


class ModelGuidedDegradation:
    """`ModelGuidedDegradation(pipeline, config)(frames, seed) -> c^0` latents (1, C, T', h, w) in the model's
    latent space (`adapter.name`). `frames` is the uint8 video; `size` downsamples it first (the LR size).

    `pipeline` is a diffusers text-to-video pipeline of one of the families (Wan 2.1 / 2.2, CogVideoX,
    HunyuanVideo, LTX-Video, Mochi); its components are used as they are, frozen."""

    def __init__(self, pipeline: Any, config: ModelGuidedDegradationConfig | None = None):
        self.config = config or ModelGuidedDegradationConfig()
        self.pipeline = pipeline
        self.adapter = get_adapter(pipeline)
        self.family = family_of_latent_space(self.adapter.name)
        if self.family is None or getattr(pipeline, "transformer", None) is None:
            raise ValueError(
                f"`pipeline` must be a text-to-video pipeline of one of {tuple(UPSTREAM_FAMILIES)} with its "
                f"transformer, got {type(pipeline).__name__} (latent space {self.adapter.name!r})"
            )
        self._call_parameters = set(inspect.signature(type(pipeline).__call__).parameters)
        unknown = set(self.config.pipeline_kwargs) - self._call_parameters
        if unknown:
            raise ValueError(
                f"`pipeline_kwargs` {sorted(unknown)} are not arguments of {type(pipeline).__name__}.__call__"
            )
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def device(self) -> torch.device:
        return self.pipeline.transformer.device

    def sample_alpha(self, seed: int) -> float:
        return uniform(np.random.default_rng(seed), self.config.alpha)

    @torch.no_grad()
    def encode_prompt(self, prompt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The stage's text conditioning of `prompt` (default: the config's): (1, L, D) embeddings and (1, L) int64
        mask, from the upstream's own `encode_prompt` (`pipelines.upstream`), as `CascadeVSRPipeline(prompt=)`
        computes them."""
        prompt = self.config.prompt if prompt is None else prompt
        if prompt not in self._prompt_cache:
            self._prompt_cache[prompt] = encode_upstream_prompt(
                self.family, self.pipeline.components, [prompt], self.config.max_sequence_length, self.device
            )
        return self._prompt_cache[prompt]

    @torch.no_grad()
    def encode(self, frames: np.ndarray, size: tuple[int, int] | None = None) -> torch.Tensor:
        """c0: the model-space latent (1, C, T', h, w) of the (downsampled) uint8 video."""
        check_video(frames, "frames")
        video = frames_to_tensor(frames, size)
        self.adapter.check_num_frames(video.shape[2], "frames")
        vae = self.pipeline.vae
        return self.adapter.encode(vae, video.to(vae.device, vae.dtype), sample=self.config.sample_posterior).float()

    def __call__(
        self,
        frames: np.ndarray,
        seed: int = 0,
        size: tuple[int, int] | None = None,
        alpha: float | None = None,
    ) -> torch.Tensor:
        return self.apply(frames, seed, size=size, alpha=alpha)[0]

    @torch.no_grad()
    def apply(self, frames, seed=0, size=None, alpha=None) -> tuple[torch.Tensor, dict]:
        """(c^0, params): encode, noise to `alpha` (sampled from the config when None), denoise to 0."""
        if alpha is None:
            alpha = self.sample_alpha(seed)
        self._check_alpha(alpha)
        clean = self.encode(frames, size)
        return self.denoise(clean, float(alpha), seed), {
            "alpha": float(alpha),
            "num_inference_steps": self.config.num_inference_steps,
            "prompt": self.config.prompt,
            "guidance_scale": self.guidance_scale,
            "latent_space": self.adapter.name,
        }

    @property
    def guidance_scale(self) -> float | None:
        """The guidance scale the upstream runs with: the config's, else its `__call__` default."""
        if self.config.guidance_scale is not None:
            return float(self.config.guidance_scale)
        parameter = inspect.signature(type(self.pipeline).__call__).parameters.get("guidance_scale")
        return None if parameter is None else float(parameter.default)

    @staticmethod
    def _check_alpha(alpha: Any) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
            raise ValueError(f"`alpha` must be a number in [0, 1], got {alpha!r}")

    @torch.no_grad()
    def denoise(self, clean: torch.Tensor, alpha: float, seed: int = 0) -> torch.Tensor:
        """SDEdit from the model-space latent `clean` (1, C, T, h, w) at noise level `alpha` down to 0, by the
        upstream pipeline's own denoising loop; returns model-space latents on the CPU in float32."""
        self._check_alpha(alpha)
        scheduler = self.pipeline.scheduler
        noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float32)
        if alpha == 0:
            return clean.clone()
        if is_flow_matching(scheduler):
            noised = self.adapter.from_model((1 - alpha) * clean + alpha * noise)
        else:
            probe = copy.deepcopy(scheduler)
            probe.set_timesteps(self.config.num_inference_steps, device=self.device)
            cut_schedule(probe, alpha)
            if len(probe.timesteps) == 0:
                return clean.clone()
            noised = scheduler.add_noise(
                self.adapter.from_model(clean), self.adapter.from_model(noise), probe.timesteps[:1].cpu()
            )
        with schedule_from_noise_level(scheduler, alpha):
            output = self.pipeline(**self._call_kwargs(noised, clean.shape, seed))[0]
        num_frames, height, width = clean.shape[2:]
        grid = dict(latent_num_frames=num_frames, latent_height=height, latent_width=width)
        return self.adapter.to_model(output, **grid).float().cpu()

    def _call_kwargs(self, noised: torch.Tensor, shape: torch.Size, seed: int) -> dict[str, Any]:
        """Arguments of the upstream's `__call__` for one SDEdit run from `noised` (the upstream's latent format)."""
        config, adapter = self.config, self.adapter
        num_frames, height, width = shape[2:]
        kwargs = dict(
            prompt=config.prompt,
            height=height * adapter.spatial_compression,
            width=width * adapter.spatial_compression,
            num_frames=(num_frames - 1) * adapter.temporal_compression + 1,
            num_inference_steps=config.num_inference_steps,
            latents=noised.to(self.device, torch.float32),
            generator=torch.Generator(self.device).manual_seed(int(seed)),
            output_type="latent",
            return_dict=False,
        )
        if config.negative_prompt is not None:
            kwargs["negative_prompt"] = config.negative_prompt
        if config.guidance_scale is not None:
            kwargs["guidance_scale"] = float(config.guidance_scale)
        length = config.max_sequence_length
        if length is None:  # a transformer built for a fixed text length (CogVideoX) needs exactly that length
            length = self.pipeline.transformer.config.get("max_text_seq_length")
        if length is not None:
            kwargs["max_sequence_length"] = int(length)
        return kwargs | dict(config.pipeline_kwargs)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Model-space latents (1, C, T', h, w) -> uint8 frames (T, H, W, 3) through the upstream VAE."""
        vae = self.pipeline.vae
        return tensor_to_frames(self.adapter.decode(vae, latents.to(vae.device, vae.dtype)))
