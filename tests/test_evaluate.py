"""`cascade-vsr evaluate`: figures equal a direct metrics computation, clips match by name, errors are clear."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from cascade_vsr.cli import main
from cascade_vsr.commands import evaluate
from cascade_vsr.core.metrics import clip_metrics, psnr
from cascade_vsr.core.video import read_video, resize_frames, sample_video_path


def _write_pngs(folder, frames):
    folder.mkdir(parents=True)
    for index, frame in enumerate(frames):
        cv2.imwrite(str(folder / f"{index:04d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    return folder


@pytest.fixture(scope="module")
def clip():
    gt = read_video(sample_video_path("carphone_pristine.mp4"), num_frames=5)[:, :64, :96].copy()
    lr = resize_frames(gt, (32, 48), mode="area")
    return gt, lr, resize_frames(lr, (64, 96), mode="bicubic")


def test_single_clip_figures_equal_clip_metrics_and_bicubic_baseline(tmp_path, clip, capsys):
    gt, lr, bicubic = clip
    noisy = np.clip(bicubic.astype(int) + np.random.default_rng(0).integers(-3, 4, bicubic.shape), 0, 255)
    sr = _write_pngs(tmp_path / "sr", noisy.astype(np.uint8))
    gt_dir = _write_pngs(tmp_path / "gt", gt)
    lr_dir = _write_pngs(tmp_path / "lr", lr)
    out = tmp_path / "figures.json"
    assert (
        main(["evaluate", str(sr), str(gt_dir), "--baseline", "bicubic", "--lr", str(lr_dir), "--json", str(out)]) == 0
    )
    summary = json.loads(out.read_text())
    expected = clip_metrics({"bicubic": bicubic, "sr": noisy.astype(np.uint8)}, gt)
    assert summary["clips"]["sr"] == expected  # PNG frames are lossless: the very same numbers
    assert summary["frames"] == {"sr": 5}
    assert summary["clips"]["sr"]["sr"]["psnr"] == pytest.approx(float(psnr(noisy.astype(np.uint8), gt).mean()))
    printed = capsys.readouterr().out
    assert "bicubic" in printed and f"{expected['sr']['psnr']:.2f}" in printed
    # without --lr the baseline's LR is the ground truth area-downsampled by --scale: the same frames here
    again = evaluate.evaluate(evaluate.match_clips(str(sr), str(gt_dir)), baseline="bicubic", scale=2)
    assert again["clips"]["sr"]["bicubic"] == pytest.approx(expected["bicubic"])


def test_clip_folders_match_by_name_and_overall_is_frame_weighted(tmp_path, clip):
    gt, _, bicubic = clip
    for name, count in (("a", 5), ("b", 3)):
        _write_pngs(tmp_path / "sr" / name, bicubic[:count])
        _write_pngs(tmp_path / "gt" / name, gt[:count])
    summary = evaluate.evaluate(evaluate.match_clips(str(tmp_path / "sr"), str(tmp_path / "gt")))
    assert summary["frames"] == {"a": 5, "b": 3}
    a, b = (summary["clips"][name]["sr"]["psnr"] for name in "ab")
    assert summary["overall"]["sr"]["psnr"] == pytest.approx((5 * a + 3 * b) / 8)
    assert a != b


def test_errors_name_the_argument(tmp_path, clip):
    gt, _, bicubic = clip
    _write_pngs(tmp_path / "sr" / "a", bicubic)
    _write_pngs(tmp_path / "gt" / "other", gt)
    with pytest.raises(ValueError, match="no clip named"):
        evaluate.match_clips(str(tmp_path / "sr"), str(tmp_path / "gt"))
    with pytest.raises(ValueError, match="`--num-frames`"):
        main(["evaluate", str(tmp_path / "sr"), str(tmp_path / "gt"), "--num-frames", "1"])
    with pytest.raises(ValueError, match="`--lr` is only used"):
        main(["evaluate", str(tmp_path / "sr"), str(tmp_path / "gt"), "--lr", "x"])
    small = _write_pngs(tmp_path / "small", bicubic[:, :32])
    with pytest.raises(ValueError, match="differ in size"):
        evaluate.evaluate(evaluate.match_clips(str(small), str(tmp_path / "gt" / "other")))
    with pytest.raises(ValueError, match="not a video file, a folder"):
        evaluate.evaluate({"x": (tmp_path / "missing", tmp_path / "gt" / "other")})
