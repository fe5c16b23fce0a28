"""The colour fixes against hand-written NumPy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade_vsr.core.color import COLOR_FIXES, adain_color_fix, wavelet_color_fix, wavelet_low_pass


def _videos(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    video = torch.randn(2, 3, 3, 12, 20, generator=generator, dtype=torch.float64)
    reference = torch.randn(2, 3, 3, 12, 20, generator=generator, dtype=torch.float64) * 0.3 + 0.5
    return video, reference


def _reference_low_pass(frames: np.ndarray, levels: int) -> np.ndarray:
    """(..., H, W): each level averages the 3 x 3 neighbours at distance 2**level with weights (1, 2, 1) x (1, 2, 1)
    / 16, reading past the border the nearest edge pixel (index clipping)."""
    height, width = frames.shape[-2:]
    rows, cols = np.arange(height), np.arange(width)
    weights = {-1: 0.25, 0: 0.5, 1: 0.25}
    for level in range(levels):
        step = 2**level
        out = np.zeros_like(frames)
        for dy, wy in weights.items():
            for dx, wx in weights.items():
                neighbour = frames[..., np.clip(rows + dy * step, 0, height - 1), :][
                    ..., np.clip(cols + dx * step, 0, width - 1)
                ]
                out += wy * wx * neighbour
        frames = out
    return frames


def test_adain_matches_the_references_mean_and_std_per_frame_and_channel():
    video, reference = _videos()
    fixed = adain_color_fix(video, reference).numpy()
    v, r = video.numpy(), reference.numpy()
    # per (b, c, t) frame: the reference's mean and (unbiased) std, the video's pattern
    np.testing.assert_allclose(fixed.mean(axis=(-2, -1)), r.mean(axis=(-2, -1)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(fixed.std(axis=(-2, -1), ddof=1), r.std(axis=(-2, -1), ddof=1), rtol=1e-4, atol=0)
    standardized = (v - v.mean(axis=(-2, -1), keepdims=True)) / v.std(axis=(-2, -1), ddof=1, keepdims=True)
    expected = standardized * r.std(axis=(-2, -1), ddof=1, keepdims=True) + r.mean(axis=(-2, -1), keepdims=True)
    np.testing.assert_allclose(fixed, expected, rtol=0, atol=1e-4)


def test_low_pass_equals_the_reference_and_keeps_a_constant():
    video, _ = _videos()
    frames = video[:, :, 0]  # (N, C, H, W)
    for levels in (1, 3, 5):  # dilations past the 12-pixel height reach across the whole frame
        np.testing.assert_allclose(
            wavelet_low_pass(frames, levels).numpy(), _reference_low_pass(frames.numpy(), levels), rtol=0, atol=1e-12
        )
    constant = torch.full((2, 3, 12, 20), 0.7, dtype=torch.float64)
    torch.testing.assert_close(wavelet_low_pass(constant, 5), constant, rtol=0, atol=1e-15)


def test_wavelet_fix_swaps_the_low_frequencies():
    video, reference = _videos()
    fixed = wavelet_color_fix(video, reference, levels=4).numpy()
    v, r = video.numpy(), reference.numpy()
    # per frame: video - low_pass(video) + low_pass(reference), the (b, c, t) layout kept
    expected = v - _reference_low_pass(v, 4) + _reference_low_pass(r, 4)
    np.testing.assert_allclose(fixed, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(wavelet_color_fix(video, video), video, rtol=0, atol=1e-12)


def test_wavelet_fix_keeps_a_checkerboard_and_takes_a_flat_colour():
    # A checkerboard has only high frequencies (the binomial blur removes it) and a flat reference only low ones.
    rows, cols = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    checker = ((rows + cols) % 2 * 2 - 1).float().expand(2, 3, 3, 16, 16)
    fixed = wavelet_color_fix(checker, torch.full_like(checker, 0.7))
    torch.testing.assert_close(fixed.mean((-2, -1)), torch.full((2, 3, 3), 0.7), rtol=0, atol=0.05)
    torch.testing.assert_close(fixed[..., 4:-4, 4:-4], (checker + 0.7)[..., 4:-4, 4:-4], rtol=0, atol=0.05)


@pytest.mark.parametrize("name", sorted(COLOR_FIXES))
def test_named_fixes_keep_the_shape(name):
    video, reference = _videos()
    assert COLOR_FIXES[name](video, reference).shape == video.shape
