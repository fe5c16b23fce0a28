"""Tiny training recipes shared by the training tests and benchmarks/training.py."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from cascade_vsr import CascadeVSRTransformer3DModel, LatentUpsampler3D
from cascade_vsr.flow import noise_augment

from ._pairs import LATENT_CHANNELS

TINY_MODEL_ARGS = [
    "--latent_channels", str(LATENT_CHANNELS),
    "--num_layers", "2",
    "--num_attention_heads", "4",
    "--attention_head_dim", "16",
    "--ffn_dim", "128",
    "--text_dim", "16",
    "--upsampler_hidden_channels", "32",
    "--upsampler_num_blocks", "1",
]  # fmt: skip


def tiny_args(data_dir: str | Path, output_dir: str | Path, steps: int, *extra: str) -> list[str]:
    """CLI-style overrides of a tiny run (fp32, no trackers, frequent logging)."""
    return [
        *TINY_MODEL_ARGS,
        "--data_dir", str(data_dir),
        "--output_dir", str(output_dir),
        "--max_train_steps", str(steps),
        "--report_to", "none",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


@torch.no_grad()
def euler_sample(
    export_dir: str | Path,
    lr_latents: torch.Tensor,
    size: tuple[int, int],
    num_steps: int = 12,
    noise_level: float = 0.3,
    seed: int = 0,
) -> torch.Tensor:
    """Sample HR latents with diffusers' FlowMatchEulerDiscreteScheduler directly (CascadeVSRPipeline is not
    on this branch yet): upsample, noise-augment at a fixed level, N Euler steps of the velocity."""
    upsampler = LatentUpsampler3D.from_pretrained(export_dir, subfolder="upsampler").eval()
    transformer = CascadeVSRTransformer3DModel.from_pretrained(export_dir, subfolder="transformer").eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(export_dir, subfolder="scheduler")
    generator = torch.Generator().manual_seed(seed)
    condition = noise_augment(upsampler(lr_latents, size=size), noise_level, generator=generator)
    latents = torch.randn(condition.shape, generator=generator)
    scheduler.set_timesteps(num_steps)
    for t in scheduler.timesteps:
        velocity = transformer(latents, condition, timestep=t.expand(latents.shape[0]), noise_aug_level=noise_level)
        latents = scheduler.step(velocity.sample, t, latents).prev_sample
    return latents
