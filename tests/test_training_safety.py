"""Trainer safety: pickle-free checkpoints, kills during checkpoint writing, non-finite data, log truncation."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cascade_vsr.training import checkpoint as ckpt
from cascade_vsr.training.config import load_config
from cascade_vsr.training.trainer import NonFiniteTrainingError, export_pipeline, train

from ._recipes import tiny_args
from .test_training_run import SMALL, read_log

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTED = [*SMALL, "--checkpointing_steps", "2", "--ema_decay", "0.9", "--learning_rate", "1e-3"]


@pytest.fixture(scope="module")
def straight_run(pairs, tmp_path_factory):
    """An uninterrupted 4-step run with checkpoints at steps 2 and 4."""
    output = tmp_path_factory.mktemp("straight")
    train(*load_config(None, tiny_args(pairs, output, 4, *CHECKPOINTED)))
    return output


def assert_same_weights(a: Path, b: Path) -> None:
    for name in (
        "checkpoints/checkpoint-4/model.safetensors",
        "export/transformer/diffusion_pytorch_model.safetensors",
    ):
        left, right = load_file(a / name), load_file(b / name)
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left), name


# -- the format ---------------------------------------------------------------------------------------------------


def test_split_and_join_round_trip_nested_state():
    state = {
        "state": {
            0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)},
            "w": {"m": torch.ones(1, dtype=torch.bfloat16)},
        },
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, "w"], "fused": None, "amsgrad": False}],
        "numpy": np.arange(4, dtype=np.uint8),
        "name": "MT19937",
    }
    skeleton, tensors = ckpt.split_tensors(state)
    json.dumps(skeleton)  # the skeleton is plain JSON
    restored = ckpt.join_tensors(json.loads(json.dumps(skeleton)), tensors)
    assert restored["param_groups"] == state["param_groups"]
    assert isinstance(restored["param_groups"][0]["betas"], tuple)
    assert list(restored["state"]) == [0, "w"]
    assert torch.equal(restored["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert restored["state"][0]["step"].shape == () and restored["state"]["w"]["m"].dtype == torch.bfloat16
    assert torch.equal(restored["numpy"], torch.arange(4, dtype=torch.uint8))
    with pytest.raises(TypeError, match="cannot store a object"):
        ckpt.split_tensors({"x": object()})


def test_rng_state_round_trip(tmp_path):
    ckpt.save_state_file(tmp_path / "rng.safetensors", ckpt.rng_state())
    expected = (random.random(), np.random.rand(), torch.rand(()).item())
    ckpt.set_rng_state(ckpt.load_state_file(tmp_path / "rng.safetensors"))
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected


def test_checkpoint_files_are_safetensors_and_json_only(straight_run):
    folder = straight_run / "checkpoints" / "checkpoint-4"
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "checkpoint.json",
        "ema.safetensors",
        "model.safetensors",
        "optimizer.safetensors",
        "rng-rank0.safetensors",
    ]
    json.loads((folder / "checkpoint.json").read_text())
    for name in names[1:]:
        with safe_open(str(folder / name), framework="pt"):
            pass
    # the checkpoints of steps 2 and 4, nothing half-written beside them
    assert sorted(p.name for p in (straight_run / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]


# -- a planted payload never runs ------------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickle_payload_in_a_checkpoint_never_runs(pairs, straight_run, tmp_path):
    marker = tmp_path / "payload-ran"
    source = straight_run / "checkpoints" / "checkpoint-2"

    # 1. next to a valid checkpoint, under every name accelerate's load_state would unpickle: resume works
    planted = tmp_path / "planted" / "checkpoint-2"
    shutil.copytree(source, planted)
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "optimizer.bin", "scheduler.bin",
                 "random_states_0.pkl", "scaler.pt", "pytorch_model.bin"):  # fmt: skip
        torch.save({"state": _Payload(marker)}, planted / name)
    output = tmp_path / "resumed"
    train(*load_config(None, tiny_args(pairs, output, 3, *CHECKPOINTED, "--resume_from_checkpoint", str(planted))))
    assert [r["step"] for r in read_log(output)] == [3]
    assert not marker.exists()

    # 2. in place of each file of the checkpoint: a clear error, and still nothing runs
    for path in sorted(source.iterdir()):
        broken = tmp_path / f"broken-{path.stem}" / "checkpoint-2"
        shutil.copytree(source, broken)
        torch.save({"state": _Payload(marker)}, broken / path.name)
        args = tiny_args(
            pairs, tmp_path / f"out-{path.stem}", 3, *CHECKPOINTED, "--resume_from_checkpoint", str(broken)
        )
        with pytest.raises(ValueError, match=path.name.replace(".", r"\.")):
            train(*load_config(None, args))
        assert not marker.exists(), path.name


def test_accelerate_format_checkpoint_is_refused(pairs, tmp_path):
    folder = tmp_path / "checkpoint-7"
    folder.mkdir()
    torch.save({"step": 7}, folder / "custom_checkpoint_0.pkl")
    with pytest.raises(ValueError, match="unpickle"):
        train(
            *load_config(None, tiny_args(pairs, tmp_path / "out", 8, *SMALL, "--resume_from_checkpoint", str(folder)))
        )


# -- kills, resumes ---------------------------------------------------------------------------------------------------

KILLED_RUN = """
import os, signal, sys
from cascade_vsr.training import checkpoint
from cascade_vsr.training.config import load_config
from cascade_vsr.training.trainer import train

