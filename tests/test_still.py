"""cascade_vsr.degradations.still: still shots of one frame with per-frame white + low-pass noise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cascade_vsr.degradations.still import LOWPASS_SIGMA, still_clip

GREY = np.full((96, 128, 3), 128, np.uint8)  # far from 0 and 255: no clipping


def noise_of(video: np.ndarray) -> np.ndarray:
    return video.astype(np.float64) - 128.0


def test_still_clip_noise_has_the_requested_std_and_spectrum():
    """Each half has std `noise_std`: the sum has std sqrt(2) * noise_std. Neighbouring pixels are correlated only
    through the low-pass half, whose correlation at a lag of 1 px is exp(-1 / (4 sigma^2)) for a Gaussian blur of
    white noise: the sum's correlation is half that."""
    noise_std = 4.0
    noise = noise_of(still_clip(GREY, 6, noise_std, np.random.default_rng(0)))
    rounding = 1 / 12  # variance of rounding to integers
    assert math.isclose(noise.var(), 2 * noise_std**2 + rounding, rel_tol=0.05)
    expected = math.exp(-1 / (4 * LOWPASS_SIGMA**2)) / 2
    for neighbour in (noise[:, :, 1:] * noise[:, :, :-1], noise[:, 1:] * noise[:, :-1]):
        assert math.isclose(neighbour.mean() / noise.var(), expected, abs_tol=0.03)
    # fresh noise per frame: consecutive frames are uncorrelated
    assert abs((noise[1:] * noise[:-1]).mean() / noise.var()) < 0.02
    assert abs(noise.mean()) < 0.2  # the low-pass half leaves ~8k independent samples: std of the mean 0.05


def test_still_clip_keeps_the_frame_and_is_reproducible():
    frame = np.random.default_rng(1).integers(30, 220, (40, 56, 3), dtype=np.uint8)
    video = still_clip(frame, 5, 0.25, np.random.default_rng(2))
    assert video.shape == (5, 40, 56, 3) and video.dtype == np.uint8
    assert np.abs(video.astype(np.int16) - frame).max() <= 3
    np.testing.assert_array_equal(video, still_clip(frame, 5, 0.25, np.random.default_rng(2)))
    assert not np.array_equal(video[0], video[1])
    np.testing.assert_array_equal(still_clip(frame, 3, 0.0, np.random.default_rng(0)), np.stack([frame] * 3))
    bright = still_clip(np.full((8, 8, 3), 255, np.uint8), 2, 5.0, np.random.default_rng(0))
    assert bright.max() == 255 and bright.min() < 255  # clipped, not wrapped


@pytest.mark.parametrize(
    "frame, num_frames, noise_std, match",
    [
        (np.zeros((2, 8, 8, 3), np.uint8), 3, 0.25, r"`frame`.*\(H, W, 3\)"),
        (np.zeros((8, 8, 3), np.float32), 3, 0.25, r"`frame`.*uint8"),
        (np.zeros((8, 8, 4), np.uint8), 3, 0.25, r"`frame`.*3 channels"),
        ([[0]], 3, 0.25, r"`frame`.*list"),
        (GREY, 0, 0.25, r"`num_frames`"),
        (GREY, 2.0, 0.25, r"`num_frames`"),
        (GREY, 3, -0.1, r"`noise_std`"),
        (GREY, 3, float("nan"), r"`noise_std`"),
    ],
)
def test_still_clip_bad_inputs(frame, num_frames, noise_std, match):
    with pytest.raises(ValueError, match=match):
        still_clip(frame, num_frames, noise_std, np.random.default_rng(0))
