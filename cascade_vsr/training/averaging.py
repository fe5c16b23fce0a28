"""Weight averaging of fine-tuned stages (a "model soup", Wortsman et al. 2022).

Stages fine-tuned from one starting point with different losses or seeds often lie in one basin, where the average
of their weights trades their strengths off more smoothly than any of them (here: a flicker-weighted and a
fidelity-weighted fine-tune of one model). The average is taken per tensor in float64 and stored in each tensor's
own dtype; the stages must share every component's architecture (its config) and tensor layout.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch


def average_state_dicts(
    state_dicts: Sequence[dict[str, torch.Tensor]], weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """sum_i weights[i] * state_dicts[i], tensor by tensor (uniform when `weights` is None). Floating-point tensors
    are averaged in float64; any other tensor (integer buffers) must be equal in all of them and is kept."""
    if len(state_dicts) < 2:
        raise ValueError(f"`state_dicts` needs at least two state dicts to average, got {len(state_dicts)}")
    weights = check_weights(weights, len(state_dicts))
    first = state_dicts[0]
    for index, state in enumerate(state_dicts[1:], start=1):
        if state.keys() != first.keys():
            difference = sorted(set(state) ^ set(first))[:5]
            raise ValueError(f"state dict {index} has other tensors than state dict 0 (e.g. {difference})")
        for name, tensor in state.items():
            if tensor.shape != first[name].shape or tensor.dtype != first[name].dtype:
                raise ValueError(
                    f"tensor {name!r}: state dict {index} has {tuple(tensor.shape)} {tensor.dtype}, state dict 0 "
                    f"{tuple(first[name].shape)} {first[name].dtype}"
                )
    averaged = {}
    for name, tensor in first.items():
        if not tensor.is_floating_point():
            if any(not torch.equal(state[name], tensor) for state in state_dicts[1:]):
                raise ValueError(f"tensor {name!r} is not floating-point and differs between the state dicts")
            averaged[name] = tensor.clone()
            continue
        total = sum(weight * state[name].double() for weight, state in zip(weights, state_dicts))
        averaged[name] = total.to(tensor.dtype)
    return averaged


def check_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """The mixing weights of `count` models: uniform for None, else `count` non-negative numbers summing to 1."""
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count or any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"`weights` must be {count} non-negative numbers (one per model), got {weights}")
    if not math.isclose(sum(weights), 1.0, abs_tol=1e-6):
        raise ValueError(f"`weights` must sum to 1, got {weights} (sum {sum(weights)})")
    return weights


def _architecture(config_path: Path) -> dict:
    """A component's config without diffusers' bookkeeping keys (`_diffusers_version`, `_name_or_path`, ...)."""
    return {key: value for key, value in json.loads(config_path.read_text()).items() if not key.startswith("_")}


def check_stages(stages: Sequence[Path]) -> list[str]:
    """The weight-holding components (sub-folders with .safetensors files) shared by all `stages`, after checking
    that every stage is a stage folder with the same components, configs and weight files as the first."""
    if len(stages) < 2:
        raise ValueError(f"`stages` needs at least two stage folders to average, got {len(stages)}")
    for stage in stages:
        if not (stage / "model_index.json").is_file():
            raise FileNotFoundError(f"`stages`: {stage} is not a stage folder (no model_index.json)")
    first = stages[0]
    index = _architecture(first / "model_index.json")
    components = sorted(p.name for p in first.iterdir() if p.is_dir())
    for stage in stages[1:]:
        if _architecture(stage / "model_index.json") != index:
            raise ValueError(f"`stages`: {stage}'s model_index.json differs from {first}'s (components, sampling)")
        if sorted(p.name for p in stage.iterdir() if p.is_dir()) != components:
            raise ValueError(f"`stages`: {stage} has other components than {first} ({components})")
        for component in components:
            for config in sorted((first / component).glob("*config.json")):
                other = stage / component / config.name
                if not other.is_file() or _architecture(other) != _architecture(config):
                    raise ValueError(f"`stages`: {other} differs from {config} (another architecture or settings)")
            names = sorted(p.name for p in (first / component).glob("*.safetensors"))
            if sorted(p.name for p in (stage / component).glob("*.safetensors")) != names:
                raise ValueError(f"`stages`: {stage / component} has other weight files than {first / component}")
    return [c for c in components if any((first / c).glob("*.safetensors"))]


def average_stages(
    stages: Sequence[Path], output: Path, weights: Sequence[float] | None = None, overwrite: bool = False
) -> list[str]:
    """Write the stage folder `output`: a copy of the first stage whose weight files are the (weighted) average of
    all stages' (`average_state_dicts`, file by file). Built next to `output` and renamed when complete, so an
    interrupted run leaves nothing half-written. Returns the averaged components."""
    from safetensors.torch import load_file, save_file

    stages = [Path(stage) for stage in stages]
    output = Path(output)
    weights = check_weights(weights, len(stages))
    components = check_stages(stages)
    if output.exists() and not overwrite:
        raise ValueError(f"`output` {output} exists (pass overwrite=True / --overwrite to replace it)")
    if any(output.resolve() == stage.resolve() for stage in stages):
        raise ValueError(f"`output` {output} is one of the stages being averaged")
    staging = output.with_name(f".tmp-{output.name}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(stages[0], staging)
        for component in components:
            for weight_file in sorted((stages[0] / component).glob("*.safetensors")):
                state_dicts = [load_file(stage / component / weight_file.name) for stage in stages]
                averaged = average_state_dicts(state_dicts, weights)
                save_file(averaged, staging / component / weight_file.name, metadata={"format": "pt"})
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return components
