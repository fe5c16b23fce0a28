"""Streaming super-resolution with a block-causal stage (InfVSR): LR latent chunks in, HR chunks out, at a memory
that does not grow with the length of the video.

The transformer's self-attention is block-causal (`causal_chunk_frames` latent frames per chunk, the previous
`causal_cache_chunks` chunks visible), so chunk k depends on chunks k - m .. k only and its keys and values are
all that later chunks need (`CausalKVCache`). The other parts are made to give exactly the whole-clip numbers:

- the upsampler's convolutions see `temporal_radius` frames on each side; `UpsamplerStream` keeps each
  convolution's last input frames and computes every frame once, so a chunk is ready once that many later LR frames
  have arrived (or the input ended);
- a multi-step model denoises each chunk through all its steps before the next one, with one cache per step: at
  step i the offline form lets chunk k see the earlier chunks' step-i latents, so the cache of step i holds their
  step-i keys and values (memory: steps x m chunks);
- decoding is per chunk through `adapter.stream_decoder`: exact for a VAE without temporal context
  (space-to-depth) and for Wan's causal VAE, whose causal-conv cache is carried from chunk to chunk; other VAEs are
  refused (`output_type="latent"` streams their latents).

Noise is drawn per chunk in a fixed order (the condition's noise, then the initial noise; with frame-correlated
noise the shared image once, first), skipping a draw whose weight is 0, see `StreamingNoise`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from cascade_vsr.core.flow import noise_augment
from cascade_vsr.models.causal_attention import CausalKVCache
from cascade_vsr.pipelines.sampling import guided_velocity

FORWARD_TOKEN_BUDGET = 32_768


def auto_chunks_per_forward(chunk_tokens: int, token_budget: int = FORWARD_TOKEN_BUDGET) -> int:
    """Chunks per streamed forward pass for throughput: as many as keep a pass within `token_budget` tokens, at
    least one. A pass has a fixed cost (hundreds of small operators, about 20 ms on 2 CPU cores) that more chunks
    spread over more frames, while its activations grow with them; past about 32k tokens they leave the caches and
    more chunks stop paying (README, "Streaming")."""
    if chunk_tokens < 1:
        raise ValueError(f"`chunk_tokens` must be >= 1, got {chunk_tokens}")
    return max(1, token_budget // chunk_tokens)


@dataclass
class StreamingNoise:
    """The stream's noise, drawn per chunk from one generator: the shared image of frame-correlated noise once,
    first (when the correlation is above 0); then for each chunk the condition's noise (when its strength is above
    0) and the chunk's own initial noise (when the correlation is below 1), each `randn` of the chunk's shape.

    A draw whose weight is 0 is skipped: it cannot change the output, and a one-step model with shared noise and a
    clean condition (the demo model) would otherwise draw two unused noise images per frame."""

    noise_frame_correlation: float
    noise_aug_strength: float
    generator: torch.Generator | None
    shared: torch.Tensor | None = None

    def _randn(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=device, dtype=torch.float32)

    def chunk(self, shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(condition noise, None when the condition is not noised; initial noise) of a (B, C, Tc, H, W) chunk."""
        correlation = self.noise_frame_correlation
        if correlation > 0 and self.shared is None:
            self.shared = self._randn((*shape[:2], 1, *shape[3:]), device)
        condition_noise = self._randn(shape, device) if self.noise_aug_strength > 0 else None
        if correlation == 1:
            return condition_noise, self.shared.expand(shape)
        independent = self._randn(shape, device)
        if correlation == 0:
            return condition_noise, independent
        return condition_noise, correlation**0.5 * self.shared + (1 - correlation) ** 0.5 * independent


def denoise_chunk(
    pipe,
    condition: torch.Tensor,
    initial: torch.Tensor,
    caches: list[CausalKVCache],
    text: tuple[torch.Tensor | None, torch.Tensor | None],
    noise_aug_level: torch.Tensor,
    guidance_scale: float | None,
    sigmas: torch.Tensor,
) -> torch.Tensor:
    """All the steps of one chunk: step i attends through `caches[i]` (the earlier chunks at step i). With a
    `guidance_scale` the text holds the unconditional half first (CFG, batched)."""
    prompt_embeds, prompt_attention_mask = text
    latents = initial
    transformer = pipe.transformer
    for i, cache in enumerate(caches):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        velocity = guided_velocity(
            transformer,
            latents,
            condition,
            (sigma * 1000).to(latents.device),
            guidance_scale,
            noise_aug_level=noise_aug_level,
            encoder_hidden_states=prompt_embeds,
            encoder_attention_mask=prompt_attention_mask,
            kv_cache=cache,
        )
        latents = latents + (sigma_next - sigma) * velocity  # FlowMatchEulerDiscreteScheduler.step
    return latents


def stream_chunks(
    pipe,
    lr_chunks: Iterable[torch.Tensor],
    latent_size: tuple[int, int],
    sigmas: torch.Tensor,
    text: tuple[torch.Tensor | None, torch.Tensor | None],
    guidance_scale: float | None,
    noise_aug_strength: float,
    noise: StreamingNoise,
    chunks_per_forward: int = 1,
) -> Iterator[torch.Tensor]:
    """HR latent pieces (B, C, T, H, W) of model-space LR latent chunks of any length, in order, `chunks_per_forward`
    of the model's chunks per forward pass (the last piece may be shorter); `guidance_scale` None runs without CFG."""
    transformer = pipe.transformer
    chunk_frames = transformer.config.causal_chunk_frames
    piece_frames = chunk_frames * chunks_per_forward
    caches = [CausalKVCache(transformer.config.causal_cache_chunks) for _ in range(len(sigmas) - 1)]
    upsampler = pipe.upsampler.stream(latent_size)
    noise_level = None

    def run(upsampled: torch.Tensor) -> torch.Tensor:
        nonlocal noise_level
        # drawn model chunk by model chunk, so the noise does not depend on how many chunks a forward takes
        draws = [noise.chunk(tuple(chunk.shape), upsampled.device) for chunk in upsampled.split(chunk_frames, dim=2)]
        condition_noises, initials = zip(*draws)
        initial = torch.cat(initials, dim=2)
        condition = upsampled
        if condition_noises[0] is not None:
            condition = noise_augment(upsampled, noise_aug_strength, noise=torch.cat(condition_noises, dim=2))
        sigma_start = float(sigmas[0])
        if sigma_start < 1.0:
            initial = (1 - sigma_start) * upsampled + sigma_start * initial
        batch = upsampled.shape[0] * (1 if guidance_scale is None else 2)
        if noise_level is None:
            noise_level = torch.full((batch,), float(noise_aug_strength), device=upsampled.device)
        return denoise_chunk(pipe, condition, initial, caches, text, noise_level, guidance_scale, sigmas)

    for lr in lr_chunks:
        upsampler.push(lr)
        while upsampler.available >= piece_frames:
            yield run(upsampler.pop(piece_frames).float())
    upsampler.end()
    while upsampler.available:
        yield run(upsampler.pop(piece_frames).float())
