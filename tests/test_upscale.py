"""`cascade-vsr upscale`: the same frames as the pipeline with the model's own settings, any input form, chunks and
tiles, no half-written output, no silent overwrite."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from einops import rearrange

from cascade_vsr import CascadeVSRPipeline, demo_model_path
from cascade_vsr.cli import main
from cascade_vsr.core.metrics import psnr
from cascade_vsr.core.streams import VideoSink
from cascade_vsr.core.video import read_frames, read_video, resize_frames, sample_video_path
from tests.conftest import tiny_stage_folder

# The tests that compare `upscale` with a float32 pipeline pin its dtype (`--dtype auto` is bfloat16 on AMX CPUs).
FP32 = ("--dtype", "float32")
SAMPLING = {"num_inference_steps": 1, "noise_aug_strength": 0.0, "noise_frame_correlation": 1.0, "self_ensemble": 2}


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    return tiny_stage_folder(tmp_path_factory.mktemp("stage") / "model", SAMPLING)


@pytest.fixture(scope="module")
def lr_frames():
    frames = read_video(sample_video_path("carphone_pristine.mp4"), num_frames=24)
    return resize_frames(frames[:, :128, :160], (32, 40), mode="area")


def pipeline_frames(model, frames, seed=0):
    """What `CascadeVSRPipeline.from_pretrained(model)(video=...)` returns with no sampler arguments, as uint8."""
    pipe = CascadeVSRPipeline.from_pretrained(model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    video = rearrange(torch.from_numpy(frames), "t h w c -> 1 t c h w").float() / 255
    out = pipe(video=video, scale=2, generator=torch.Generator().manual_seed(seed), output_type="np").frames[0]
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


def test_png_folder_and_mp4_inputs_give_the_pipelines_frames(tmp_path, stage, lr_frames):
    with VideoSink(tmp_path / "lr") as sink:
        sink.write(lr_frames)
    with VideoSink(tmp_path / "lr.mp4", crf=0) as sink:
        sink.write(lr_frames)
    expected = pipeline_frames(stage, lr_frames)
    assert (
        main(
            ["upscale", str(tmp_path / "lr"), "-o", str(tmp_path / "sr"), "--scale", "2", "--model", str(stage), *FP32]
        )
        == 0
    )
    np.testing.assert_array_equal(read_frames(tmp_path / "sr"), expected)

    decoded = read_video(tmp_path / "lr.mp4")
    assert (
        main(
            [
                "upscale",
                str(tmp_path / "lr.mp4"),
                "-o",
                str(tmp_path / "sr_mp4"),
                "--scale",
                "2",
                "--model",
                str(stage),
                *FP32,
            ]
        )
        == 0
    )
    np.testing.assert_array_equal(read_frames(tmp_path / "sr_mp4"), pipeline_frames(stage, decoded))


def test_long_input_runs_in_overlapping_chunks(tmp_path, stage, lr_frames, capsys):
    with VideoSink(tmp_path / "lr") as sink:
        sink.write(lr_frames)
    args = [
        "upscale",
        str(tmp_path / "lr"),
        "-o",
        str(tmp_path / "sr.mp4"),
        "--scale",
        "2",
        "--model",
        str(stage),
        "--chunk-frames",
        "10",
        "--chunk-overlap",
        "2",
        "--self-ensemble",
        "1",
    ]
    assert main(args) == 0
    assert "24 frames 40x32 -> 80x64" in capsys.readouterr().out
    output = read_video(tmp_path / "sr.mp4")
    assert output.shape == (24, 64, 80, 3)
    whole = pipeline_frames(stage, lr_frames)  # a different ensemble size: only a sanity bound
    assert float(psnr(output, whole).mean()) > 15
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        main(args)
    assert main([*args, "--overwrite", "--self-ensemble", "2"]) == 0
    assert read_video(tmp_path / "sr.mp4").shape == (24, 64, 80, 3)


def test_several_inputs_go_to_a_folder(tmp_path, stage, lr_frames):
    for name in ("a", "b"):
        with VideoSink(tmp_path / name) as sink:
            sink.write(lr_frames[:3])
    with VideoSink(tmp_path / "c.mp4", crf=0) as sink:
        sink.write(lr_frames[:3])
    options = ["-o", str(tmp_path / "out"), "--scale", "2", "--model", str(stage)]
    assert main(["upscale", str(tmp_path / "a"), str(tmp_path / "b"), *options]) == 0
    assert main(["upscale", str(tmp_path / "a"), str(tmp_path / "c.mp4"), *options, "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a", "b", "c.mp4"]
    with pytest.raises(ValueError, match="several inputs go to a folder"):
        main(["upscale", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "x.mp4"), "--scale", "2"])


def test_bad_arguments_fail_before_the_model_loads(tmp_path, stage, lr_frames):
    with VideoSink(tmp_path / "lr") as sink:
        sink.write(lr_frames[:2])
    base = ["upscale", str(tmp_path / "lr"), "-o", str(tmp_path / "sr"), "--model", str(stage)]
    for extra, message in (
        (["--scale", "0.5"], "`--scale`"),
        (["--scale", "2", "--chunk-overlap", "40"], "`--chunk-overlap`"),
        (["--scale", "2", "--tile", "16", "--tile-overlap", "16"], "`--tile-overlap`"),
        (["--scale", "2", "--self-ensemble", "9"], "`--self-ensemble`"),
        (["--scale", "2", "--device", "cuda:7"], "`--device`"),
        (["--scale", "2", "--model", str(tmp_path)], "`--model`"),
        (["--size", "16", "16"], "must not be smaller"),
    ):
        with pytest.raises(ValueError, match=message):
            main([*base, *extra])
    with pytest.raises(ValueError, match="`input`"):
        main(["upscale", str(tmp_path / "missing"), "-o", str(tmp_path / "sr"), "--scale", "2", "--model", str(stage)])
    assert not (tmp_path / "sr").exists()


def test_a_killed_upscale_leaves_no_output(tmp_path, stage, lr_frames):
    with VideoSink(tmp_path / "lr") as sink:
        sink.write(np.concatenate([lr_frames] * 4))
    command = [
        sys.executable,
        "-m",
        "cascade_vsr.cli",
        "upscale",
        str(tmp_path / "lr"),
        "-o",
        str(tmp_path / "sr.mp4"),
        "--scale",
        "2",
        "--model",
        str(stage),
        "--chunk-frames",
        "4",
        "--chunk-overlap",
        "1",
    ]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".sr.partial-*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list(tmp_path.glob(".sr.partial-*")), "the run never started writing"
        os.kill(process.pid, sig)
        process.wait(timeout=60)
        assert not (tmp_path / "sr.mp4").exists()
        # SIGTERM removes its partial output at once; after SIGKILL the next writer of the path removes it
        assert bool(list(tmp_path.glob(".sr.partial-*"))) == (sig == signal.SIGKILL)
    VideoSink(tmp_path / "sr.mp4")
    assert not list(tmp_path.glob(".sr.partial-*"))


def test_tiled_output_is_close_to_untiled_with_the_demo_model(tmp_path):
    frames = read_video(sample_video_path("bigbuckbunny.mp4"), start=100, num_frames=3)
    ground_truth = resize_frames(frames, (96, 160), crop_to_aspect=True)
    lr = resize_frames(ground_truth, (48, 80), mode="area")
    with VideoSink(tmp_path / "lr") as sink:
        sink.write(lr)
    base = ["upscale", str(tmp_path / "lr"), "--scale", "2", "--model", str(demo_model_path()), "--self-ensemble", "1"]
    assert main([*base, "-o", str(tmp_path / "whole")]) == 0
    assert main([*base, "-o", str(tmp_path / "tiled"), "--tile", "32", "--tile-overlap", "16"]) == 0
    whole, tiled = read_frames(tmp_path / "whole"), read_frames(tmp_path / "tiled")
    assert whole.shape == tiled.shape == (3, 96, 160, 3)
    assert float(psnr(tiled, whole).mean()) > 35  # tiles see less context: close to, not equal to, the whole frame
    quality = [float(psnr(output, ground_truth).mean()) for output in (whole, tiled)]
    assert abs(quality[0] - quality[1]) < 0.5, quality


def test_the_stage_folder_carries_its_sampling_settings(stage):
    pipe = CascadeVSRPipeline.from_pretrained(stage, local_files_only=True)
    assert pipe.sampling_settings() == {**SAMPLING, "sigmas": None, "guidance_scale": 1.0}
    # explicit arguments win; the model's self-ensemble applies to pixel input and output only
    assert pipe.sampling_settings(num_inference_steps=4)["num_inference_steps"] == 4
    assert pipe.sampling_settings(pixels_in_and_out=False)["self_ensemble"] == 1


def test_reference_prints_the_evaluate_table(tmp_path, stage, lr_frames, capsys):
    ground_truth = resize_frames(lr_frames[:3], (64, 80), mode="bicubic")
    with VideoSink(tmp_path / "lr") as sink:
        sink.write(lr_frames[:3])
    with VideoSink(tmp_path / "gt") as sink:
        sink.write(ground_truth)
    assert (
        main(
            [
                "upscale",
                str(tmp_path / "lr"),
                "-o",
                str(tmp_path / "sr"),
                "--scale",
                "2",
                "--model",
                str(stage),
                "--reference",
                str(tmp_path / "gt"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    sr = read_frames(tmp_path / "sr")
    expected = float(psnr(sr, ground_truth).mean())
    assert "cascade-vsr" in printed and "bicubic" in printed and f"{expected:10.2f}" in printed


@pytest.fixture(scope="module")
def causal_stage(tmp_path_factory):
    """A tiny random block-causal stage folder (2 latent frames a chunk, 1 cached chunk)."""
    settings = {"num_inference_steps": 1, "noise_aug_strength": 0.0, "noise_frame_correlation": 1.0}
    return tiny_stage_folder(
        tmp_path_factory.mktemp("causal") / "model",
        settings,
        attention_mode="window",
        window_size=(2, 4, 4),
        causal_chunk_frames=2,
        causal_cache_chunks=1,
    )


def test_a_block_causal_stage_streams_by_default(tmp_path, causal_stage, lr_frames, monkeypatch, capsys):
    """`upscale` streams a block-causal stage: its frames are `CascadeVSRPipeline.stream`'s on the encoded input.
    --no-stream runs the windowed path instead (`stream` is never called), whose offline block-causal form gives
    the same frames to within a grey level."""
    from cascade_vsr.models.space_to_depth import SpaceToDepthAutoencoder

    frames = lr_frames[:7]
    folder = tmp_path / "in"
    with VideoSink(folder) as sink:  # a folder of PNG frames
        sink.write(frames)
    out = tmp_path / "streamed"
    assert main(["upscale", str(folder), "-o", str(out), "--model", str(causal_stage), "--scale", "2", *FP32]) == 0
    streamed = read_frames(out)

    pipe = CascadeVSRPipeline.from_pretrained(causal_stage, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    video = rearrange(torch.from_numpy(frames), "t h w c -> 1 t c h w").float() / 255
    lr = SpaceToDepthAutoencoder().encode(pipe.preprocess_video(pipe.adapter, video)).latent_dist.mode()
    chunks = [lr[:, :, i : i + 2] for i in range(0, 7, 2)]
    expected = np.concatenate(
        [c[0] for c in pipe.stream(chunks, scale=2, generator=torch.Generator().manual_seed(0), output_type="np")]
    )
    np.testing.assert_array_equal(streamed, np.clip(np.rint(expected * 255), 0, 255).astype(np.uint8))
    batched = tmp_path / "batched"  # 3 chunks of 2 frames per forward: the same frames
    args = ["upscale", str(folder), "-o", str(batched), "--model", str(causal_stage), "--scale", "2", *FP32]
    assert main([*args, "--chunks-per-forward", "3"]) == 0
    np.testing.assert_array_equal(read_frames(batched), streamed)
    for bad, message in ((["--chunks-per-forward", "0"], "must be >= 1, got 0"),
                         (["--chunks-per-forward", "auto", "--no-stream"], "applies to streaming"),
                         (["--chunks-per-forward", "2", "--no-stream"], "applies to streaming")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            main([*args[:3], str(tmp_path / "refused"), *args[4:], *bad])
        assert not (tmp_path / "refused").exists()
    with pytest.raises(SystemExit):  # argparse: "expected an int >= 1 or 'auto', got 'many'"
        main([*args[:3], str(tmp_path / "refused"), *args[4:], "--chunks-per-forward", "many"])
    assert "expected an int >= 1 or 'auto', got 'many'" in capsys.readouterr().err

    windowed = tmp_path / "windowed"
    args = ["upscale", str(folder), "-o", str(windowed), "--model", str(causal_stage), "--scale", "2", *FP32]
    args.append("--no-stream")
    with monkeypatch.context() as patch:
        patch.setattr(CascadeVSRPipeline, "stream", lambda *a, **k: pytest.fail("--no-stream must not stream"))
        assert main(args) == 0
    assert read_frames(windowed).shape == streamed.shape
    np.testing.assert_allclose(read_frames(windowed), streamed, rtol=0, atol=1)
    with pytest.raises(ValueError, match="--tile do not stream: pass --no-stream"):
        main([*args[:-1], "-o", str(tmp_path / "tiled"), "--tile", "32"])
    assert not (tmp_path / "tiled").exists()


def test_dtype_auto_is_bfloat16_on_a_cpu_with_amx_and_float32_elsewhere(monkeypatch):
    from cascade_vsr.core.precision import resolve_dtype

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_dtype("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto", "meta") == "float32"
    assert resolve_dtype("float16", "cpu") == "float16"


def test_a_bfloat16_stage_hands_its_transformer_the_clip_unrounded(causal_stage, lr_frames):
    """Loaded in bfloat16 (as `upscale` loads it), the stage keeps the clip at float32 from the frames to the
    transformer's first layer: the space-to-depth VAE reports float32, the upsampler's base resize is float32, and
    the patch embedding stays float32 (`_keep_in_fp32_modules`). With a zero residual the condition and the patch
    embedding's input equal the float32 stage's, bit for bit."""
    from cascade_vsr.commands.upscale import load_stage

    video = rearrange(torch.from_numpy(lr_frames[:4]), "t h w c -> 1 t c h w").float() / 255
    seen = {}
    for dtype in ("float32", "bfloat16"):
        pipe = load_stage(causal_stage, "cpu", dtype)
        pipe.upsampler.reset_residual()
        transformer = pipe.transformer
        assert transformer.dtype == getattr(torch, dtype) and transformer.patch_embedding.weight.dtype == torch.float32
        inputs = []
        transformer.patch_embedding.register_forward_pre_hook(
            lambda module, args, inputs=inputs: inputs.append(args[0])
        )
        lr = pipe.adapter.encode(pipe.vae, pipe.preprocess_video(pipe.adapter, video).to(pipe.vae.dtype))
        list(pipe.stream([lr], scale=2, output_type="latent", generator=torch.Generator().manual_seed(0)))
        seen[dtype] = torch.cat(inputs, dim=2)
    assert seen["bfloat16"].dtype == torch.float32
    assert torch.equal(seen["bfloat16"], seen["float32"])


def test_a_bfloat16_stream_stays_within_a_few_grey_levels_of_float32(tmp_path, causal_stage, lr_frames, monkeypatch):
    """`--dtype bfloat16` (what `auto` picks on an AMX CPU) runs the stage's modules in bfloat16, but the latents and
    the condition reach the transformer in float32 (rounded to bfloat16 they would move the whole clip by about a
    grey level): the frames move by the bfloat16 arithmetic inside the network, not more."""
    from cascade_vsr.pipelines import sampling

    with VideoSink(tmp_path / "in") as sink:
        sink.write(lr_frames[:5])
    base = ["upscale", str(tmp_path / "in"), "--model", str(causal_stage), "--scale", "2", "--dtype"]
    assert main([*base, "float32", "-o", str(tmp_path / "fp32")]) == 0
    seen = []
    velocity = sampling.guided_velocity

    def recorded(transformer, *args, **kwargs):
        def record(module, inputs, kwargs):
            seen.append((module.dtype, kwargs["hidden_states"].dtype, kwargs["condition"].dtype))

        handle = transformer.register_forward_pre_hook(record, with_kwargs=True)
        try:
            return velocity(transformer, *args, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(sampling, "guided_velocity", recorded)
    monkeypatch.setattr("cascade_vsr.pipelines.streaming.guided_velocity", recorded)
    assert main([*base, "bfloat16", "-o", str(tmp_path / "bf16")]) == 0
    assert seen and set(seen) == {(torch.bfloat16, torch.float32, torch.float32)}
    fp32, bf16 = read_frames(tmp_path / "fp32").astype(float), read_frames(tmp_path / "bf16").astype(float)
    assert fp32.shape == bf16.shape
    assert np.abs(fp32 - bf16).mean() < 1.0 and np.abs(fp32 - bf16).max() <= 8
