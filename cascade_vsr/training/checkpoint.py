"""Training checkpoints that never run code: tensors in safetensors, everything else in JSON, written atomically.

accelerate's `save_state` / `load_state` pickle the optimizer, the LR schedule, the RNG states and every registered
object, and unpickling a checkpoint executes whatever it names. Here each part of the training state is a
safetensors file whose non-tensor structure (nesting, ints, floats, strings) travels as JSON in the file's own
metadata, and loading reads only those two formats.

A checkpoint folder `checkpoint-<step>` holds:

    model.safetensors         the full state dict of the trained module (upsampler.*, transformer.*)
    optimizer.safetensors     the optimizer state keyed by parameter name (torch.distributed.checkpoint's
                              full state dict, so DDP and FSDP give the same layout)
    ema.safetensors           EMA shadow weights (one file per rank, `ema-rank<r>.safetensors`, under FSDP, where
                              each rank keeps the EMA of its own shard)
    rng-rank<r>.safetensors   the RNG states of each process (python, numpy, torch, CUDA)
    checkpoint.json           step, data position, LR schedule, model configs; written last

The folder is written as `.tmp-checkpoint-<step>` and renamed when complete, so a kill at any moment leaves
either the previous checkpoint set or the new one, and `latest` only ever sees complete checkpoints.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

CHECKPOINT_PREFIX = "checkpoint-"
TEMPORARY_PREFIX = ".tmp-"
MANIFEST = "checkpoint.json"
FORMAT_VERSION = 1

_TENSOR_KEY = "__tensor__"
_TUPLE_KEY = "__tuple__"


# -- nested state <-> (JSON skeleton, flat tensors) -------------------------------------------------------------


def split_tensors(state: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tuples, tensors, numbers, strings, None) into a JSON-able skeleton,
    where each tensor is replaced by a reference to its key, and the flat dict of those tensors."""
    tensors: dict[str, torch.Tensor] = {}

    def visit(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().to("cpu", copy=True).contiguous()
            return {_TENSOR_KEY: path}
        if isinstance(value, dict):
            if not all(isinstance(key, (str, int)) for key in value):
                raise TypeError(f"state keys must be str or int, got {list(value)} at {path!r}")
            # JSON object keys are strings: keep int keys (optimizer parameter ids) recognisable
            return {"__dict__": [[key, visit(item, f"{path}/{key}")] for key, item in value.items()]}
        if isinstance(value, tuple):
            return {_TUPLE_KEY: [visit(item, f"{path}/{i}") for i, item in enumerate(value)]}
        if isinstance(value, list):
            return [visit(item, f"{path}/{i}") for i, item in enumerate(value)]
        if isinstance(value, np.ndarray):
            return visit(torch.from_numpy(np.ascontiguousarray(value)), path)
        if isinstance(value, (np.integer, np.floating)):
            return value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot store a {type(value).__name__} at {path!r} in a checkpoint")

    return visit(state, prefix), tensors


def join_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `split_tensors`."""
    if isinstance(skeleton, list):
        return [join_tensors(item, tensors) for item in skeleton]
    if isinstance(skeleton, dict):
        if _TENSOR_KEY in skeleton:
            return tensors[skeleton[_TENSOR_KEY]]
        if _TUPLE_KEY in skeleton:
            return tuple(join_tensors(item, tensors) for item in skeleton[_TUPLE_KEY])
        return {key: join_tensors(item, tensors) for key, item in skeleton["__dict__"]}
    return skeleton


def save_state_file(path: Path, state: Any) -> None:
    """One nested state as one safetensors file (its skeleton in the metadata)."""
    skeleton, tensors = split_tensors(state)
    save_file(tensors, str(path), metadata={"state": json.dumps(skeleton)})


def load_state_file(path: Path) -> Any:
    """Read a `save_state_file` file: safetensors and JSON only, never pickle."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"checkpoint file {str(path)!r} is not a readable safetensors file: {error}") from None
    if "state" not in metadata:
        raise ValueError(f"checkpoint file {str(path)!r} has no `state` metadata (not written by cascade-vsr)")
    try:
        return join_tensors(json.loads(metadata["state"]), tensors)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"checkpoint file {str(path)!r} has malformed `state` metadata: {error}") from None


