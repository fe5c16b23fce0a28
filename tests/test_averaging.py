"""`cascade-vsr average-weights`: the weighted average of stage folders, tensor by tensor, checked before anything is
written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cascade_vsr import CascadeVSRPipeline, CascadeVSRTransformer3DModel
from cascade_vsr.cli import main
from cascade_vsr.training.averaging import average_stages, average_state_dicts
from tests.conftest import tiny_stage_folder

SAMPLING = {"num_inference_steps": 1, "noise_aug_strength": 0.0, "noise_frame_correlation": 1.0, "self_ensemble": 1}
WEIGHTS = "diffusion_pytorch_model.safetensors"


def test_average_of_state_dicts_is_the_weighted_sum_and_keeps_integer_buffers():
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(3, 4, generator=g), "h": torch.randn(5, generator=g).bfloat16(), "n": torch.tensor([7])}
    b = {"w": torch.randn(3, 4, generator=g), "h": torch.randn(5, generator=g).bfloat16(), "n": torch.tensor([7])}
    out = average_state_dicts([a, b], [0.25, 0.75])
    torch.testing.assert_close(out["w"], 0.25 * a["w"] + 0.75 * b["w"])
    assert out["h"].dtype == torch.bfloat16
    torch.testing.assert_close(out["h"].double(), (0.25 * a["h"].double() + 0.75 * b["h"].double()), atol=2e-2, rtol=0)
    assert torch.equal(out["n"], a["n"])
    torch.testing.assert_close(average_state_dicts([a, b])["w"], (a["w"] + b["w"]) / 2)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: {**s, "extra": torch.zeros(1)}, "other tensors"),
        (lambda s: {**s, "w": torch.zeros(4, 3)}, "tensor 'w'"),
        (lambda s: {**s, "n": torch.tensor([8])}, "not floating-point and differs"),
    ],
)
def test_average_of_state_dicts_refuses_mismatched_tensors(change, match):
    a = {"w": torch.zeros(3, 4), "n": torch.tensor([7])}
    with pytest.raises(ValueError, match=match):
        average_state_dicts([a, change(a)])


@pytest.mark.parametrize(
    ("weights", "match"), [([0.5], "2 non-negative"), ([1.5, -0.5], "non-negative"), ([0.5, 0.6], "sum to 1")]
)
def test_bad_weights_are_refused(weights, match):
    a = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match=match):
        average_state_dicts([a, a], weights)


def test_averaged_stage_loads_and_holds_the_average_of_every_weight_file(tmp_path):
    first, second = tiny_stage_folder(tmp_path / "a", SAMPLING), tiny_stage_folder(tmp_path / "b", SAMPLING, seed=10)
    assert main(["average-weights", str(first), str(second), "--output", str(tmp_path / "soup")]) == 0
    for component in ("transformer", "upsampler"):
        a, b = load_file(first / component / WEIGHTS), load_file(second / component / WEIGHTS)
        out = load_file(tmp_path / "soup" / component / WEIGHTS)
        assert out.keys() == a.keys()
        for name in a:
            torch.testing.assert_close(out[name], (a[name] + b[name]) / 2, rtol=0, atol=1e-7)
    assert json.loads((tmp_path / "soup" / "model_index.json").read_text())["sampling"] == SAMPLING
    pipe = CascadeVSRPipeline.from_pretrained(tmp_path / "soup", local_files_only=True)
    assert type(pipe.transformer) is CascadeVSRTransformer3DModel


def test_stages_of_other_architectures_or_an_existing_output_are_refused_before_writing(tmp_path):
    first = tiny_stage_folder(tmp_path / "a", SAMPLING)
    deeper = tiny_stage_folder(tmp_path / "b", SAMPLING, num_layers=3, seed=1)
    with pytest.raises(ValueError, match="config.json differs"):
        average_stages([first, deeper], tmp_path / "soup")
    assert not (tmp_path / "soup").exists() and not (tmp_path / ".tmp-soup").exists()
    with pytest.raises(FileNotFoundError, match="not a stage folder"):
        average_stages([first, tmp_path], tmp_path / "soup")
    with pytest.raises(ValueError, match="at least two"):
        average_stages([first], tmp_path / "soup")
    (tmp_path / "soup").mkdir()
    with pytest.raises(ValueError, match="exists"):
        average_stages([first, tiny_stage_folder(tmp_path / "c", SAMPLING, seed=2)], tmp_path / "soup")
    with pytest.raises(ValueError, match="one of the stages"):
        average_stages([first, tmp_path / "c"], first, overwrite=True)
