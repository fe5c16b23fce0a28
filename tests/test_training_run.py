"""Trainer runs: exact resume, 2-process DDP on CPU (gloo), calibration of the detail-aware sampler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from cascade_vsr import CascadeVSRTransformer3DModel, LatentUpsampler3D
from cascade_vsr.cli import main as cli_main
from cascade_vsr.core.flow import add_noise, noise_augment
from cascade_vsr.training.config import load_config
from cascade_vsr.training.samplers import DetailAwareTimestepSampler
from cascade_vsr.training.trainer import CascadeVSRTrainModule, clip_squared_error, export_pipeline, train

from ._recipes import TINY_MODEL_ARGS as TINY_ARGS_NO_DATA
from ._recipes import tiny_args
from .conftest import TINY_TRANSFORMER, TINY_UPSAMPLER, randomize_
from .test_training_data import write_clip

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--crop_size", "2", "4", "--num_latent_frames", "1", "--train_batch_size", "2", "--lr_warmup_steps", "2"]


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]


def test_resume_is_exact(pairs, tmp_path):
    common = [*SMALL, "--checkpointing_steps", "2", "--ema_decay", "0.9", "--learning_rate", "1e-3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(*load_config(None, tiny_args(pairs, straight, 4, *common)))
    train(*load_config(None, tiny_args(pairs, resumed, 2, *common)))
    train(*load_config(None, tiny_args(pairs, resumed, 4, *common, "--resume_from_checkpoint", "latest")))

    log_a, log_b = read_log(straight), read_log(resumed)
    assert [r["step"] for r in log_b] == [1, 2, 3, 4]
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    assert [r["lr"] for r in log_a] == [r["lr"] for r in log_b]
    # raw weights (checkpoint) and EMA weights (export) are identical
    for name in (
        "checkpoints/checkpoint-4/model.safetensors",
        "export/transformer/diffusion_pytorch_model.safetensors",
    ):
        a, b = load_file(straight / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # the EMA export differs from the raw weights (EMA was really applied and restored)
    raw = load_file(straight / "checkpoints/checkpoint-4/model.safetensors")
    ema = load_file(straight / "export/transformer/diffusion_pytorch_model.safetensors")
    assert not torch.equal(raw["transformer.proj_out.weight"], ema["proj_out.weight"])


def test_stage_transition_loads_export_with_new_attention_config(pairs, tmp_path):
    first = tmp_path / "stage1"
    summary = train(*load_config(None, tiny_args(pairs, first, 1, *SMALL)))
    second = train(
        *load_config(
            None,
            tiny_args(pairs, tmp_path / "stage2", 1, *SMALL, "--pretrained_model_name_or_path", summary["export_dir"]),
        )
    )
    exported = load_file(Path(summary["export_dir"]) / "upsampler/diffusion_pytorch_model.safetensors")
    assert second["model"].upsampler.config.hidden_channels == 32
    assert exported.keys() == set(second["model"].upsampler.state_dict())
    with pytest.raises(ValueError, match="attention_mode"):
        load_config(None, ["--data_dir", str(pairs), "--attention_mode", "sparse_nope"])


def test_upsampler_training_modes_keep_the_loaded_upsampler(pairs, tmp_path):
    """`frozen` exports the loaded upsampler unchanged; `resize` exports it with a zero residual (exactly the base
    resize) and otherwise unchanged; the transformer trains in both."""
    fast = ["--learning_rate", "1e-2", "--use_ema", "false"]  # export the raw weights
    start = train(*load_config(None, tiny_args(pairs, tmp_path / "start", 3, *SMALL, *fast)))
    loaded = load_file(Path(start["export_dir"]) / "upsampler/diffusion_pytorch_model.safetensors")
    assert loaded["conv_out.weight"].abs().sum() > 0  # joint training moved the residual off zero
    for mode in ("frozen", "resize"):
        summary = train(
            *load_config(
                None,
                tiny_args(
                    pairs,
                    tmp_path / mode,
                    3,
                    *SMALL,
                    *fast,
                    "--upsampler_training",
                    mode,
                    "--pretrained_model_name_or_path",
                    start["export_dir"],
                ),
            )
        )
        export = Path(summary["export_dir"])
        upsampler = load_file(export / "upsampler/diffusion_pytorch_model.safetensors")
        for name, value in upsampler.items():
            expected = torch.zeros_like(value) if mode == "resize" and name.startswith("conv_out") else loaded[name]
            torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=f"{mode}: {name}")
        transformer = load_file(export / "transformer/diffusion_pytorch_model.safetensors")
        before = load_file(Path(start["export_dir"]) / "transformer/diffusion_pytorch_model.safetensors")
        assert not torch.equal(transformer["proj_out.weight"], before["proj_out.weight"])
    with pytest.raises(ValueError, match="upsampler_training"):
        load_config(None, ["--data_dir", str(pairs), "--upsampler_training", "detached"])


def test_preconditioned_loss_is_the_mse_of_the_normalized_posterior_residual():
    """With `condition_residual_std` the network sees the standardized Gaussian posterior mean of the clean latent,
    and the trainer's loss is the MSE between its raw output and the clean latent's deviation from that posterior
    mean in posterior stds (both from the textbook conditioning formulas)."""
    torch.manual_seed(0)
    preconditioned = randomize_(CascadeVSRTransformer3DModel(**TINY_TRANSFORMER, condition_residual_std=0.06))
    raw = CascadeVSRTransformer3DModel(**TINY_TRANSFORMER)  # same weights, returns the network output itself
    raw.load_state_dict(preconditioned.state_dict())
    upsampler = randomize_(LatentUpsampler3D(**TINY_UPSAMPLER))
    hr, lr = torch.randn(3, 4, 1, 4, 6), torch.randn(3, 4, 1, 2, 3)
    noise, aug_noise = torch.randn_like(hr), torch.randn_like(hr)
    sigma, level = torch.tensor([0.9, 0.4, 0.05]), torch.tensor([0.0, 0.1, 0.3])
    drop = torch.ones(3, dtype=torch.bool)
    with torch.no_grad():
        loss = CascadeVSRTrainModule(upsampler, preconditioned)(hr, lr, noise, sigma, aug_noise, level, drop)
        condition = noise_augment(upsampler(lr, size=(4, 6)).sample, level, noise=aug_noise)
    noisy = add_noise(hr, noise, sigma)

    keep = ((1 - level) ** 2 + level**2).reshape(3, 1, 1, 1, 1)
    s, a = sigma.reshape(3, 1, 1, 1, 1), level.reshape(3, 1, 1, 1, 1)
    mean, variance = (1 - a) / keep * condition, 0.06**2 + a**2 / keep  # prior of the clean latent
    noisy_variance, covariance = (1 - s) ** 2 * variance + s**2, (1 - s) * variance
    posterior_mean = mean + covariance / noisy_variance * (noisy - (1 - s) * mean)
    posterior_std = (variance - covariance**2 / noisy_variance).sqrt()
    with torch.no_grad():
        network_input = (posterior_mean - mean) / variance.sqrt()
        output = raw(network_input, condition, timestep=sigma * 1000, noise_aug_level=level).sample
    expected = ((output - (hr - posterior_mean) / posterior_std) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)


def test_temporal_loss_adds_the_squared_frame_to_frame_change_of_the_error(pairs):
    """`temporal_loss_weight` adds w * sum_f (e_f - e_{f-1})^2 over latent frames f >= 1 to the squared velocity
    error e of each clip, checked against a loop over frames of the raw model output."""
    torch.manual_seed(0)
    transformer = randomize_(CascadeVSRTransformer3DModel(**TINY_TRANSFORMER))
    upsampler = randomize_(LatentUpsampler3D(**TINY_UPSAMPLER))
    hr, lr = torch.randn(2, 4, 3, 4, 6), torch.randn(2, 4, 3, 2, 3)
    noise, aug_noise = torch.randn_like(hr), torch.randn_like(hr)
    sigma, level, drop = torch.tensor([0.7, 0.2]), torch.tensor([0.0, 0.2]), torch.ones(2, dtype=torch.bool)
    inputs = (hr, lr, noise, sigma, aug_noise, level, drop)
    with torch.no_grad():
        plain = CascadeVSRTrainModule(upsampler, transformer)(*inputs)
        temporal = CascadeVSRTrainModule(upsampler, transformer, temporal_loss_weight=0.5)(*inputs)
        condition = noise_augment(upsampler(lr, size=(4, 6)).sample, level, noise=aug_noise)
        velocity = transformer(add_noise(hr, noise, sigma), condition, timestep=sigma * 1000, noise_aug_level=level)
    error = velocity.sample - (noise - hr)
    squared, change = 0.0, 0.0
    for frame in range(error.shape[2]):
        squared += error[:, :, frame].square().sum()
        if frame > 0:
            change += (error[:, :, frame] - error[:, :, frame - 1]).square().sum()
    torch.testing.assert_close(plain, squared / error.numel())
    torch.testing.assert_close(temporal, (squared + 0.5 * change) / error.numel())
    assert temporal > plain
    # a still clip whose error is the same in every frame costs nothing extra
    still = clip_squared_error(error[:, :, :1].expand_as(error), temporal_loss_weight=3.0)
    torch.testing.assert_close(still, error[:, :, :1].expand_as(error).square())
    with pytest.raises(ValueError, match="temporal_loss_weight"):
        load_config(None, ["--data_dir", str(pairs), "--temporal_loss_weight", "-1"])


def test_pixel_space_model_config_resizes_on_the_pixel_grid(pairs, tmp_path):
    """`latent_space: space_to_depth` gives an upsampler that starts as a bicubic resize of the pixels, and the
    preconditioning setting travels with the export."""
    pixel_space = ["--data_dir", str(pairs), "--latent_space", "space_to_depth"]
    model_config, *_ = load_config(None, [*pixel_space, "--latent_channels", "48"])
    kwargs = model_config.upsampler_kwargs()
    assert kwargs["space_to_depth_factor"] == 4 and kwargs["resize_mode"] == "bicubic"
    for bad, match in [
        (["--latent_channels", "16"], "latent_channels.*3 \\* factor"),
        (["--latent_channels", "48", "--condition_residual_std", "-1"], "condition_residual_std"),
        (["--latent_channels", "48", "--upsampler_resize_mode", "area"], "upsampler_resize_mode"),
    ]:
        with pytest.raises(ValueError, match=match):
            load_config(None, [*pixel_space, *bad])
    summary = train(
        *load_config(None, tiny_args(pairs, tmp_path / "run", 2, *SMALL, "--condition_residual_std", "0.1"))
    )
    exported = CascadeVSRTransformer3DModel.from_pretrained(Path(summary["export_dir"]) / "transformer")
    assert exported.config.condition_residual_std == 0.1


DDP_SCRIPT = """
import os
import sys
from safetensors.torch import save_file
from cascade_vsr.training.config import load_config
from cascade_vsr.training.trainer import train
from accelerate import PartialState