# -- RNG --------------------------------------------------------------------------------------------------------


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- folders ----------------------------------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int | None:
    """The step of a `checkpoint-<step>` folder name, None for anything else."""
    name = path.name
    if not name.startswith(CHECKPOINT_PREFIX) or not name[len(CHECKPOINT_PREFIX) :].isdigit():
        return None
    return int(name[len(CHECKPOINT_PREFIX) :])


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first (a folder without its manifest is incomplete)."""
    found = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if checkpoint_step(p) is not None]
    return sorted((p for p in found if (p / MANIFEST).is_file()), key=checkpoint_step)


def find_checkpoint(output_dir: str | Path, resume_from: str) -> Path:
    """Resolve `resume_from_checkpoint`: 'latest' (the newest complete checkpoint of the run) or a folder."""
    if resume_from != "latest":
        path = Path(resume_from)
        if not path.is_dir():
            raise ValueError(f"`resume_from_checkpoint` {resume_from!r} is not a checkpoint folder")
        if not (path / MANIFEST).is_file():
            raise ValueError(
                f"`resume_from_checkpoint` {resume_from!r} has no {MANIFEST}: it is incomplete or not a cascade-vsr "
                "checkpoint (accelerate-format checkpoints are refused: loading them would unpickle)"
            )
        return path
    found = complete_checkpoints(Path(output_dir) / "checkpoints")
    if not found:
        raise ValueError(
            f"`resume_from_checkpoint` is 'latest' but {output_dir}/checkpoints holds no complete checkpoint"
        )
    return found[-1]


def remove_temporary(folder: Path) -> None:
    """Remove what a killed run left half-written (the trainer holds the run's output folder alone)."""
    for path in folder.glob(f"{TEMPORARY_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.iterdir(), folder]:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def publish(temporary: Path, final: Path) -> None:
    """Rename a complete temporary folder to its final name, replacing an older folder of that name."""
    _fsync_tree(temporary)
    previous = None
    if final.exists():
        previous = final.with_name(f"{TEMPORARY_PREFIX}old-{final.name}")
        shutil.rmtree(previous, ignore_errors=True)
        final.rename(previous)
    temporary.rename(final)
    _fsync_tree(final.parent)
    if previous is not None:
        shutil.rmtree(previous)


def prune(folder: Path, total_limit: int | None) -> None:
    """Keep the newest `total_limit` complete checkpoints."""
    if total_limit is None:
        return
    existing = complete_checkpoints(folder)
    for old in existing[: max(len(existing) - total_limit, 0)]:
        shutil.rmtree(old)


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as error:  # incl. JSON and UTF-8 decoding errors
        raise ValueError(f"checkpoint {str(path)!r}: cannot read {MANIFEST}: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(
            f"checkpoint {str(path)!r}: {MANIFEST} has format {found!r}, this version reads {FORMAT_VERSION}"
        )
    return manifest


def check_same_models(path: Path, saved: dict, current: dict) -> None:
    """Refuse a checkpoint of differently configured models, naming the fields that differ."""
    differences = []
    for model, config in current.items():
        for key in sorted(set(config) | set(saved.get(model, {}))):
            old, new = saved.get(model, {}).get(key), config.get(key)
            if old != new:
                differences.append(f"{model}.{key}: checkpoint {old!r}, this run {new!r}")
    if differences:
        raise ValueError(
            f"checkpoint {str(path)!r} was written by differently configured models: " + "; ".join(differences)
        )


def write_atomically(final: Path, write: Callable[[Path], None], is_main: bool, barrier: Callable[[], None]) -> None:
    """Run `write(temporary_folder)` on every process, then publish the folder from the main process."""
    temporary = final.with_name(f"{TEMPORARY_PREFIX}{final.name}")
    if is_main:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    barrier()
    write(temporary)
    barrier()
    if is_main:
        publish(temporary, final)
    barrier()


def json_config(config: Any) -> dict:
    """A diffusers model config as plain JSON values (tuples become lists), comparable across runs."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))
