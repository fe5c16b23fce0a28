"""`cascade-vsr demo` end to end with a tiny random placeholder model (the trained model is tested elsewhere)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cascade_vsr import CascadeVSRPipeline
from cascade_vsr.commands import demo
from cascade_vsr.core.metrics import psnr, ssim
from cascade_vsr.core.video import read_video, resize_frames, sample_video_path
from cascade_vsr.training.trainer import export_pipeline
from tests.conftest import randomize_

PLACEHOLDER_TRANSFORMER = dict(
    latent_channels=48,
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=16,
    ffn_dim=64,
    text_dim=16,
    latent_space="space_to_depth",
)


def export_placeholder(path: Path, **transformer_config) -> Path:
    """A random pixel-space pipeline folder in the demo model's layout (never the committed demo model)."""
    from cascade_vsr import CascadeVSRTransformer3DModel, LatentUpsampler3D

    torch.manual_seed(0)
    transformer = CascadeVSRTransformer3DModel(**{**PLACEHOLDER_TRANSFORMER, **transformer_config})
    upsampler = LatentUpsampler3D(latent_channels=48, hidden_channels=16, num_blocks=1)
    return export_pipeline(path, randomize_(upsampler, std=0.01), randomize_(transformer, std=0.01, seed=1))


def _args(model: Path, output_dir: Path, **overrides) -> argparse.Namespace:
    args = demo.parse_args(["--model", str(model), "--output-dir", str(output_dir), "--one-step-model", "none"])
    return argparse.Namespace(**{**vars(args), **overrides})


def test_demo_runs_end_to_end(tmp_path, monkeypatch):
    calls = []  # what every pipeline call got and returned
    original_call = CascadeVSRPipeline.__call__

    def recording_call(pipe, **kwargs):
        output = original_call(pipe, **kwargs)
        calls.append((kwargs, output.frames))
        return output

    monkeypatch.setattr(CascadeVSRPipeline, "__call__", recording_call)
    model = export_placeholder(tmp_path / "model")
    out = tmp_path / "out"
    args = _args(
        model,
        out,
        num_frames=3,
        hr_size=[64, 112],
        num_inference_steps=2,
        chunk_frames=2,
        crop_size=24,
        temporal_unit=2,
        self_ensemble=2,
        noise_aug_strength=0.05,
        seed=7,
    )
    assert demo.run(args) == 0

    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary) == {"settings", "model", "clips", "one_step_model", "wall_time_seconds"}
    assert summary["one_step_model"] is None
    assert summary["model"]["parameters"]["total"] == sum(
        summary["model"]["parameters"][k] for k in ("upsampler", "transformer")
    )
    assert summary["settings"]["temporal_unit"] == 2  # --temporal-unit overrides the model's attention scope
    # the settings used: the command line's, then the placeholder export's defaults (its model_index.json)
    assert (summary["settings"]["self_ensemble"], summary["settings"]["noise_frame_correlation"]) == (2, 0.0)
    assert set(summary["clips"]) == {"bigbuckbunny", "carphone"}
    bunny, carphone = summary["clips"]["bigbuckbunny"], summary["clips"]["carphone"]
    assert (bunny["frames"], bunny["hr_size"], bunny["lr_size"]) == ([100, 103], [64, 112], [32, 56])
    # carphone (144x176) is larger than this --hr-size: cropped to its aspect and resized like bigbuckbunny
    assert (carphone["frames"], carphone["hr_size"], carphone["lr_size"]) == ([0, 3], [64, 112], [32, 56])

    # one pipeline call per clip with the command line's settings, its 3 frames in 2 chunks of 2
    assert len(calls) == 2
    for (kwargs, frames), name in zip(calls, ("bigbuckbunny", "carphone")):
        assert tuple(kwargs["video"].shape) == (2, 2, 3, 32, 56) and (kwargs["height"], kwargs["width"]) == (64, 112)
        assert kwargs["generator"].initial_seed() == 7 and kwargs["self_ensemble"] == 2
        assert (kwargs["num_inference_steps"], kwargs["noise_aug_strength"]) == (2, 0.05)
        assert kwargs["noise_frame_correlation"] is None  # not given: the model folder's own setting
        # metrics.json scores exactly what the pipeline returned (rounded to uint8), against the held-out frames
        ground_truth, _, lr, bicubic = demo.held_out_clip(name, 3, (64, 112))
        output = np.clip(np.rint(frames.reshape(-1, 64, 112, 3)[:3] * 255), 0, 255).astype(np.uint8)
        recorded = summary["clips"][name]["metrics"]
        assert recorded["cascade_vsr"]["psnr"] == float(psnr(output, ground_truth).mean())
        assert recorded["cascade_vsr"]["ssim"] == float(ssim(output, ground_truth).mean())
        assert recorded["bicubic"]["psnr"] == float(psnr(bicubic, ground_truth).mean())
        assert recorded["cascade_vsr"]["psnr"] != recorded["bicubic"]["psnr"]
        for method in demo.METHODS:
            m = recorded[method]
            assert set(m) == {"psnr", "ssim", "warping_error", "relative_warping_error"}
            assert all(np.isfinite(v) for v in m.values()) and -1 <= m["ssim"] <= 1 and m["warping_error"] >= 0
        assert 0 < recorded["consistent_flow_fraction"] <= 1
    # bicubic of an area-downsampled real clip is a sane baseline
    assert bunny["metrics"]["bicubic"]["psnr"] > 20 and carphone["metrics"]["bicubic"]["psnr"] > 20

    for name, (height, width) in (("bigbuckbunny", (64, 112)), ("carphone", (64, 112))):
        frames = read_video(out / f"{name}.mp4")
        assert frames.shape[0] == 3 and frames.shape[2] == 3 * width and frames.shape[1] > height  # label strip
    assert not list(out.glob("*.partial.*"))
    sheet = cv2.imread(str(out / "crops.png"))
    assert sheet is not None and sheet.shape[1] == 3 * 24 * 4 and sheet.shape[0] > 2 * 24 * 4


