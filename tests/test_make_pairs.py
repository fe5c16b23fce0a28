"""`cascade-vsr make-pairs` on the real bigbuckbunny clip, and ModelGuidedDegradation with tiny upstreams."""

from __future__ import annotations

import json
import os
import re
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
        # numbers out of range, refused before anything is read or written (issue 14)
        (["--max-clips-per-video", "-1"], r"`--max-clips-per-video` must be >= 1"),
        (["--max-clips-per-video", "0"], r"`--max-clips-per-video` must be >= 1"),
        (["--clip-step", "-2"], r"`--clip-step` must be >= 1"),
        (["--clip-step", "0"], r"`--clip-step` must be >= 1"),
        (["--crf", "100"], r"`--crf` must be in \[0, 51\]"),
        (["--crf", "-5"], r"`--crf` must be in \[0, 51\]"),
        (["--sdedit-steps", "0"], r"`--sdedit-steps` must be >= 1"),
        (["--preview", "-1"], r"`--preview` must be >= 0"),
        (["--num-workers", "-1"], r"`--num-workers` must be >= 0"),
        (["--seed", "-1"], r"`--seed` must be >= 0"),
        (["--num-frames", "1"], r"`--num-frames` must be >= 2"),
        (["--stride", "0"], r"`--stride` must be >= 1"),
        (["--hr-size", "0", "112"], r"`--hr-size` must be positive multiples of 16"),
        (["--hr-size", "-64", "112"], r"`--hr-size` must be positive multiples of 16"),
        (["--hr-size", "65", "112"], r"`--hr-size` must be positive multiples of 16"),
        (["--frame-range", "-2", "5"], r"`--frame-range` must be >= 0"),
        (["--lr-scale", "nan"], r"`--lr-scale` must be finite"),
        (["--alpha", "nan", "0.4"], r"`--alpha` must be finite"),
        (["--alpha", "0.3", "inf"], r"`--alpha` must be finite"),
        (["--still-fraction", "nan"], r"`--still-fraction` must be finite"),
        (["--still-noise", "nan"], r"`--still-noise` must be finite"),
        (["--min-quality-score", "nan"], r"`--min-quality-score` must be finite"),
        (["--degradations", "flow=nan"], r"`--degradations`: weight of 'flow' must be a finite number"),
        (["--degradations", "flow=inf,classic1=1"], r"`--degradations`: weight of 'flow' must be a finite number"),
        (["--classic-options", '{"crf": [20, 60]}'], r"`--classic-options`: `crf` must lie in \[0, 51\]"),
        (["--classic-options", '{"blur_sigma": [NaN, 1]}'], r"`--classic-options`: `blur_sigma`.*finite"),
        (["--text-embeds"], r"`--text-embeds` needs `--upstream`"),
    ],
)
def test_make_pairs_bad_settings(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        make_pairs(VIDEO, "--output-dir", tmp_path / "out", *SMALL, *extra)
    assert not (tmp_path / "out").exists()


def test_settings_are_checked_again_by_build_dataset(tmp_path):
    """Python callers that change a field after creation get the same errors, before the folder is touched."""
    from cascade_vsr.degradations.make_pairs import build_dataset
    from cascade_vsr.degradations.pair_settings import PairSettings

    settings = PairSettings.from_options(num_frames=2, hr_size=(64, 112))
    settings.crf = -5
    with pytest.raises(ValueError, match=r"`--crf` must be in \[0, 51\]"):
        build_dataset([VIDEO], tmp_path / "out", settings)
    assert not (tmp_path / "out").exists()


def test_make_pairs_input_and_output_paths(tmp_path):
    """A missing input is a FileNotFoundError naming it; an output folder that cannot be created is a clear error;
    neither leaves anything behind. The console prints one line and exits 2."""
    from cascade_vsr.cli import console_main

    missing = tmp_path / "missing.mp4"
    with pytest.raises(FileNotFoundError, match=rf"`inputs`: {re.escape(repr(str(missing)))} does not exist"):
        make_pairs(missing, "--output-dir", tmp_path / "out", *SMALL)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"`--output-dir`: cannot create the folder '/proc/x'"):
        make_pairs(VIDEO, "--output-dir", "/proc/x", *SMALL, "--max-clips-per-video", 1)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ValueError, match=r"`--output-dir` .*file' is a file, not a folder"):
        make_pairs(VIDEO, "--output-dir", tmp_path / "file", *SMALL, "--max-clips-per-video", 1)
    assert console_main(["make-pairs", str(missing), "--output-dir", str(tmp_path / "out"), *SMALL]) == 2