summary = train(*load_config(sys.argv[1]))
state = {k: v.contiguous() for k, v in summary["model"].state_dict().items()}
assert PartialState().distributed_type == "MULTI_CPU" and PartialState().num_processes == 2
save_file(state, f"{sys.argv[2]}/rank{os.environ['RANK']}.safetensors")
"""


def test_ddp_two_cpu_processes(pairs, tmp_path):
    args = tiny_args(pairs, tmp_path / "out", 2, *SMALL)
    config = {}
    i = 0
    while i < len(args):
        key, values = args[i].lstrip("-"), []
        i += 1
        while i < len(args) and not args[i].startswith("--"):
            values.append(args[i])
            i += 1
        config[key] = [int(v) for v in values] if key in ("crop_size", "patch_size") else values[0]
    config["train_batch_size"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "ddp.py").write_text(textwrap.dedent(DDP_SCRIPT))
    # `accelerate launch --cpu --num_processes 2` starts ONE process unless mpirun is configured (accelerate 1.15);
    # the torchrun launcher (--multi_gpu) with ACCELERATE_USE_CPU gives 2 CPU processes on gloo (MULTI_CPU).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(tmp_path / "ddp.py")]

    def launch() -> None:
        result = subprocess.run(
            [*command, str(tmp_path / "config.json"), str(tmp_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
        # and training moved the weights (the zero-initialised output layer is no longer zero)
        assert rank0["transformer.proj_out.weight"].abs().sum() > 0

    launch()
    assert [r["step"] for r in read_log(tmp_path / "out")] == [1, 2]
    # resumed on two processes: every rank restores the checkpoint the main process wrote (unwrapped names)
    saved = load_file(tmp_path / "out/checkpoints/checkpoint-2/model.safetensors")
    assert all(k.startswith(("upsampler.", "transformer.")) for k in saved)
    config.update(max_train_steps=3, resume_from_checkpoint="latest")
    (tmp_path / "config.json").write_text(json.dumps(config))
    launch()
    assert [r["step"] for r in read_log(tmp_path / "out")] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "out/checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]


def test_calibration_writes_a_distribution_that_sampling_follows(tmp_path):
    torch.manual_seed(0)
    upsampler = randomize_(LatentUpsampler3D(**TINY_UPSAMPLER))
    transformer = randomize_(CascadeVSRTransformer3DModel(**TINY_TRANSFORMER), std=0.2)
    export_pipeline(tmp_path / "model", upsampler, transformer)
    data = tmp_path / "data"
    for k in range(2):
        write_clip(data, f"c{k}", (4, 2, 4, 6), (4, 2, 8, 12))
    output = tmp_path / "calib" / "curve.json"
    assert (
        cli_main(
            ["calibrate-sampler", "--model", str(tmp_path / "model"), "--data", str(data), "--output", str(output)]
            + ["--num-steps", "10", "--num-clips", "2"]
        )
        == 0
    )
    curve = json.loads(output.read_text())
    edges, density = torch.tensor(curve["edges"]), torch.tensor(curve["density"])
    assert len(edges) == 11 and edges[0] == 0 and edges[-1] == 1 and torch.all(edges[1:] > edges[:-1])
    assert torch.all(density > 0)
    assert torch.isclose((density * (edges[1:] - edges[:-1])).sum(), torch.tensor(1.0, dtype=density.dtype))
    assert len(curve["gain"]) == 10 and len(curve["hf_energy"]) == 11
    assert output.with_suffix(".png").stat().st_size > 1000

    sampler = DetailAwareTimestepSampler.from_json(output)
    samples = sampler.sample(20000, torch.Generator().manual_seed(1)).double().sort().values
    n = len(samples)
    cdf = sampler.cdf_at(samples)
    ks = torch.maximum(torch.arange(1, n + 1) / n - cdf, cdf - torch.arange(n) / n).max()
    assert ks < 1.63 / n**0.5


def test_cli_train_bf16_checkpointing_accumulation(pairs, tmp_path, request):
    """`cascade-vsr train --config C -- overrides` with bf16 autocast, gradient checkpointing and accumulation."""
    # accelerate keeps one process-wide state; this test's mixed precision differs from the other runs'.
    AcceleratorState._reset_state(reset_partial_state=True)
    request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
    config = tmp_path / "config.yaml"
    config.write_text(f"data_dir: {pairs}\noutput_dir: {tmp_path / 'out'}\nmax_train_steps: 2\nreport_to: none\n")
    overrides = [*TINY_ARGS_NO_DATA, *SMALL, "--mixed_precision", "bf16", "--gradient_checkpointing"]
    assert cli_main(["train", "--config", str(config), "--", *overrides, "--gradient_accumulation_steps", "2"]) == 0
    log = read_log(tmp_path / "out")
    assert [r["step"] for r in log] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    # the layout CascadeVSRPipeline.from_pretrained loads (component libraries are module paths)
    model_index = json.loads((tmp_path / "out/export/model_index.json").read_text())
    assert model_index["_class_name"] == "CascadeVSRPipeline"
    assert model_index["upsampler"] == ["cascade_vsr.models.upsampler", "LatentUpsampler3D"]
    assert model_index["transformer"] == ["cascade_vsr.models.transformer", "CascadeVSRTransformer3DModel"]
    assert (tmp_path / "out/export/scheduler/scheduler_config.json").is_file()


def test_train_config_sampling_is_what_the_export_recommends():
    from cascade_vsr.training.config import TrainConfig

    config = TrainConfig(
        noise_aug_min=0.1, noise_aug_max=0.3, sampling_num_inference_steps=4, sampling_self_ensemble=2
    )
    assert config.sampling() == {
        "num_inference_steps": 4,
        "noise_aug_strength": pytest.approx(0.2),  # the middle of the training range when not given
        "noise_frame_correlation": 0.0,
        "guidance_scale": 1.0,
        "self_ensemble": 2,
    }
    assert TrainConfig(sampling_noise_aug_strength=0.0).sampling()["noise_aug_strength"] == 0.0
