"""Flow-based and classic degradations, quality filters."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from cascade_vsr.core.optical_flow import compute_flow
from cascade_vsr.degradations.classic import ClassicDegradation, ClassicDegradationConfig, blur_kernels, encode_video
from cascade_vsr.degradations.flow_based import FlowBasedDegradation, FlowDegradationConfig, line_kernel
from cascade_vsr.degradations.quality import QualityFilter, laplacian_variance


def smooth_texture(height, width, seed=0, sigma=2.0):
    rng = np.random.default_rng(seed)
    noise = rng.random((height, width, 3)).astype(np.float32)
    return (cv2.GaussianBlur(noise, (0, 0), sigma) - 0.5) * 4 + 0.5


def translating(num_frames=4, height=64, width=96, shift=4, seed=0):
    """A texture moving right by `shift` px per frame on a static textured background (left half static)."""
    base = smooth_texture(height, width + shift * num_frames, seed)
    frames = np.stack(
        [base[:, shift * (num_frames - t) : shift * (num_frames - t) + width] for t in range(num_frames)]
    )
    return np.clip(frames * 255, 0, 255).astype(np.uint8)


def separable_translating(num_frames=4, height=64, width=96, shift=4):
    """I(x, y) = f(x) + g(y) moving along x: a blur along x leaves the y structure exactly intact."""
    rng = np.random.default_rng(1)
    fx = cv2.GaussianBlur(rng.random((1, width + shift * num_frames)).astype(np.float32), (0, 0), 2.0)[0]
    gy = cv2.GaussianBlur(rng.random((height, 1)).astype(np.float32), (0, 0), 2.0)[:, 0]
    fx, gy = (fx - fx.mean()) / fx.std() * 40, (gy - gy.mean()) / gy.std() * 40
    frames = [
        gy[:, None] + fx[None, shift * (num_frames - t) : shift * (num_frames - t) + width] + 128
        for t in range(num_frames)
    ]
    return np.repeat(np.clip(np.stack(frames), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


# ---------------------------------------------------------------- flow-based


def test_flow_static_video_is_unchanged_exactly():
    frames = np.repeat(translating(1)[:1], 5, axis=0)
    out = FlowBasedDegradation()(frames, seed=3)
    assert out.dtype == np.uint8 and out.shape == frames.shape
    np.testing.assert_array_equal(out, frames)


def test_flow_matches_translation():
    flow = compute_flow(translating(3, shift=3), "medium")
    assert flow.shape == (2, 64, 96, 2)
    assert abs(np.median(flow[..., 16:-16, 16:-16, 0]) + 3) < 0.5  # current pixel came from 3 px to the left
    assert abs(np.median(flow[..., 1])) < 0.5


def test_flow_blur_is_along_motion():
    frames = separable_translating()
    config = FlowDegradationConfig(
        num_ellipses=(0, 0),
        blur_strength=(1.0, 1.0),
        full_blur_motion=4.0,
        blur_length_scale=(2.0, 2.0),
        dis_preset="medium",
    )
    out = FlowBasedDegradation(config)(frames, seed=0).astype(np.float32)
    inner = (slice(1, None), slice(8, -8), slice(8, -8))
    energy = lambda x, axis: (np.diff(x[..., 0], axis=axis)[inner] ** 2).mean()  # noqa: E731
    ratio_x = energy(out, 2) / energy(frames.astype(np.float32), 2)
    ratio_y = energy(out, 1) / energy(frames.astype(np.float32), 1)
    assert ratio_x < 0.6, ratio_x
    assert ratio_y > 0.9, ratio_y


def test_flow_colours_move_towards_previous_frame_and_static_stay():
    frames = translating(4, shift=4).astype(np.float32)
    # a moving object whose colour shifts every frame at constant luma (the flow still sees pure motion)
    delta = np.array([40.0, -20.4, 0.0], np.float32)
    moving = np.zeros(frames.shape[1:3], bool)
    moving[:, 48:] = True
    background = frames[0].copy()
    frames = np.stack([np.where(moving[..., None], f + delta * t, background) for t, f in enumerate(frames)])
    frames = np.clip(frames, 0, 255).astype(np.uint8)
    config = FlowDegradationConfig(
        blur_strength=(0.0, 0.0),
        num_ellipses=(4, 4),
        blend_strength=(0.8, 0.8),
        ellipse_axes=(0.3, 0.4),
        dis_preset="medium",
    )
    out = FlowBasedDegradation(config)(frames, seed=0).astype(np.float32)
    change = (out - frames)[1:, :, 56:-4]  # well inside the moving part
    assert (change @ delta).mean() < -50  # towards the previous frame's (earlier) colour
    static = (slice(1, None), slice(None), slice(0, 36))
    np.testing.assert_array_equal(out[static], frames[static])
    np.testing.assert_array_equal(out[0], frames[0])


def test_flow_sizes_not_multiple_of_blocks():
    frames = translating(4, height=50, width=70, shift=5)
    out = FlowBasedDegradation(FlowDegradationConfig(blend_strength=(0.8, 0.8), ellipse_axes=(0.3, 0.4)))(frames, 2)
    assert out.shape == frames.shape and out.dtype == np.uint8 and not np.array_equal(out, frames)
    static = np.repeat(frames[:1], 3, axis=0)
    np.testing.assert_array_equal(FlowBasedDegradation()(static, seed=0), static)


def test_flow_determinism():
    frames = translating(4)
    degradation = FlowBasedDegradation()
    a, b, c = degradation(frames, seed=1), degradation(frames, seed=1), degradation(frames, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, frames)


def test_line_kernel_is_a_normalized_line():
    kernel = line_kernel(5, 0.0)
    np.testing.assert_allclose(kernel.sum(), 1, rtol=1e-6)
    np.testing.assert_allclose(kernel[2], 0.2, rtol=1e-6)  # the middle row, nothing elsewhere
    assert kernel[[0, 1, 3, 4]].sum() == 0
    np.testing.assert_allclose(line_kernel(5, np.pi / 2), kernel.T, atol=1e-6)


@pytest.mark.parametrize(
    "frames, match",
    [
        (np.zeros((4, 8, 8, 3), np.float32), "dtype uint8"),
        (np.zeros((8, 8, 3), np.uint8), "4 dims"),
        (np.zeros((4, 8, 8, 4), np.uint8), "3 channels"),
        (np.zeros((1, 8, 8, 3), np.uint8), "at least 2 frames"),
        ([[0]], "numpy array"),
    ],
)
def test_flow_bad_input(frames, match):
    with pytest.raises(ValueError, match=r"`frames`.*" + match):
        FlowBasedDegradation()(frames)


def test_flow_bad_config():
    with pytest.raises(ValueError, match="dis_preset"):
        FlowDegradationConfig(dis_preset="slow")
    with pytest.raises(ValueError, match="kernel_lengths"):
        FlowDegradationConfig(kernel_lengths=(4,))


# ---------------------------------------------------------------- classic

ONLY = dict(blur_prob=0.0, resize_prob=0.0, noise_prob=0.0, jpeg_prob=0.0, video_prob=0.0)


def test_classic_gaussian_noise_variance():
    frames = np.full((3, 48, 64, 3), 128, np.uint8)
    config = ClassicDegradationConfig(
        **{**ONLY, "noise_prob": 1.0}, gaussian_noise_prob=1.0, gray_noise_prob=0.0, gaussian_sigma=(10.0, 10.0)
    )
    diff = ClassicDegradation(config)(frames, seed=0).astype(np.float32) - 128
    assert 9.0 < diff.std() < 11.0 and abs(diff.mean()) < 0.5
    assert np.abs(diff[..., 0] - diff[..., 1]).mean() > 5  # colour noise: channels differ


def test_classic_gray_and_poisson_noise():
    frames = np.full((2, 48, 64, 3), 100, np.uint8)
    config = ClassicDegradationConfig(
        **{**ONLY, "noise_prob": 1.0}, gaussian_noise_prob=0.0, gray_noise_prob=1.0, poisson_scale=(1.0, 1.0)
    )
    diff = ClassicDegradation(config)(frames, seed=0).astype(np.float32) - 100
    np.testing.assert_array_equal(diff[..., 0], diff[..., 1])  # gray noise: same on every channel
    expected = np.sqrt(100 / 255 * 256) / 256 * 255  # std of Poisson(lambda)/256, in uint8 units
    assert 0.8 * expected < diff.std() < 1.2 * expected


@pytest.mark.parametrize("kind", ["iso", "aniso", "generalized", "plateau", "sinc"])
def test_classic_blur_kernels(kind):
    ones = np.ones(2)
    kernels = blur_kernels(kind, 11, 1.5 * ones, 0.7 * ones, np.array([0.0, np.pi / 2]), 1.5, 2.0 * ones)
    assert kernels.shape == (2, 11, 11)
    np.testing.assert_allclose(kernels.sum(axis=(1, 2)), 1, rtol=1e-5)
    np.testing.assert_allclose(kernels[0], kernels[0][::-1, ::-1], atol=1e-7)  # centrally symmetric
    if kind in ("aniso", "generalized", "plateau"):
        np.testing.assert_allclose(kernels[1], kernels[0].T, atol=1e-6)  # rotation by 90 degrees
        assert kernels[0, 5].sum() > kernels[0, :, 5].sum()  # wider along x
    if kind == "iso":
        reference = np.exp(-(np.arange(-5, 6) ** 2) / (2 * 1.5**2))
        np.testing.assert_allclose(kernels[0], np.outer(reference, reference) / reference.sum() ** 2, rtol=1e-5)


def test_classic_blur_and_resize_soften():
    frames = (smooth_texture(48, 64, sigma=1.0) * 255).clip(0, 255).astype(np.uint8)[None].repeat(3, 0)
    config = ClassicDegradationConfig(
        **{**ONLY, "blur_prob": 1.0}, kernel_types=("iso",), kernel_probs=(1.0,), blur_sigma=(2.0, 2.0)
    )
    out = ClassicDegradation(config)(frames, seed=0)
    assert laplacian_variance(out) < 0.3 * laplacian_variance(frames)
    config = ClassicDegradationConfig(**{**ONLY, "resize_prob": 1.0}, resize_scale=(0.5, 0.5))
    out = ClassicDegradation(config)(frames, seed=0)
    assert out.shape == frames.shape and laplacian_variance(out) < 0.7 * laplacian_variance(frames)


def test_classic_jpeg_and_codecs_decode():
    frames = translating(5, 48, 64)
    config = ClassicDegradationConfig(**{**ONLY, "jpeg_prob": 1.0}, jpeg_quality=(20.0, 20.0))
    out = ClassicDegradation(config)(frames, seed=0)
    assert out.shape == frames.shape and 1 < np.abs(out.astype(int) - frames).mean() < 30
    for codec in ("libx264", "mpeg4"):
        decoded = encode_video(frames[:, :47, :63], codec, 24.0, crf=30, bit_rate=200_000)
        assert decoded.shape == (5, 47, 63, 3)
        psnr = 10 * np.log10(255**2 / ((decoded.astype(float) - frames[:, :47, :63]) ** 2).mean())
        assert 15 < psnr < 60, (codec, psnr)


def test_classic_orders_and_determinism():
    frames = translating(4, 48, 64)
    one, two = ClassicDegradation(order=1), ClassicDegradation(order=2)
    np.testing.assert_array_equal(one(frames, seed=5), one(frames, seed=5))
    assert not np.array_equal(one(frames, seed=5), one(frames, seed=6))
    assert not np.array_equal(one(frames, seed=5), two(frames, seed=5))
    out, params = two.apply(frames, seed=5)
    assert out.shape == frames.shape and out.dtype == np.uint8 and len(params["stages"]) == 2


def test_classic_drift_is_smooth():
    frames = np.full((12, 32, 32, 3), 128, np.uint8)
    config = ClassicDegradationConfig(
        **{**ONLY, "noise_prob": 1.0}, gaussian_noise_prob=1.0, gaussian_sigma=(2.0, 30.0), drift=0.02
    )
    stds = (ClassicDegradation(config)(frames, seed=0).astype(np.float32) - 128).std(axis=(1, 2, 3))
    assert np.abs(np.diff(stds)).max() < 3.0  # consecutive frames: close noise levels


def test_classic_bad_input():
    with pytest.raises(ValueError, match="order"):
        ClassicDegradation(order=3)
    with pytest.raises(ValueError, match="codecs"):
        ClassicDegradationConfig(codecs=("vp9",))
    with pytest.raises(ValueError, match="`frames`.*uint8"):
        ClassicDegradation()(np.zeros((2, 8, 8, 3), np.int16))


# ---------------------------------------------------------------- quality filters


def test_quality_filter():
    sharp = (smooth_texture(48, 64, sigma=0.7) * 255).clip(0, 255).astype(np.uint8)[None].repeat(12, 0)
    assert QualityFilter()(sharp).passed
    dark, bright = np.full_like(sharp, 5), np.full_like(sharp, 250)
    assert "too dark" in QualityFilter()(dark).reasons[0]
    assert "too bright" in QualityFilter()(bright).reasons[0]
    flat = np.full_like(sharp, 128)
    report = QualityFilter()(flat)
    assert not report.passed and "Laplacian" in report.reasons[0] and report.laplacian_variance == 0
    # Laplacian variance against a direct computation on the 10 sampled frames
    lap = cv2.Laplacian(cv2.cvtColor(sharp[0], cv2.COLOR_RGB2GRAY), cv2.CV_64F)[1:-1]
    assert abs(laplacian_variance(sharp[:1]) - lap.var()) < 1e-6 * lap.var()
    seen = []
    scorer = lambda frames: seen.append(len(frames)) or 12.0  # noqa: E731
    report = QualityFilter(learned_score=scorer)(sharp)
    assert seen == [10] and not report.passed and report.learned_score == 12.0
    with pytest.raises(ValueError, match="learned_score"):
        QualityFilter(learned_score=3)


# ---------------------------------------------------------------- robustness: sizes, strides, bad values


def test_optical_flow_refuses_frames_too_small_naming_the_minimum():
    frames = translating(2, 11, 11)
    with pytest.raises(ValueError, match=r"`frames` of 11x11 px are too small for optical flow.*>= 8.*>= 12"):
        compute_flow(frames)
    with pytest.raises(ValueError, match="too small for optical flow"):
        FlowBasedDegradation()(translating(2, 16, 7))
    assert compute_flow(translating(2, 8, 12)).shape == (1, 8, 12, 2)  # the smallest size DIS takes
    # a scale that would shrink the frames below that minimum estimates at full resolution instead
    np.testing.assert_array_equal(
        compute_flow(translating(2, 12, 12), scale=0.5), compute_flow(translating(2, 12, 12))
    )
    with pytest.raises(ValueError, match="`scale`"):
        compute_flow(translating(2, 16, 16), scale=float("nan"))


def test_negative_stride_frames_are_valid_input():
    """np.flip / [::-1] views (negative strides) give what their contiguous copies give."""
    from cascade_vsr.core.optical_flow import bidirectional_flow
    from cascade_vsr.core.video import resize_frames
    from cascade_vsr.degradations.still import still_clip

    frames = translating(4, 32, 48)
    for view in (frames[::-1], np.flip(frames, axis=2), np.flip(frames, axis=3)):
        copy = view.copy()
        np.testing.assert_array_equal(compute_flow(view), compute_flow(copy))
        np.testing.assert_array_equal(bidirectional_flow(view)[1], bidirectional_flow(copy)[1])
        np.testing.assert_array_equal(FlowBasedDegradation()(view, 1), FlowBasedDegradation()(copy, 1))
        np.testing.assert_array_equal(ClassicDegradation(order=2)(view, 1), ClassicDegradation(order=2)(copy, 1))
        assert QualityFilter()(view) == QualityFilter()(copy)
        np.testing.assert_array_equal(resize_frames(view, (16, 32)), resize_frames(copy, (16, 32)))
        rng = (np.random.default_rng(0), np.random.default_rng(0))
        np.testing.assert_array_equal(still_clip(view[0], 2, 1.0, rng[0]), still_clip(copy[0], 2, 1.0, rng[1]))
        for codec in ("libx264", "mpeg4"):
            np.testing.assert_array_equal(
                encode_video(view, codec, 24.0, 30, 100_000), encode_video(copy, codec, 24.0, 30, 100_000)
            )


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ClassicDegradationConfig(blur_sigma=(float("nan"), 1.0)), "`blur_sigma`.*finite"),
        (lambda: ClassicDegradationConfig(gaussian_sigma=(1.0, float("inf"))), "`gaussian_sigma`.*finite"),
        (lambda: ClassicDegradationConfig(crf=(20.0, 60.0)), r"`crf` must lie in \[0, 51\]"),
        (lambda: ClassicDegradationConfig(kernel_size=(7.5, 21)), "`kernel_size`.*whole"),
        (lambda: ClassicDegradationConfig(fps=0.0), "`fps`"),
        (lambda: ClassicDegradationConfig(drift=float("nan")), "`drift`"),
        (lambda: ClassicDegradationConfig(kernel_probs=(float("nan"), 0.3, 0.1, 0.1, 0.1)), "`kernel_probs`"),
        (lambda: FlowDegradationConfig(blend_strength=(float("nan"), 0.5)), "`blend_strength`.*finite"),
        (lambda: encode_video(np.zeros((2, 16, 16, 3), np.uint8), "libx264", 24.0, 60, 0), r"`crf`.*\[0, 51\]"),
        (lambda: encode_video(np.zeros((2, 16, 16, 3), np.uint8), "vp9", 24.0, 20, 0), "`codec`"),
    ],
)
def test_degradation_configs_refuse_non_finite_and_out_of_range_values(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---------------------------------------------------------------- reproducibility under load and thread counts


def degradation_digests(seeds=range(6)) -> list[str]:
    """sha256 of the flow, classic (both orders, both codecs) degradations and of each codec round trip, on a small
    real clip: what a make-pairs process computes for its clips."""
    import hashlib

    from cascade_vsr.core.video import read_video, resize_frames, sample_video_path

    frames = resize_frames(read_video(sample_video_path(), 40, 5), (64, 112), crop_to_aspect=True)
    digest = lambda array: hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]  # noqa: E731
    out = [digest(FlowBasedDegradation()(frames, seed)) for seed in seeds]
    for order in (1, 2):
        for codec in ("libx264", "mpeg4"):
            degradation = ClassicDegradation(ClassicDegradationConfig(codecs=(codec,)), order=order)
            out += [digest(degradation(frames, seed)) for seed in seeds]
    out += [digest(encode_video(frames, codec, 24.0, 28, 150_000)) for codec in ("libx264", "mpeg4")]
    return out


def test_degradations_do_not_depend_on_thread_counts():
    """torch's CPU bilinear kernel rounds differently when split across threads, and the codecs pick their threads
    (and so their bitstream) from the CPUs: a clip must come out the same at any torch / OpenCV thread count."""
    import torch

    torch_threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    try:
        results = []
        for torch_n, cv2_n in ((1, 1), (3, 1), (1, 3), (4, 4)):
            torch.set_num_threads(torch_n)
            cv2.setNumThreads(cv2_n)
            results.append(degradation_digests(range(3)))
    finally:
        torch.set_num_threads(torch_threads)
        cv2.setNumThreads(cv2_threads)
    assert all(result == results[0] for result in results), results


def test_codec_degradation_is_reproducible_in_concurrent_processes():
    """Two processes at once (one confined to one CPU where `taskset` exists, which changes the codecs' automatic
    thread counts) degrade the same frames with the same seeds to the same bytes as this process."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    script = "import json; from tests.test_degradations import degradation_digests; print(json.dumps(degradation_digests()))"
    command = [sys.executable, "-c", script]
    env = {"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"}
    one_cpu = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    processes = [
        subprocess.Popen(
            prefix + command, env=env, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for prefix in ([], one_cpu)
    ]
    expected = degradation_digests()
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
        assert json.loads(out.strip().splitlines()[-1]) == expected
