"""Metrics against independent naive references: explicit loops over pixels and windows, hand-made flows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cascade_vsr.core.metrics import (
    consistency_mask,
    psnr,
    relative_warping_error,
    rgb_to_luma,
    ssim,
    ssim_map,
    warp,
    warp_residual,
    warping_error,
)


def _video(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)


def test_psnr_by_hand():
    pred, target = _video(2, 5, 6, seed=1), _video(2, 5, 6, seed=2)
    for t in range(2):
        diffs = [float(a) - float(b) for a, b in zip(pred[t].ravel().tolist(), target[t].ravel().tolist())]
        mse = sum(d * d for d in diffs) / len(diffs)
        assert psnr(pred, target)[t].item() == pytest.approx(10 * math.log10(255**2 / mse), rel=1e-12)
    assert torch.isinf(psnr(pred, pred)).all()


def test_luma_is_bt601_studio_range():
    frames = np.array([[[[0, 0, 0], [255, 255, 255], [255, 0, 0]]]], dtype=np.uint8)
    luma = rgb_to_luma(frames)[0, 0]
    assert luma.tolist() == pytest.approx([16.0, 235.0, 16 + 65.481])


def _naive_ssim(x: np.ndarray, y: np.ndarray, size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """SSIM map of two 2D luma images with an explicit loop over every window."""
    offsets = np.arange(size) - size // 2
    g = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))
    g /= g.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    out = np.zeros((x.shape[0] - size + 1, x.shape[1] - size + 1))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            a, b = x[i : i + size, j : j + size], y[i : i + size, j : j + size]
            mu_a, mu_b = (g * a).sum(), (g * b).sum()
            var_a, var_b = (g * (a - mu_a) ** 2).sum(), (g * (b - mu_b) ** 2).sum()
            cov = (g * (a - mu_a) * (b - mu_b)).sum()
            out[i, j] = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return out


def test_ssim_matches_a_windowed_loop():
    target = _video(2, 15, 17, seed=3)
    noise = np.random.default_rng(4).integers(-40, 41, size=target.shape)
    pred = np.clip(target.astype(int) + noise, 0, 255).astype(np.uint8)
    fast = ssim_map(pred, target)
    assert fast.shape == (2, 5, 7)
    for t in range(2):
        y_pred = pred[t].astype(np.float64) @ np.array([65.481, 128.553, 24.966]) / 255 + 16
        y_target = target[t].astype(np.float64) @ np.array([65.481, 128.553, 24.966]) / 255 + 16
        np.testing.assert_allclose(fast[t].numpy(), _naive_ssim(y_pred, y_target), rtol=1e-9, atol=1e-12)
    per_frame = ssim(pred, target)
    np.testing.assert_allclose(per_frame.numpy(), fast.mean(dim=(1, 2)).numpy())
    assert (per_frame < 0.99).all()
    np.testing.assert_allclose(ssim(target, target).numpy(), 1.0, rtol=0, atol=1e-12)


def _naive_bilinear(image: np.ndarray, x: float, y: float) -> np.ndarray:
    x0, y0 = int(math.floor(x)), int(math.floor(y))
    x1, y1 = min(x0 + 1, image.shape[1] - 1), min(y0 + 1, image.shape[0] - 1)
    fx, fy = x - x0, y - y0
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def test_warp_matches_naive_bilinear_sampling():
    rng = np.random.default_rng(5)
    frames = rng.random((2, 3, 6, 7))
    flow = rng.uniform(-2, 2, size=(2, 6, 7, 2))
    warped, inside = warp(torch.from_numpy(frames), torch.from_numpy(flow))
    for n in range(2):
        for i in range(6):
            for j in range(7):
                x, y = j + flow[n, i, j, 0], i + flow[n, i, j, 1]
                assert inside[n, i, j].item() == (0 <= x <= 6 and 0 <= y <= 5)
                if inside[n, i, j]:
                    expected = _naive_bilinear(frames[n].transpose(1, 2, 0), x, y)
                    np.testing.assert_allclose(warped[n, :, i, j].numpy(), expected, rtol=1e-12)


def test_warping_error_zero_for_static_video_and_exact_translation():
    frame = _video(1, 12, 16, seed=6)
    static = np.repeat(frame, 4, axis=0)
    assert warping_error(static, np.zeros((3, 12, 16, 2))) == pytest.approx(0.0, abs=1e-9)

    dx, dy = 2, -1  # content moves right by 2 and up by 1 each frame: frame_t(x) = frame_{t-1}(x - d)
    moving = np.stack([np.roll(frame[0], shift=(t * dy, t * dx), axis=(0, 1)) for t in range(4)])
    backward = np.broadcast_to(np.array([-dx, -dy], dtype=np.float64), (3, 12, 16, 2)).copy()
    assert warping_error(moving, backward) == pytest.approx(0.0, abs=1e-9)
    wrong = warping_error(moving, np.zeros_like(backward))
    assert wrong > 10  # random content: the unwarped difference is large
    # the translation's forward flow is +d: consistent wherever the source (x - 2, y + 1) lies inside
    forward = -backward
    mask = consistency_mask(backward, forward)
    assert mask[:, :-1, 2:].all() and not mask[:, -1].any() and not mask[:, :, :2].any()
    assert warping_error(moving, backward, mask) == pytest.approx(0.0, abs=1e-9)


def test_warping_error_by_hand_and_occlusion_mask():
    frames = _video(2, 4, 5, seed=7)
    flow = np.zeros((1, 4, 5, 2))
    mask = np.zeros((1, 4, 5), dtype=bool)
    mask[0, 1:3, 2:4] = True
    expected = np.abs(frames[1].astype(float) - frames[0]).mean(-1)[1:3, 2:4].mean()
    assert warping_error(frames, flow, mask) == pytest.approx(expected, rel=1e-12)
    # inconsistent round trip (backward +1, forward +1 instead of -1) is occluded, small ones pass
    backward = np.full((1, 8, 8, 2), 1.0)
    assert not consistency_mask(backward, backward)[0, :7, :7].any()
    assert consistency_mask(backward, -backward + 0.3)[0, :7, :7].all()


def test_relative_warping_error_by_hand_and_its_reference_points():
    frames, truth = _video(3, 4, 5, seed=8), _video(3, 4, 5, seed=9)
    flow = np.zeros((2, 4, 5, 2))
    mask = np.ones((2, 4, 5), dtype=bool)
    mask[1, :2] = False
    error = frames.astype(float) - truth
    expected = np.concatenate(
        [np.abs(error[1] - error[0]).mean(-1).ravel(), np.abs(error[2] - error[1]).mean(-1)[2:].ravel()]
    ).mean()
    assert relative_warping_error(frames, truth, flow, mask) == pytest.approx(expected, rel=1e-12)
    assert relative_warping_error(truth, truth, flow) == 0.0  # the ground truth itself
    # a constant offset from the ground truth does not flicker; per-frame noise does
    steady = np.minimum(truth, 250)
    assert relative_warping_error(steady + 3, steady, flow) == 0.0
    assert relative_warping_error(frames, truth, flow) > 10


def test_warp_residual_is_the_per_pixel_map_the_warping_errors_average():
    frames = _video(3, 6, 7, seed=10)
    flow = np.zeros((2, 6, 7, 2))
    flow[1, :, :, 0] = -1.0  # frame 2 comes from one pixel to the left: column 0 has no source
    mask = np.ones((2, 6, 7), dtype=bool)
    mask[0, :3] = False
    video = torch.from_numpy(frames.astype(np.float64))
    residual, valid = warp_residual(video, torch.from_numpy(flow), mask)
    expected = np.stack([np.abs(frames[1].astype(float) - frames[0]), np.zeros((6, 7, 3))]).mean(-1)
    expected[1, :, 1:] = np.abs(frames[2, :, 1:].astype(float) - frames[1, :, :-1]).mean(-1)
    assert valid.shape == (2, 6, 7) and not valid[0, :3].any() and not valid[1, :, 0].any()
    assert valid[0, 3:].all() and valid[1, :, 1:].all()
    np.testing.assert_allclose(residual.numpy()[valid.numpy()], expected[valid.numpy()], rtol=1e-12)
    assert float(residual[valid].mean()) == pytest.approx(warping_error(frames, flow, mask), rel=1e-12)


def test_bad_inputs_name_the_argument():
    video = _video(2, 12, 12)
    with pytest.raises(ValueError, match="`pred`"):
        psnr(video.astype(np.float32), video)
    with pytest.raises(ValueError, match="same shape"):
        ssim(video, video[:1])
    with pytest.raises(ValueError, match="`window_size`"):
        ssim(video[:, :8, :8], video[:, :8, :8])
    with pytest.raises(ValueError, match="`backward_flow`"):
        warping_error(video, np.zeros((2, 12, 12, 2)))
    with pytest.raises(ValueError, match="`mask`"):
        warping_error(video, np.zeros((1, 12, 12, 2)), np.ones((1, 12, 11), dtype=bool))
    with pytest.raises(ValueError, match="same shape"):
        relative_warping_error(video, video[:, :8], np.zeros((1, 12, 12, 2)))
