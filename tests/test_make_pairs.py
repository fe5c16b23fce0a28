"""`cascade-vsr make-pairs` on the real bigbuckbunny clip, and ModelGuidedDegradation with tiny upstreams."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from cascade_vsr.cli import main
from cascade_vsr.core.video import read_video, sample_video_path, write_video
from cascade_vsr.degradations.model_guided import ModelGuidedDegradation, ModelGuidedDegradationConfig
from cascade_vsr.degradations.pair_planning import clip_id
from cascade_vsr.pair_dataset import read_frames, read_manifest
from cascade_vsr.testing import tiny_cogvideox_pipeline, tiny_wan_pipeline

REPO = Path(__file__).resolve().parents[1]
VIDEO = str(sample_video_path("bigbuckbunny.mp4"))
# clips start every 3 source frames so that they all lie early in the video (decoding 720p frames is the cost)
SMALL = ["--num-frames", "5", "--stride", "2", "--clip-step", "3", "--hr-size", "64", "112", "--lr-scale", "0.5"]


def make_pairs(*args) -> int:
    return main(["make-pairs", *map(str, args)])


def expected_ids(root: Path) -> list[dict]:
    lines = (root / "manifest.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def check_dataset(root: Path, num_clips: int) -> list[dict]:
    """Manifest and files agree: unique ids, every file readable with the declared shapes, no leftovers."""
    records = expected_ids(root)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == num_clips
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["format"] == "cascade-vsr-pairs" and meta["version"] == 1
    for record in records:
        hr, lr = read_frames(root / record["hr"]), read_frames(root / record["lr"])
        assert hr.shape == (record["num_frames"], *record["hr_size"], 3)
        assert lr.shape == (record["num_frames"], *record["lr_size"], 3)
        assert record["degradation"]["kind"] in ("flow", "classic", "model_guided", "none")
        # HR is the source clip (centre crop + area resize): compare with a direct read
        source = read_video(record["source"], record["start"], (record["num_frames"] - 1) * record["stride"] + 1)
        assert len(source[:: record["stride"]]) == record["num_frames"]
    leftovers = [p.name for p in (root / "clips").iterdir() if p.name not in set(ids)]
    assert not leftovers, leftovers
    return records


def test_make_pairs_real_clip_preview_and_rerun(tmp_path):
    root = tmp_path / "pairs"
    make_pairs(
        VIDEO,
        "--output-dir",
        root,
        *SMALL,
        "--max-clips-per-video",
        3,
        "--preview",
        2,
        "--degradations",
        "flow=1,classic1=1,classic2=1",
        "--frames-format",
        "png",
    )
    records = check_dataset(root, 3)
    assert {r["start"] for r in records} == {0, 3, 6}
    assert records[0]["latents"] is None and records[0]["hr"].endswith("/hr")
    import cv2

    preview = cv2.imread(str(root / "preview.png"))
    assert preview.shape == (2 * 64, 3 * 112, 3)
    # a re-run with the same settings writes nothing new
    before = (root / "manifest.jsonl").read_text()
    make_pairs(
        VIDEO,
        "--output-dir",
        root,
        *SMALL,
        "--max-clips-per-video",
        3,
        "--degradations",
        "flow=1,classic1=1,classic2=1",
        "--frames-format",
        "png",
    )
    assert (root / "manifest.jsonl").read_text() == before
    # the same folder with other settings is refused, naming it
    with pytest.raises(ValueError, match=r"`--output-dir`.*different dataset.*num_frames"):
        make_pairs(
            VIDEO,
            "--output-dir",
            root,
            *SMALL[2:],
            "--num-frames",
            9,
            "--max-clips-per-video",
            3,
            "--degradations",
            "flow=1,classic1=1,classic2=1",
            "--frames-format",
            "png",
        )


def test_make_pairs_sigkill_and_resume(tmp_path):
    root = tmp_path / "pairs"
    args = [VIDEO, "--output-dir", root, *SMALL, "--max-clips-per-video", 10, "--degradations", "classic2=1,flow=1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "cascade_vsr.cli", "make-pairs", *map(str, args)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    manifest = root / "manifest.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not manifest.is_file() or len(manifest.read_text().splitlines()) < 2):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(read_manifest(root))
    assert 2 <= done_before < 10, done_before
    # simulate the worst leftovers: a half-written temporary folder and a clip folder without manifest line
    clips = {r["id"]: r for r in expected_ids(root)}
    missing = [clip_id(Path(VIDEO).resolve(), start) for start in range(0, 30, 3)][done_before:]
    (root / "clips" / f".tmp-{missing[-1]}-123").mkdir()
    (root / "clips" / missing[-2]).mkdir(exist_ok=True)
    (root / "clips" / missing[-2] / "hr.mp4").write_bytes(b"partial")
    make_pairs(*args, "--num-workers", 2)  # the resumed run also exercises the worker processes
    records = check_dataset(root, 10)
    assert all(clips[r["id"]] == r for r in records if r["id"] in clips)  # finished clips were left alone


def test_make_pairs_accelerate_two_processes(tmp_path):
    root = tmp_path / "pairs"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "cascade_vsr.cli",
        "make-pairs",
        VIDEO,
        "--output-dir",
        str(root),
        *SMALL,
        "--max-clips-per-video",
        "6",
        "--degradations",
        "classic1=1",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(c["planned"] for c in counts) == [3, 3]  # each process got half of the clips
    check_dataset(root, 6)


def test_make_pairs_upstream_latents(tmp_path):
    upstream = tmp_path / "wan"
    tiny_wan_pipeline().save_pretrained(upstream)
    root = tmp_path / "pairs"
    make_pairs(
        VIDEO,
        "--output-dir",
        root,
        "--num-frames",
        5,
        "--stride",
        3,
        "--hr-size",
        64,
        64,
        "--lr-scale",
        0.5,
        "--max-clips-per-video",
        2,
        "--upstream",
        upstream,
        "--degradations",
        "model_guided=1,flow=1",
        "--sdedit-steps",
        4,
        "--text-embeds",
        "--prompt",
        "a rabbit",
    )
    records = check_dataset(root, 2)
    for record in records:
        assert record["latent_space"] == "wan"
        with safe_open(root / record["latents"], "pt") as handle:
            assert handle.metadata() == {"latent_space": "wan"}
            hr, lr = handle.get_tensor("hr_latents"), handle.get_tensor("lr_latents")
            embeds, mask = handle.get_tensor("prompt_embeds"), handle.get_tensor("prompt_attention_mask")
        assert hr.shape == (16, 2, 8, 8) and lr.shape == (16, 2, 4, 4) and hr.dtype == lr.dtype == torch.float32
        assert (
            embeds.ndim == 2 and embeds.shape[1] == 32 and mask.dtype == torch.int64 and mask.shape == embeds.shape[:1]
        )
        assert torch.isfinite(hr).all() and torch.isfinite(lr).all()
    assert {r["degradation"]["kind"] for r in records} <= {"model_guided", "flow"}


def test_make_pairs_space_to_depth_latents_are_the_pixels(tmp_path):
    """Pixel-space pairs: the latents are exactly the space-to-depth of the stored HR / LR frames."""
    root = tmp_path / "pairs"
    make_pairs(
        VIDEO,
        "--output-dir",
        root,
        "--num-frames",
        3,
        "--stride",
        4,
        "--hr-size",
        64,
        96,
        "--lr-scale",
        0.5,
        "--frame-range",
        8,
        20,
        "--upstream",
        "space_to_depth",
        "--degradations",
        "flow=1",
        "--frames-format",
        "png",
    )
    (record,) = check_dataset(root, 1)  # frames 8..16 fit once in [8, 20) with 3 frames at stride 4
    assert record["latent_space"] == "space_to_depth" and record["start"] == 8
    with safe_open(root / record["latents"], "pt") as handle:
        hr, lr = handle.get_tensor("hr_latents"), handle.get_tensor("lr_latents")
    assert hr.shape == (48, 3, 16, 24) and lr.shape == (48, 3, 8, 12)
    hr_frames = read_frames(root / record["hr"])
    expected = torch.nn.functional.pixel_unshuffle(
        torch.from_numpy(hr_frames).permute(0, 3, 1, 2).float() / 127.5 - 1, 4
    ).permute(1, 0, 2, 3)
    torch.testing.assert_close(hr, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--degradations", "flow=1,blurry=1"], r"`--degradations`.*blurry"),
        (["--degradations", "model_guided=1"], r"`--degradations`.*--upstream"),
        (["--frame-range", 10, 5], r"`--frame-range`"),
        (["--classic-options", '{"nope": 1}'], r"`--classic-options`.*nope"),
        (["--upstream", "space_to_depth", "--degradations", "model_guided=1"], r"`--upstream space_to_depth`"),
        (["--lr-scale", "1.5"], r"`--lr-scale`"),
        (["--hr-size", "60", "112"], r"`--hr-size`"),
        (["--quality-score", "no_such_module:score"], r"`--quality-score`"),
        (["--still-fraction", "1.5"], r"`--still-fraction`"),
        (["--still-noise", "-1"], r"`--still-noise`"),
        (["--still-noise", "inf"], r"`--still-noise`"),
    ],
)
def test_make_pairs_bad_settings(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        make_pairs(VIDEO, "--output-dir", tmp_path / "out", *SMALL, *extra)
    assert not (tmp_path / "out").exists()


def test_make_pairs_clean_share_is_the_area_resized_hr(tmp_path):
    """`none` pairs (the clean share of a mix) store the HR frames area-resized to the LR size, nothing else."""
    from cascade_vsr.core.video import resize_frames

    root = tmp_path / "pairs"
    make_pairs(
        VIDEO, "--output-dir", root, "--num-frames", 2, "--hr-size", 64, 96, "--lr-scale", 0.5,
        "--frame-range", 0, 2, "--degradations", "none=1", "--frames-format", "png",
    )  # fmt: skip
    (record,) = check_dataset(root, 1)
    assert record["degradation"] == {"kind": "none", "params": {}}
    hr, lr = read_frames(root / record["hr"]), read_frames(root / record["lr"])
    np.testing.assert_array_equal(lr, resize_frames(hr, (32, 48)))


def test_make_pairs_still_shots(tmp_path):
    """`--still-fraction 1`: every HR clip is its middle frame held still with per-frame noise, recorded in the
    manifest; the LR is still made from that HR clip; fraction 0 leaves the clips as they were."""
    from cascade_vsr.core.video import resize_frames

    common = [
        VIDEO, *SMALL, "--max-clips-per-video", 2, "--degradations", "none=1", "--frames-format", "png",
        "--no-quality-filter",
    ]  # fmt: skip
    make_pairs(*common, "--output-dir", tmp_path / "still", "--still-fraction", 1, "--still-noise", 2)
    make_pairs(*common, "--output-dir", tmp_path / "moving")
    for still, moving in zip(check_dataset(tmp_path / "still", 2), check_dataset(tmp_path / "moving", 2)):
        assert still["id"] == moving["id"] and moving["still"] is None
        assert still["still"] == {"frame": 2, "noise_std": 2.0}
        hr = read_frames(tmp_path / "still" / still["hr"]).astype(np.float64)
        source = read_frames(tmp_path / "moving" / moving["hr"]).astype(np.float64)
        noise = hr - source[2]  # every frame is the middle one plus fresh noise of std sqrt(2) * 2
        np.testing.assert_allclose(noise.std(axis=(1, 2, 3)), 2 * np.sqrt(2), rtol=0.15)
        assert np.abs(noise.mean(axis=(1, 2, 3))).max() < 0.5
        assert (np.abs(np.diff(hr, axis=0)).mean(axis=(1, 2, 3)) > 1).all()
        lr = read_frames(tmp_path / "still" / still["lr"])
        expected = resize_frames(hr.astype(np.uint8), tuple(still["lr_size"]))
        np.testing.assert_array_equal(lr, expected)


def reject_all(frames) -> float:
    """A stand-in learned quality score (importable as tests.test_make_pairs:reject_all)."""
    assert frames.dtype == np.uint8 and frames.shape[-1] == 3
    return 0.0


def test_make_pairs_learned_quality_score(tmp_path):
    root = tmp_path / "pairs"
    make_pairs(
        VIDEO,
        "--output-dir",
        root,
        *SMALL,
        "--max-clips-per-video",
        2,
        "--degradations",
        "flow=1",
        "--quality-score",
        "tests.test_make_pairs:reject_all",
    )
    assert read_manifest(root) == [] and len(read_manifest(root, "rejected.jsonl")) == 2
    assert "learned score" in read_manifest(root, "rejected.jsonl")[0]["rejected"][0]


def test_make_pairs_bad_videos(tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    with pytest.raises(ValueError, match="broken.mp4"):
        make_pairs(broken, "--output-dir", tmp_path / "out", *SMALL)
    short = tmp_path / "short.mp4"
    write_video(short, np.zeros((3, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"short.mp4.*fewer than one clip"):
        make_pairs(short, "--output-dir", tmp_path / "out", *SMALL)
    with pytest.raises(ValueError, match="`inputs`"):
        make_pairs(tmp_path / "missing-*.mp4", "--output-dir", tmp_path / "out", *SMALL)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no video files"):
        make_pairs(tmp_path / "empty", "--output-dir", tmp_path / "out", *SMALL)


# ---------------------------------------------------------------- model-guided with tiny upstreams


@pytest.fixture(scope="module", params=["wan", "cogvideox"])
def tiny_upstream(request):
    if request.param == "wan":
        return tiny_wan_pipeline(), ModelGuidedDegradationConfig(num_inference_steps=6, max_sequence_length=16)
    return tiny_cogvideox_pipeline(), ModelGuidedDegradationConfig(num_inference_steps=6)


def test_model_guided(tiny_upstream):
    pipeline, config = tiny_upstream
    degradation = ModelGuidedDegradation(pipeline, config)
    frames = np.random.default_rng(0).integers(0, 256, (5, 48, 48, 3), dtype=np.uint8)
    clean = degradation.encode(frames, size=(32, 32))
    channels = degradation.adapter.latent_channels
    assert clean.shape == (1, channels, 2, 4, 4)
    # alpha = 0: nothing to denoise, the encoded latent exactly
    torch.testing.assert_close(degradation(frames, seed=0, size=(32, 32), alpha=0.0), clean, rtol=0, atol=0)
    outputs = {alpha: degradation(frames, seed=3, size=(32, 32), alpha=alpha) for alpha in (0.2, 0.5, 0.9)}
    distances = [float((out - clean).norm()) for out in outputs.values()]
    assert distances[0] > 0 and distances == sorted(distances), distances
    torch.testing.assert_close(degradation(frames, seed=3, size=(32, 32), alpha=0.5), outputs[0.5], rtol=0, atol=0)
    assert not torch.equal(degradation(frames, seed=4, size=(32, 32), alpha=0.5), outputs[0.5])
    latents, params = degradation.apply(frames, seed=1, size=(32, 32))
    assert 0.3 <= params["alpha"] <= 0.4 and latents.shape == clean.shape
    assert degradation.decode(latents).dtype == np.uint8


def test_model_guided_bad_input(tiny_upstream):
    pipeline, config = tiny_upstream
    degradation = ModelGuidedDegradation(pipeline, config)
    frames = np.zeros((5, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="`alpha`"):
        degradation(frames, alpha=1.5)
    with pytest.raises(ValueError, match="`frames`"):
        degradation(frames[:4])  # not 4k+1
    with pytest.raises(ValueError, match="`frames`.*uint8"):
        degradation(frames.astype(np.float32))
    with pytest.raises(ValueError, match="`alpha`"):
        ModelGuidedDegradationConfig(alpha=(0.3, 1.2))


def test_lr_covers_the_hr_field_of_view_when_rounding_changes_the_aspect():
    """Regression: LR sizes round to multiples of 16 (80x160 * 0.5 -> 48x80, not 40x80). LR must still be the
    whole HR frame resized (a fixed per-axis scale), never a centre crop of it, or LR and HR are misaligned."""
    from cascade_vsr.core.video import resize_frames

    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, size=(2, 80, 160, 3), dtype=np.uint8)
    lr = resize_frames(hr, (48, 80))
    reference = torch.nn.functional.interpolate(
        torch.from_numpy(hr).permute(0, 3, 1, 2).float(), size=(48, 80), mode="area"
    )
    reference = reference.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(lr, reference)
    cropped = resize_frames(
        hr, (48, 80), crop_to_aspect=True
    )  # the source -> HR behaviour: centre crop to the aspect first
    assert not np.array_equal(cropped, lr)