def test_make_pairs_refused_crf_leaves_the_folder_usable(tmp_path):
    """Regression: `--crf -5` failed at the first encode and left a dataset.json that refused the corrected run.
    Now it is refused up front, and a dataset.json of a run that made no clip yields to new settings."""
    root = tmp_path / "pairs"
    args = [VIDEO, "--output-dir", root, *SMALL, "--max-clips-per-video", 1, "--degradations", "none=1"]
    with pytest.raises(ValueError, match="`--crf`"):
        make_pairs(*args, "--crf", -5)
    assert not root.exists()
    from cascade_vsr.pair_dataset import PairDatasetWriter

    PairDatasetWriter(root).prepare({"crf": -5})  # what the old code left behind
    make_pairs(*args)
    check_dataset(root, 1)


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


# ---------------------------------------------------------------- hardening (issue 14)


def test_make_pairs_skips_a_source_smaller_than_the_hr_size(tmp_path):
    """A 48x80 video with --hr-size 64 112 would be upscaled into a fake HR: its clips are rejected (rejected.jsonl,
    a warning naming it) and never made; the other videos are made as usual, and a re-run skips them all."""
    small = tmp_path / "videos" / "small.mp4"
    small.parent.mkdir()
    write_video(small, read_video(VIDEO, 0, 12)[:, :48, :80])
    root = tmp_path / "pairs"
    args = [small.parent, VIDEO, "--output-dir", root, *SMALL, "--max-clips-per-video", 2, "--degradations", "none=1"]
    with pytest.warns(
        UserWarning, match=r"skipping the 2 clips of .*small.mp4.*48x80 is smaller than --hr-size 64x112"
    ):
        make_pairs(*args)
    check_dataset(root, 2)  # the clips of the large video only
    rejected = read_manifest(root, "rejected.jsonl")
    assert sorted(r["id"] for r in rejected) == sorted(clip_id(small.resolve(), start) for start in (0, 3))
    assert all("would be upscaled into a fake HR" in r["rejected"][0] for r in rejected)
    assert not any(p.name.startswith("small") for p in (root / "clips").iterdir())
    before = (root / "rejected.jsonl").read_text(), (root / "manifest.jsonl").read_text()
    with pytest.warns(UserWarning, match="skipping"):
        make_pairs(*args)
    assert ((root / "rejected.jsonl").read_text(), (root / "manifest.jsonl").read_text()) == before


def test_make_pairs_never_writes_non_finite_latents(tmp_path, monkeypatch):
    """A clip whose latents hold NaN or inf is rejected with a warning, and nothing of it is written."""
    from cascade_vsr.degradations import pair_synthesis
    from cascade_vsr.degradations.make_pairs import build_dataset
    from cascade_vsr.degradations.pair_settings import PairSettings

    real = pair_synthesis.ClipSynthesizer.latent_tensors
    calls = []

    def poisoned(self, hr, lr, lr_latents):
        tensors = real(self, hr, lr, lr_latents)
        calls.append(1)
        if len(calls) == 2:  # the second clip made
            tensors["hr_latents"][0, 0, 0, :2] = torch.tensor([float("nan"), float("inf")])
        return tensors

    monkeypatch.setattr(pair_synthesis.ClipSynthesizer, "latent_tensors", poisoned)
    settings = PairSettings.from_options(
        num_frames=2, clip_step=2, frame_range=(0, 6), hr_size=(32, 32), lr_scale=0.5, upstream="space_to_depth",
        degradations="none=1", frames_format="png", quality_filter=False,
    )  # fmt: skip
    root = tmp_path / "pairs"
    with pytest.warns(UserWarning, match=r"clip .* rejected: non-finite latents \(hr_latents: 2 of \d+ values\)"):
        counts = build_dataset([VIDEO], root, settings)
    assert counts == {"planned": 3, "skipped": 0, "written": 2, "rejected": 1}
    (rejected,) = read_manifest(root, "rejected.jsonl")
    assert rejected["rejected"] == [f"non-finite latents (hr_latents: 2 of {48 * 2 * 8 * 8} values)"]
    assert rejected["id"] not in {p.name for p in (root / "clips").iterdir()}
    for record in read_manifest(root):
        with safe_open(root / record["latents"], "pt") as handle:
            assert all(torch.isfinite(handle.get_tensor(name)).all() for name in handle.keys())