def test_one_step_model_runs_side_by_side_with_its_own_settings(tmp_path):
    model = export_placeholder(tmp_path / "model")
    one_step = export_placeholder(tmp_path / "one_step")
    index = json.loads((one_step / "model_index.json").read_text())
    index["sampling"] = {"num_inference_steps": 1, "self_ensemble": 1}
    (one_step / "model_index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    args = _args(model, out, clips=["carphone"], num_frames=3, hr_size=[48, 64], crop_size=16, zoom=2)
    args.one_step_model = str(one_step)
    assert demo.run(args) == 0
    summary = json.loads((out / "metrics.json").read_text())
    metrics = summary["clips"]["carphone"]["metrics"]
    assert {"bicubic", "cascade_vsr", demo.ONE_STEP} <= set(metrics)
    assert metrics[demo.ONE_STEP]["psnr"] != metrics["cascade_vsr"]["psnr"]
    assert summary["one_step_model"]["sampling"]["num_inference_steps"] == 1
    assert summary["clips"]["carphone"]["cascade_vsr_one_step_seconds"] > 0
    assert read_video(out / "carphone.mp4").shape[2] == 4 * 64  # bicubic | multi-step | one-step | ground truth


def test_whole_clip_with_the_models_own_attention(tmp_path):
    model = export_placeholder(tmp_path / "model")
    out = tmp_path / "out"
    args = _args(
        model,
        out,
        clips=["carphone"],
        num_frames=3,
        hr_size=[48, 64],
        num_inference_steps=1,
        temporal_unit=0,
        crop_size=16,
        zoom=2,
    )
    assert demo.run(args) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["settings"]["temporal_unit"] is None and summary["settings"]["chunk_frames"] is None
    assert list(summary["clips"]) == ["carphone"] and read_video(out / "carphone.mp4").shape[0] == 3


def test_temporal_window_overrides_the_models_window(tmp_path):
    windowed = export_placeholder(tmp_path / "windowed", attention_mode="window", window_size=(5, 4, 4))
    pipe = demo.load_pipeline(windowed, "cpu", temporal_window=2)
    assert tuple(pipe.transformer.config.window_size) == (2, 4, 4)
    assert tuple(demo.load_pipeline(windowed, "cpu").transformer.config.window_size) == (5, 4, 4)
    with pytest.raises(ValueError, match="--temporal-window.*attention_mode='full'"):
        demo.load_pipeline(export_placeholder(tmp_path / "full"), "cpu", temporal_window=2)


def test_ground_truth_sizes_at_the_default_hr_size():
    bunny, fps = demo.load_ground_truth("bigbuckbunny", 2, (352, 640))
    assert bunny.shape == (2, 352, 640, 3) and fps == 25
    carphone, _ = demo.load_ground_truth("carphone", 2, (352, 640))  # smaller than --hr-size: used as is
    np.testing.assert_array_equal(carphone, read_video(sample_video_path("carphone_pristine.mp4"), num_frames=2))
    lr = resize_frames(carphone, (72, 88), mode="area")
    expected = carphone.reshape(2, 72, 2, 88, 2, 3).astype(np.float64).mean(axis=(2, 4))
    np.testing.assert_array_equal(lr, np.round(expected).astype(np.uint8))


def test_side_by_side_keeps_the_panels_exact():
    rng = np.random.default_rng(0)
    panels = [rng.integers(0, 256, size=(2, 8, 10, 3), dtype=np.uint8) for _ in range(3)]
    video = demo.side_by_side(panels, ["a", "b", "c"])
    strip = video.shape[1] - 8
    for index, panel in enumerate(panels):
        np.testing.assert_array_equal(video[:, strip:, index * 10 : (index + 1) * 10], panel)
    np.testing.assert_array_equal(video[0, :strip], video[1, :strip])


def test_chunks_pad_with_the_last_frame():
    frames = np.arange(5)[:, None, None, None].repeat(4, 1).repeat(4, 2).repeat(3, 3).astype(np.uint8)
    chunks = demo.to_chunks(frames, 2)
    assert chunks.shape == (3, 2, 3, 4, 4)
    assert (chunks[:, :, 0, 0, 0] * 255).round().flatten().tolist() == [0, 1, 2, 3, 4, 4]


def test_detailed_region_finds_the_texture():
    frame = np.full((40, 48, 3), 128, dtype=np.uint8)
    frame[20:32, 28:40] = np.random.default_rng(1).integers(0, 256, size=(12, 12, 3))
    top, left = demo.detailed_region(frame, 16)
    assert top <= 20 and top + 16 >= 32 and left <= 28 and left + 16 >= 40


def test_missing_model_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="`--model`: no demo model.*demo/README.md"):
        demo.run(_args(tmp_path / "nowhere", tmp_path / "out"))
    with pytest.raises(ValueError, match="--hr-size"):
        demo.run(_args(tmp_path, tmp_path / "out", hr_size=[60, 112]))
    with pytest.raises(ValueError, match="--temporal-unit"):
        demo.run(_args(tmp_path, tmp_path / "out", temporal_unit=-1))
    with pytest.raises(ValueError, match="--temporal-window"):
        demo.run(_args(tmp_path, tmp_path / "out", temporal_window=-1))
    with pytest.raises(ValueError, match="--num-frames"):
        demo.run(_args(tmp_path, tmp_path / "out", num_frames=1))
    with pytest.raises(ValueError, match="--noise-frame-correlation"):
        demo.run(_args(tmp_path, tmp_path / "out", noise_frame_correlation=2.0))
    with pytest.raises(ValueError, match=r"--self-ensemble.*\(1, 2, 4, 6, 8\)"):
        demo.run(_args(tmp_path, tmp_path / "out", self_ensemble=3))
    assert not (tmp_path / "out").exists()