original = checkpoint.save_state_file
def save_then_die(path, state):
    original(path, state)
    if path.parent.name == ".tmp-checkpoint-4":  # the second checkpoint, half-written
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save_state_file = save_then_die
train(*load_config(None, sys.argv[1:]))
"""


def test_kill_while_writing_a_checkpoint_then_resume_latest(pairs, straight_run, tmp_path):
    output = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = tiny_args(pairs, output, 4, *CHECKPOINTED)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILLED_RUN), *args], env=env, capture_output=True, timeout=300
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    checkpoints = output / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".tmp-checkpoint-4", "checkpoint-2"]
    assert ckpt.find_checkpoint(output, "latest").name == "checkpoint-2"

    train(*load_config(None, [*args, "--resume_from_checkpoint", "latest"]))
    assert [r["step"] for r in read_log(output)] == [1, 2, 3, 4]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert_same_weights(straight_run, output)
    assert [r["loss"] for r in read_log(output)] == [r["loss"] for r in read_log(straight_run)]


def test_resume_from_an_earlier_checkpoint_truncates_the_log(pairs, straight_run, tmp_path):
    output = tmp_path / "again"
    shutil.copytree(straight_run, output)
    with (output / "log.jsonl").open("a") as log:
        log.write('{"step": 5, "lo')  # a torn line of a killed run
    checkpoint = output / "checkpoints" / "checkpoint-2"
    train(*load_config(None, tiny_args(pairs, output, 4, *CHECKPOINTED, "--resume_from_checkpoint", str(checkpoint))))
    assert [r["step"] for r in read_log(output)] == [1, 2, 3, 4]
    assert_same_weights(straight_run, output)


def test_resume_with_another_model_config_names_the_field(pairs, straight_run, tmp_path):
    args = tiny_args(pairs, tmp_path / "out", 6, *CHECKPOINTED, "--num_layers", "3")
    checkpoint = straight_run / "checkpoints" / "checkpoint-4"
    with pytest.raises(ValueError, match=r"transformer\.num_layers: checkpoint 2, this run 3"):
        train(*load_config(None, [*args, "--resume_from_checkpoint", str(checkpoint)]))


# -- non-finite values --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_latents_stop_the_run_at_once(pairs, tmp_path, value):
    data = tmp_path / "pairs"
    shutil.copytree(pairs, data)
    manifest = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
    bad = manifest[1]
    path = data / bad["latents"]
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    tensors["lr_latents"][0, 0, 0, 0] = value
    tensors["hr_latents"].fill_(value)
    save_file(tensors, str(path), metadata=metadata)

    output = tmp_path / "out"
    with pytest.raises(NonFiniteTrainingError, match=rf"non-finite training step \d+ \(model\): .*{bad['id']}"):
        train(*load_config(None, tiny_args(data, output, 6, *SMALL, "--checkpointing_steps", "1")))
    assert not (output / "export").exists()
    for folder in ckpt.complete_checkpoints(output / "checkpoints"):
        weights = load_file(folder / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values())


def test_export_refuses_non_finite_weights(tmp_path):
    from cascade_vsr import CascadeVSRTransformer3DModel, LatentUpsampler3D

    from .conftest import TINY_TRANSFORMER, TINY_UPSAMPLER

    transformer = CascadeVSRTransformer3DModel(**TINY_TRANSFORMER)
    with torch.no_grad():
        transformer.proj_out.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteTrainingError, match=r"proj_out\.weight"):
        export_pipeline(tmp_path / "export", LatentUpsampler3D(**TINY_UPSAMPLER), transformer)
    assert not (tmp_path / "export").exists()