def cli_process(*args, **kwargs) -> subprocess.Popen:
    """`python -m cascade_vsr.cli make-pairs ARGS` (the console entry point: one-line errors, exit 2)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "cascade_vsr.cli", "make-pairs", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def slow_score(frames) -> float:
    """A learned quality score that passes every clip, slowly (tests.test_make_pairs:slow_score): a run of TINY
    clips then lasts long enough (0.3 s a clip) for a second run or a kill to meet it."""
    time.sleep(0.3)
    return 100.0


def very_slow_score(frames) -> float:
    """A score that takes 4 s a clip, as a large clip does: longer than a worker may outlive its parent."""
    time.sleep(4)
    return 100.0


TINY = [
    VIDEO, "--num-frames", 2, "--clip-step", 2, "--frame-range", 0, 40, "--hr-size", 32, 32, "--lr-scale", 0.5,
    "--degradations", "none=1", "--frames-format", "png", "--quality-score", "tests.test_make_pairs:slow_score",
]  # fmt: skip


def wait_for_manifest(root: Path, lines: int = 1, timeout: float = 120) -> None:
    manifest, deadline = root / "manifest.jsonl", time.time() + timeout
    while time.time() < deadline and (not manifest.is_file() or len(manifest.read_text().splitlines()) < lines):
        time.sleep(0.05)
    assert manifest.is_file(), "the first run made no clip in time"


def test_two_make_pairs_runs_on_one_folder(tmp_path):
    """Regression: two runs at once wrote 18 duplicate ids, and a second run started 1.5 s later deleted the first
    one's temporary folder. Now the second run is refused at once, naming the folder and the first one's pid; the
    first finishes; the dataset reads back with every clip once."""
    from cascade_vsr.pair_dataset import read_pair_dataset

    root = tmp_path / "pairs"
    first = cli_process(*TINY, "--output-dir", root)
    wait_for_manifest(root)
    second = cli_process(*TINY, "--output-dir", root)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 2, err[-2000:]
    assert re.search(rf"error: `--output-dir` '{re.escape(str(root))}' is in use by another make-pairs run "
                     rf"\(pid {first.pid} holds", err), err[-2000:]  # fmt: skip
    out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-2000:]
    records = read_pair_dataset(root)
    assert len(records) == len({r["id"] for r in records}) == 20 - len(read_manifest(root, "rejected.jsonl"))
    check_dataset(root, len(records))

    # started at the same moment: whichever gets the lock makes the clips, the other one is refused or finds
    # them done; never a duplicate
    root = tmp_path / "together"
    runs = [cli_process(*TINY, "--output-dir", root, "--seed", 3) for _ in range(2)]
    results = [run.communicate(timeout=240) + (run.returncode,) for run in runs]
    assert sorted(code for _, _, code in results) in ([0, 0], [0, 2]), [err[-1000:] for _, err, _ in results]
    assert all("in use by another make-pairs run" in err for _, err, code in results if code == 2)
    records = read_pair_dataset(root)
    assert len(records) == len({r["id"] for r in records}) == 20 - len(read_manifest(root, "rejected.jsonl"))


def children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is `pid` and which run a multiprocessing spawn worker."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z" and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_a_killed_parent(tmp_path):
    """Regression: the workers of a SIGKILLed `--num-workers 2` run went on for ~15 s. They now end with it."""
    root = tmp_path / "pairs"
    slow = [*TINY[:-1], "tests.test_make_pairs:very_slow_score"]
    parent = cli_process(*slow, "--output-dir", root, "--num-workers", 2)
    wait_for_manifest(root)  # the workers are up, each in the middle of a 4 s clip
    workers = children(parent.pid)
    assert len(workers) == 2, workers
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 2
    while time.time() < deadline and any(alive(pid) for pid in workers):
        time.sleep(0.05)
    assert not [pid for pid in workers if alive(pid)]
    # the killed run's lock went with it (flock), and what it finished reads back
    from cascade_vsr.pair_dataset import PairDatasetWriter, read_pair_dataset

    with PairDatasetWriter(root).lock():
        pass
    assert len(read_pair_dataset(root)) >= 1
