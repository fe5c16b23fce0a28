"""Bad arguments of the commands and of the shared checks fail at once with an error that names them."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from safetensors.torch import save_file

from cascade_vsr.cli import main as cli_main
from cascade_vsr.core.validation import (
    check_device,
    check_pretrained_source,
    check_writable_file,
    check_writable_folder,
    looks_like_hub_id,
)


def model_folder(root, weights: str = "diffusion_pytorch_model.safetensors"):
    root.mkdir(parents=True)
    (root / "config.json").write_text("{}")
    if weights.endswith(".safetensors"):
        save_file({"w": torch.zeros(1)}, str(root / weights))
    else:
        torch.save({"w": torch.zeros(1)}, root / weights)
    return root


@pytest.mark.parametrize(
    "name, hub", [("org/model", True), ("gpt2", True), ("./nope", False), ("../x/y", False), ("a/b/c", False)]
)
def test_hub_ids_and_local_paths(name, hub):
    assert looks_like_hub_id(name) is hub


def test_missing_local_model_path_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    for name in ("./nope", "outputs/stage1/export", "outputs/export", tmp_path / "missing"):
        started = time.perf_counter()
        with pytest.raises(FileNotFoundError, match="does not exist"):
            check_pretrained_source(name, "model")
        assert time.perf_counter() - started < 1
    check_pretrained_source("org/model", "model")  # a Hub id is left to diffusers


def test_model_folders_must_hold_safetensors(tmp_path):
    check_pretrained_source(model_folder(tmp_path / "ok"), "model")
    with pytest.raises(ValueError, match=r"`model`.*pickle weights \(diffusion_pytorch_model\.bin\).*safetensors"):
        check_pretrained_source(model_folder(tmp_path / "bad", "diffusion_pytorch_model.bin"), "model")
    # a pipeline folder: each component is checked
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    model_folder(tmp_path / "pipe" / "transformer", "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="only safetensors"):
        check_pretrained_source(tmp_path / "pipe", "--model")
    with pytest.raises(FileNotFoundError, match="no upsampler/ folder"):
        check_pretrained_source(tmp_path / "pipe", "--model", subfolder="upsampler")
    with pytest.raises(ValueError, match="is a file"):
        check_pretrained_source(tmp_path / "pipe" / "model_index.json", "--model")


# one index past this machine's last CUDA device (cuda:0 on a machine without CUDA)
MISSING_CUDA = f"cuda:{torch.cuda.device_count()}"


@pytest.mark.parametrize("device, match", [(MISSING_CUDA, "CUDA device"), ("gpu", "not a torch device")])
def test_unusable_devices(device, match):
    with pytest.raises(ValueError, match=match):
        check_device(device)
    check_device("cpu")


def test_output_locations(tmp_path):
    check_writable_folder(tmp_path / "new" / "folder", "--output-dir")
    with pytest.raises(ValueError, match="`--output-dir` '/proc/x'"):
        check_writable_folder("/proc/x", "--output-dir")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a directory"):
        check_writable_folder(tmp_path / "file", "--output-dir")
    with pytest.raises(ValueError, match="is a directory"):
        check_writable_file(tmp_path, "output")
    if os.geteuid() != 0:
        (tmp_path / "locked").mkdir(mode=0o500)
        with pytest.raises(ValueError, match="cannot create or write"):
            check_writable_folder(tmp_path / "locked" / "out", "--output-dir")


@pytest.mark.parametrize(
    "words, error, match",
    [
        (
            ["--num-frames", "100000", "--clips", "carphone"],
            ValueError,
            r"`--num-frames` 100000: the carphone clip has",
        ),
        (["--output-dir", "/proc/x"], ValueError, "`--output-dir`"),
        (["--device", MISSING_CUDA], ValueError, "`--device`"),
        (["--crop-size", "1000"], ValueError, "`--crop-size` 1000 must fit"),
        (["--model", "./no-such-model"], ValueError, "`--model`: no demo model at no-such-model"),
    ],
)
def test_demo_checks_before_loading(tmp_path, words, error, match):
    started = time.perf_counter()
    with pytest.raises(error, match=match):
        cli_main(["demo", "--output-dir", str(tmp_path / "demo"), *words])
    assert time.perf_counter() - started < 5
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize(
    "words, match",
    [
        (["--crf", "100"], "`--crf`"),
        (["--crf", "-5"], "`--crf`"),
        (["--guidance-scale", "nan"], "`--guidance-scale`"),
        (["--noise-aug-strength", "nan"], "`--noise-aug-strength`"),
        (["--bitrate", "0"], "`--bitrate`"),
        (["--scale", "inf"], "`--scale`"),
        (["--scale", "nan"], "`--scale`"),
        (["--codec", "bogus"], "`--codec` 'bogus' is not an encoder"),
        (["--codec", "aac"], "audio encoder"),
        (["--pix-fmt", "bogus"], "`--pix-fmt`"),
        (["--reference", "nope.mp4"], "`--reference`"),
    ],
)
def test_upscale_checks_before_loading(tmp_path, words, match):
    from cascade_vsr.core.video import sample_video_path

    source = str(sample_video_path("carphone_pristine.mp4"))
    scale = [] if "--scale" in words else ["--scale", "2"]
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        cli_main(["upscale", source, "--output", str(tmp_path / "out.mp4"), *scale, *words])
    assert list(tmp_path.iterdir()) == []


def test_upscale_and_evaluate_outputs_that_cannot_be_written(tmp_path):
    from cascade_vsr.core.video import sample_video_path

    source = str(sample_video_path("carphone_pristine.mp4"))
    with pytest.raises(ValueError, match="`--output` '/proc/x/out.mp4': cannot create"):
        cli_main(["upscale", source, "--output", "/proc/x/out.mp4", "--scale", "2"])
    with pytest.raises(ValueError, match="`--json` '/proc/x.json': cannot create"):
        cli_main(["evaluate", source, source, "--json", "/proc/x.json"])


def test_calibrate_checks_before_inference(tmp_path):
    (tmp_path / "curve.json").mkdir()
    base = ["calibrate-sampler", "--data", str(tmp_path / "pairs")]
    with pytest.raises(ValueError, match="`output`.*is a directory"):
        cli_main([*base, "--model", str(tmp_path), "--output", str(tmp_path / "curve.json")])
    with pytest.raises(FileNotFoundError, match="`model` './nope' does not exist"):
        cli_main([*base, "--model", "./nope", "--output", str(tmp_path / "c.json")])
    with pytest.raises(ValueError, match="`--num-steps`"):
        cli_main([*base, "--model", "./nope", "--output", str(tmp_path / "c.json"), "--num-steps", "0"])
    for flag, value in (("--cutoff", "2"), ("--floor", "-1"), ("--noise-level", "nan"), ("--num-clips", "0")):
        with pytest.raises(ValueError, match=f"`{flag}`"):
            cli_main([*base, "--model", "./nope", "--output", str(tmp_path / "c.json"), flag, value])


def test_train_with_a_missing_pretrained_model(tmp_path):
    from cascade_vsr.training.config import load_config
    from cascade_vsr.training.trainer import train

    config = tmp_path / "c.json"
    config.write_text(json.dumps({"data_dir": "x", "pretrained_model_name_or_path": "./outputs/stage1/export"}))
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="`pretrained_model_name_or_path`"):
        train(*load_config(config, ["--output_dir", str(tmp_path / "out")]))
    assert time.perf_counter() - started < 5 and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scale=float("nan")), "`scale` must be a finite number"),
        (dict(scale=float("inf")), "`scale` must be a finite number"),
        (dict(scale=(2, float("nan"))), "`scale`"),
        (dict(height=0, width=64), "positive ints"),
        (dict(height=-32, width=64), "positive ints"),
    ],
)
def test_target_size_refuses_non_finite_scales_and_non_positive_sizes(kwargs, match):
    from cascade_vsr.pipelines.target_size import resolve_target_size

    with pytest.raises(ValueError, match=match):
        resolve_target_size((16, 32), **kwargs)


def test_target_size_takes_numpy_numbers():
    import numpy as np

    from cascade_vsr.pipelines.target_size import resolve_target_size

    assert resolve_target_size((16, 32), height=np.int64(32), width=np.int64(64)) == (32, 64)
    assert resolve_target_size((16, 32), scale=np.float32(1.5)) == (24, 48)


def test_from_pretrained_of_every_model_checks_the_source_first(tmp_path):
    from cascade_vsr import CascadeVSRPipeline, CascadeVSRTransformer3DModel, LatentUpsampler3D
    from cascade_vsr.models.discriminator import CascadeVSRDiscriminator

    for cls in (LatentUpsampler3D, CascadeVSRTransformer3DModel, CascadeVSRDiscriminator, CascadeVSRPipeline):
        started = time.perf_counter()
        with pytest.raises(FileNotFoundError, match="'./nope' does not exist"):
            cls.from_pretrained("./nope")
        assert time.perf_counter() - started < 1
        with pytest.raises(ValueError, match="use_safetensors=False"):
            cls.from_pretrained(str(tmp_path), use_safetensors=False)
    upsampler = LatentUpsampler3D(latent_channels=4, hidden_channels=8, num_blocks=1)
    upsampler.save_pretrained(tmp_path / "up", safe_serialization=False)  # a pickle .bin
    with pytest.raises(ValueError, match="only safetensors"):
        LatentUpsampler3D.from_pretrained(tmp_path / "up")
    upsampler.save_pretrained(tmp_path / "ok")
    assert isinstance(LatentUpsampler3D.from_pretrained(tmp_path / "ok"), LatentUpsampler3D)
