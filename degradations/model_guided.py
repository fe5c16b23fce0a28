"""Model-guided degradation (SimpleGVR section 4.2.2): SDEdit with the upstream text-to-video model.

The LR input of the cascade stage should look like what the base T2V model produces, not like a resized
real video. We encode the downsampled real video with the upstream VAE (through the shared latent adapters,
so the result lives in the model's latent space), noise it to level alpha and let the upstream transformer
denoise it back to 0: a higher alpha moves the latent further into the T2V output domain and away from the
source's structure (the paper uses alpha in [0.3, 0.4]).

Flow-matching schedulers (Wan, HunyuanVideo, ...): x_alpha = (1 - alpha) c0 + alpha eps, then Euler steps on
the scheduler's own (shifted) sigma grid below alpha, with the transformer's velocity.
DDPM-type schedulers (CogVideoX's DDIM): alpha is the fraction of the training timesteps; the scheduler's
`add_noise` and `step` run the tail of its inference schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cascade_vsr.core.video import check_video, frames_to_tensor, tensor_to_frames
from cascade_vsr.degradations.common import check_range, uniform

SUPPORTED_FAMILIES = ("wan", "cogvideox")


@dataclass
class ModelGuidedDegradationConfig:
    alpha: tuple[float, float] = (0.3, 0.4)  # noise level, sampled per clip
    num_inference_steps: int = 20  # steps of the full schedule; only those below alpha run
    prompt: str = ""  # a caption of the clip, or empty
    max_sequence_length: int | None = None  # text tokens; None: the family's transformer default
    sample_posterior: bool = False  # sample the VAE posterior instead of taking its mode

    def __post_init__(self):
        check_range(self.alpha, "alpha", 0, 1)
        if self.num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be >= 1, got {self.num_inference_steps}")


class ModelGuidedDegradation:
    """`ModelGuidedDegradation(pipeline, config)(frames, seed) -> c^0` latents (1, C, T', h, w) in the model's
    latent space (`adapter.name`). `frames` is the uint8 video; `size` downsamples it first (the LR size).

    `pipeline` is a diffusers T2V pipeline of a family the adapters support (Wan, CogVideoX so far for the
    denoising loop); its VAE, transformer, scheduler and text encoder are used as they are, frozen."""

    def __init__(self, pipeline, config: ModelGuidedDegradationConfig | None = None):
        from cascade_vsr.pipelines.adapters import get_adapter

        self.config = config or ModelGuidedDegradationConfig()
        self.pipeline = pipeline
        self.adapter = get_adapter(pipeline)
        family = self.adapter.name.split("_z")[0]
        if family not in SUPPORTED_FAMILIES:
            raise ValueError(
                f"`pipeline` of family {self.adapter.name!r} has no model-guided denoising loop yet; "
                f"supported: {SUPPORTED_FAMILIES}"
            )
        self.family = family
        self.flow_matching = not hasattr(pipeline.scheduler, "alphas_cumprod")
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def device(self) -> torch.device:
        return self.pipeline.transformer.device

    def sample_alpha(self, seed: int) -> float:
        return uniform(np.random.default_rng(seed), self.config.alpha)

    @torch.no_grad()
    def encode_prompt(self, prompt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Upstream text embeddings (1, L, D) and attention mask (1, L) int64 of `prompt` (default: the config's)."""
        prompt = self.config.prompt if prompt is None else prompt
        if prompt not in self._prompt_cache:
            length = self.config.max_sequence_length
            if length is None:
                length = getattr(self.pipeline.transformer.config, "max_text_seq_length", None) or 226
            embeds = self.pipeline.encode_prompt(
                prompt=prompt, do_classifier_free_guidance=False, max_sequence_length=length, device=self.device
            )[0]
            tokens = self.pipeline.tokenizer(
                prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
            )
            self._prompt_cache[prompt] = (embeds, tokens.attention_mask.to(torch.int64))
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
        prompt_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.apply(frames, seed, size=size, alpha=alpha, prompt_embeds=prompt_embeds)[0]

    @torch.no_grad()
    def apply(self, frames, seed=0, size=None, alpha=None, prompt_embeds=None) -> tuple[torch.Tensor, dict]:
        """(c^0, params): encode, noise to `alpha` (sampled from the config when None), denoise to 0."""
        if alpha is None:
            alpha = self.sample_alpha(seed)
        if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"`alpha` must be a number in [0, 1], got {alpha!r}")
        clean = self.encode(frames, size)
        return self.denoise(clean, float(alpha), seed, prompt_embeds), {
            "alpha": float(alpha),
            "num_inference_steps": self.config.num_inference_steps,
            "prompt": self.config.prompt,
            "latent_space": self.adapter.name,
        }

    @torch.no_grad()
    def denoise(
        self, clean: torch.Tensor, alpha: float, seed: int = 0, prompt_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """SDEdit from the model-space latent `clean` (1, C, T, h, w) at noise level `alpha` down to 0."""
        if not 0 <= alpha <= 1:
            raise ValueError(f"`alpha` must be in [0, 1], got {alpha!r}")
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompt()[0]
        transformer = self.pipeline.transformer
        dtype = transformer.dtype
        prompt_embeds = prompt_embeds.to(self.device, dtype)
        generator = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(clean.shape, generator=generator, dtype=torch.float32)
        scheduler = self.pipeline.scheduler
        scheduler.set_timesteps(self.config.num_inference_steps, device=self.device)
        rotary = self._rotary_embeddings(clean)

        if self.flow_matching:
            sigmas = scheduler.sigmas.float().cpu()
            tail = [alpha] + [float(s) for s in sigmas if float(s) < alpha]  # the schedule below alpha
            latents = (1 - alpha) * clean + alpha * noise
            for sigma, sigma_next in zip(tail[:-1], tail[1:]):
                timestep = sigma * scheduler.config.num_train_timesteps
                velocity = self._velocity(latents, timestep, prompt_embeds, rotary)
                latents = latents + (sigma_next - sigma) * velocity  # FlowMatchEulerDiscreteScheduler.step
            return latents

        start = alpha * scheduler.config.num_train_timesteps
        timesteps = [t for t in scheduler.timesteps if float(t) <= start]
        if not timesteps or alpha == 0:
            return clean.clone()
        upstream = self.adapter.from_model(clean.to(self.device))
        upstream = scheduler.add_noise(
            upstream, self.adapter.from_model(noise).to(upstream), timesteps[:1][0].reshape(1)
        )
        for t in timesteps:
            output = self._call_transformer(upstream.to(dtype), float(t), prompt_embeds, rotary).float()
            upstream = scheduler.step(output, t, upstream, return_dict=False)[0]
        return self.adapter.to_model(upstream).float().cpu()

    def _rotary_embeddings(self, clean: torch.Tensor):
        config = self.pipeline.transformer.config
        if self.family == "cogvideox" and config.use_rotary_positional_embeddings:
            scale = self.pipeline.vae_scale_factor_spatial
            return self.pipeline._prepare_rotary_positional_embeddings(
                clean.shape[-2] * scale, clean.shape[-1] * scale, clean.shape[2], self.device
            )
        return None

    def _velocity(self, latents: torch.Tensor, timestep: float, prompt_embeds, rotary) -> torch.Tensor:
        upstream = self.adapter.from_model(latents).to(self.device, self.pipeline.transformer.dtype)
        output = self._call_transformer(upstream, timestep, prompt_embeds, rotary)
        return self.adapter.to_model(output.float()).cpu()

    def _call_transformer(self, upstream: torch.Tensor, timestep: float, prompt_embeds, rotary) -> torch.Tensor:
        pipe = self.pipeline
        transformer = pipe.transformer
        t = torch.full((upstream.shape[0],), timestep, device=self.device)
        if self.family == "wan":
            boundary = getattr(pipe.config, "boundary_ratio", None)
            if boundary is not None and getattr(pipe, "transformer_2", None) is not None:
                if timestep < boundary * pipe.scheduler.config.num_train_timesteps:
                    transformer = pipe.transformer_2
            return transformer(
                hidden_states=upstream, timestep=t, encoder_hidden_states=prompt_embeds, return_dict=False
            )[0]
        ofs = None if getattr(transformer.config, "ofs_embed_dim", None) is None else upstream.new_full((1,), 2.0)
        return transformer(
            hidden_states=upstream,
            encoder_hidden_states=prompt_embeds,
            timestep=t.long(),
            ofs=ofs,
            image_rotary_emb=rotary,
            return_dict=False,
        )[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Model-space latents (1, C, T', h, w) -> uint8 frames (T, H, W, 3) through the upstream VAE."""
        vae = self.pipeline.vae
        return tensor_to_frames(self.adapter.decode(vae, latents.to(vae.device, vae.dtype)))
