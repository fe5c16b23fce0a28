"""Geometric self-ensemble (EDSR): run the stage on flips / transposes of the input and average the outputs.

A model that is not exactly equivariant to flips and transposes makes different errors on each transformed input;
transformed back, their mean is better than any one run. The 8 transforms are the symmetries of a rectangle
(the dihedral group D4); they act on the last two dims (H, W) of a tensor, so the same helpers transform
(B, C, T, H, W) videos and (B, T, C, H, W) frames.
"""

from __future__ import annotations

import math
from typing import Any

import torch

NUM_TRANSFORMS = 8


def _check_index(index: int) -> None:
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < NUM_TRANSFORMS:
        raise ValueError(f"`index` must be an int in [0, {NUM_TRANSFORMS}), got {index!r}")


def swaps_height_width(index: int) -> bool:
    """Whether the `index`-th transform swaps H and W (the transposing half of the group)."""
    _check_index(index)
    return bool(index & 4)


def dihedral_transform(video: torch.Tensor, index: int, inverse: bool = False) -> torch.Tensor:
    """The `index`-th (0-7) of the 8 flips / transposes of `video` over its last two dims (H, W), or its inverse.

    Bit 1 flips left-right, bit 2 upside down, bit 4 swaps H and W (after the flips). Each step is its own inverse,
    so the inverse applies them in reverse order. Index 0 is the identity (`video` itself); the others return
    contiguous tensors."""
    _check_index(index)
    steps = []
    if index & 1:
        steps.append(lambda x: x.flip(-1))
    if index & 2:
        steps.append(lambda x: x.flip(-2))
    if index & 4:
        steps.append(lambda x: x.transpose(-2, -1))
    for step in reversed(steps) if inverse else steps:
        video = step(video)
    return video.contiguous() if index else video


def latent_dihedral_transform(
    latents: torch.Tensor, index: int, latent_space: str | None, inverse: bool = False
) -> torch.Tensor:
    """`dihedral_transform` of the picture, done on its (B, C, ..., h, w) latents, for the latent spaces where it is
    exact: `space_to_depth` (C = 3 * f * f channels, channel c * f * f + i * f + j holding pixel (f y + i, f x + j) of
    colour c). Flipping or transposing the picture flips or transposes the latent grid and, in the same way, each
    colour's f x f block of pixel offsets, which is a permutation of the channels. A learned VAE's channels do not
    move with the picture: any other `latent_space` is refused."""
    if latent_space != "space_to_depth":
        raise ValueError(
            "flipping / transposing latents is exact only in the space_to_depth latent space (a learned VAE's "
            f"channels do not move with the picture): `latent_space` must be 'space_to_depth', got {latent_space!r}"
        )
    _check_index(index)
    if index == 0:
        return latents
    channels = latents.shape[1]
    factor = math.isqrt(channels // 3)
    if latents.ndim < 4 or 3 * factor**2 != channels:
        raise ValueError(
            "`latents` must be (B, C, ..., h, w) space_to_depth latents with C = 3 * factor**2 channels, got shape "
            f"{tuple(latents.shape)}"
        )
    offsets = torch.arange(channels, device=latents.device).reshape(3, factor, factor)
    permutation = dihedral_transform(offsets, index, inverse).reshape(channels)
    return dihedral_transform(latents, index, inverse).index_select(1, permutation)


def generator_for_run(
    generator: torch.Generator | list[torch.Generator] | None, run: int
) -> torch.Generator | list[torch.Generator] | None:
    """The randomness of run `run` of an ensemble: run 0 uses `generator` as given, run k >= 1 a fresh generator
    seeded `generator.initial_seed() + k` on the same device (each element of a list likewise), so run k equals a
    single run seeded seed + k. Without a generator every run draws from the global RNG in turn."""
    if run == 0 or generator is None:
        return generator
    if isinstance(generator, list):
        return [generator_for_run(g, run) for g in generator]
    return torch.Generator(device=generator.device).manual_seed(generator.initial_seed() + run)


def check_self_ensemble(self_ensemble: int, video: Any, output_type: str, latents: torch.Tensor | None) -> None:
    """The self-ensemble transforms pixels and averages decoded frames, each run with its own noise."""
    if (
        isinstance(self_ensemble, bool)
        or not isinstance(self_ensemble, int)
        or not 1 <= self_ensemble <= NUM_TRANSFORMS
    ):
        raise ValueError(
            f"`self_ensemble` must be an int in [1, {NUM_TRANSFORMS}] (runs on the first N flips / transposes), "
            f"got {self_ensemble!r}"
        )
    if self_ensemble == 1:
        return
    if video is None:
        raise ValueError(
            f"`self_ensemble={self_ensemble}` flips and transposes pixels: pass `video`, not `lr_latents` (latent "
            "channels do not flip with the picture)"
        )
    if output_type == "latent":
        raise ValueError(
            f"`self_ensemble={self_ensemble}` averages decoded frames: use output_type 'np', 'pt' or 'pil', not 'latent'"
        )
    if latents is not None:
        raise ValueError(f"`self_ensemble={self_ensemble}` draws every run's own initial noise: do not pass `latents`")
