"""Colour fixes: give a generated video the colours of a reference (the upsampled input) and keep its detail.

Samplers drift in colour and shading; both fixes take the low-order statistics from the reference. They are pure
functions of (B, C, T, H, W) videos of the same shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange


def adain_color_fix(video: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Match the per-frame, per-channel mean and std of `video` to those of `reference` (adaptive instance
    normalisation): a global colour cast is removed, but a cast that varies over the frame is not."""
    dims = (-2, -1)
    mean, std = video.mean(dims, keepdim=True), video.std(dims, keepdim=True)
    ref_mean, ref_std = reference.mean(dims, keepdim=True), reference.std(dims, keepdim=True)
    return (video - mean) / (std + eps) * ref_std + ref_mean


def wavelet_low_pass(frames: torch.Tensor, levels: int) -> torch.Tensor:
    """Low-frequency part of (N, C, H, W) frames: `levels` a-trous passes of the 3x3 binomial blur
    [1, 2, 1]^T [1, 2, 1] / 16 with dilation 1, 2, 4, ... and replicate padding (SeedVR's wavelet colour fix).

    The blur's weights sum to one, so a constant frame passes unchanged."""
    channels = frames.shape[1]
    kernel = torch.tensor([1.0, 2.0, 1.0], device=frames.device, dtype=frames.dtype)
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(channels, 1, 3, 3)
    for level in range(levels):  # a handful of levels, each one convolution of every frame
        dilation = 2**level
        padded = F.pad(frames, (dilation,) * 4, mode="replicate")
        frames = F.conv2d(padded, kernel, groups=channels, dilation=dilation)
    return frames


def wavelet_color_fix(video: torch.Tensor, reference: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Keep the high frequencies of `video` and take the low frequencies (colour, shading) of `reference`:
    `video - low_pass(video) + low_pass(reference)`, frame by frame. Unlike AdaIN it also fixes a cast that varies
    over the frame."""
    batch = video.shape[0]
    frames, ref = (rearrange(x, "b c t h w -> (b t) c h w") for x in (video, reference))
    fixed = frames - wavelet_low_pass(frames, levels) + wavelet_low_pass(ref, levels)
    return rearrange(fixed, "(b t) c h w -> b c t h w", b=batch)


# the pipeline's `color_fix` names
COLOR_FIXES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "wavelet": wavelet_color_fix,
    "adain": adain_color_fix,
}
