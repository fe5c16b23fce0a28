"""Tiny training recipes shared by the training tests and benchmarks/training.py."""

from __future__ import annotations

from pathlib import Path

import torch

from cascade_vsr import CascadeVSRPipeline, SpaceToDepthAutoencoder

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
    velocity_sign: float = 1.0,
) -> torch.Tensor:
    """Sample HR latents of `size` with CascadeVSRPipeline loaded from a training export (pixel-space latents:
    the SpaceToDepthAutoencoder is the VAE): upsample, noise-augment once, N Euler steps of the velocity.
    `velocity_sign=-1` flips the transformer's output, simulating a sign bug (the learning test must catch it)."""
    pipe = CascadeVSRPipeline.from_pretrained(export_dir, vae=SpaceToDepthAutoencoder(), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if velocity_sign != 1.0:
        pipe.transformer.register_forward_hook(lambda module, args, output: (velocity_sign * output[0],))
    factor = pipe.vae.config.factor
    return pipe(
        lr_latents=lr_latents,
        height=size[0] * factor,
        width=size[1] * factor,
        num_inference_steps=num_steps,
        noise_aug_strength=noise_level,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
    ).frames


# The learning recipe (tests/test_training_learn.py, benchmarks/training.py): pairs at a 4x LR ratio, one latent
# frame, 2x4 LR crops (8x16 HR latents), patch 1 (a 2x2 patch would squeeze 4 x 48 values through the 96-wide
# tiny model), a high learning rate with cosine decay, and a nearly clean condition (noise augmentation in
# [0, 0.05] instead of the recipe's [0.3, 0.6]): a tiny model has to get somewhere in a few hundred CPU steps.
LEARN_DATA = dict(num_clips=4, num_frames=4, hr_size=(64, 128), lr_size=(16, 32))
LEARN_CROP = (2, 4)
LEARN_ARGS = [
    "--crop_size", str(LEARN_CROP[0]), str(LEARN_CROP[1]),
    "--num_latent_frames", "1",
    "--train_batch_size", "4",
    "--patch_size", "1", "1", "1",
    "--attention_head_dim", "24",
    "--ffn_dim", "192",
    "--learning_rate", "3e-3",
    "--lr_scheduler", "cosine",
    "--lr_warmup_steps", "10",
    "--ema_decay", "0.95",
    "--timestep_sampler", "uniform",
    "--noise_aug_min", "0.0",
    "--noise_aug_max", "0.05",
    "--checkpointing_steps", "100000",
]  # fmt: skip
