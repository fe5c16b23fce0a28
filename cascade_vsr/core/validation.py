"""Argument checks shared by the models, the pipeline and the trainer.

Every check raises `ValueError` naming the argument and the expected form, before any heavy compute.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# A Hub repository id: `name` or `owner/name`, letters, digits, '-', '_', '.', not starting with '.' or '-'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# Weight files that load through pickle.
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_latents(
    latents: torch.Tensor,
    name: str,
    channels: int | None = None,
    ndim: int = 5,
    layout: str = "(B, C, T, H, W)",
) -> None:
    """Check that `latents` is a floating tensor of rank `ndim` with `channels` channels on dim 1."""
    if not isinstance(latents, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor of shape {layout}, got {type(latents).__name__}")
    if latents.ndim != ndim:
        raise ValueError(f"`{name}` must have shape {layout} ({ndim} dims), got {tuple(latents.shape)}")
    if not latents.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor, got dtype {latents.dtype}")
    if channels is not None and latents.shape[1] != channels:
        raise ValueError(
            f"`{name}` must have {channels} channels on dim 1 (the model's latent_channels), "
            f"got {latents.shape[1]} in shape {tuple(latents.shape)}"
        )
    if min(latents.shape) == 0:
        raise ValueError(f"`{name}` must not be empty, got shape {tuple(latents.shape)}")


def check_spatial_size(size: Sequence[int], name: str) -> tuple[int, int]:
    """Check a (height, width) pair of positive ints."""
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ValueError(f"`{name}` must be a (height, width) pair of positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def check_per_sample(
    values: torch.Tensor | float,
    name: str,
    batch_size: int,
    bounds: tuple[float, float] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Broadcast a scalar or a (1,) / (B,) tensor of per-sample values to shape (B,).

    With `bounds` = (low, high), values outside [low, high] are refused. That check reads the values, so it runs
    only on the host (numbers and CPU tensors): on an accelerator it would synchronise every forward pass.
    """
    values = torch.as_tensor(values, dtype=dtype, device=device)
    if values.ndim == 0:
        values = values.reshape(1)
    if values.ndim != 1 or values.shape[0] not in (1, batch_size):
        raise ValueError(
            f"`{name}` must be a scalar or a tensor of shape (1,) or ({batch_size},) (batch size), "
            f"got shape {tuple(values.shape)}"
        )
    if bounds is not None and values.device.type == "cpu":
        low, high = bounds
        if not bool(((values >= low) & (values <= high)).all()):
            raise ValueError(
                f"`{name}` must lie in [{low}, {high}], got values in [{values.min():.4g}, {values.max():.4g}]"
            )
    return values.expand(batch_size)


def looks_like_hub_id(name: str) -> bool:
    """Whether `name` can only be a Hub repository id (not a local path): an `owner/name` whose `owner` is not a
    local folder, or a bare `name`."""
    if not _HUB_ID.match(name):
        return False
    return "/" not in name or not Path(name.split("/")[0]).is_dir()


def check_safetensors_weights(folder: Path, argument: str) -> None:
    """Refuse a model folder whose weights exist only as pickle files: loading them could run code."""
    if not (folder / "config.json").is_file() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_WEIGHT_SUFFIXES)
    if pickles:
        raise ValueError(
            f"`{argument}`: {str(folder)!r} holds pickle weights ({', '.join(pickles)}) and no .safetensors file; "
            "only safetensors weights are loaded (pickle files can run code). Convert them with "
            "safetensors.torch.save_file"
        )


def check_pretrained_source(
    name_or_path: str | os.PathLike, argument: str = "pretrained_model_name_or_path", subfolder: str | None = None
) -> None:
    """Check a `from_pretrained` source before diffusers looks for it: a local path that does not exist is an
    immediate FileNotFoundError naming it (rather than a Hub lookup that retries and blames the network); a local
    model folder must hold safetensors weights; a Hub id passes unchanged."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ValueError(f"`{argument}` must be a path or a Hub id string, got {type(name_or_path).__name__}")
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if not path.exists():
        if isinstance(name_or_path, os.PathLike) or not looks_like_hub_id(text):
            raise FileNotFoundError(f"`{argument}` {text!r} does not exist (no such local folder)")
        return
    if not path.is_dir():
        raise ValueError(f"`{argument}` {text!r} is a file; expected a model folder (or a Hub id)")
    folder = path / subfolder if subfolder else path
    if subfolder and not folder.is_dir():
        raise FileNotFoundError(f"`{argument}` {text!r} has no {subfolder}/ folder")
    check_safetensors_weights(folder, argument)
    for component in folder.iterdir() if (folder / "model_index.json").is_file() else ():
        if component.is_dir():
            check_safetensors_weights(component, argument)


def check_device(device: str | torch.device | None, argument: str = "--device") -> None:
    """An unusable device fails here, before any model loads: not a device name, or a CUDA index this machine
    lacks."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"`{argument}` {device!r} is not a torch device: {error}") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (parsed.index or 0) >= count:
            raise ValueError(f"`{argument}` {str(device)!r}: this machine has {count} CUDA device(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"`{argument}` {str(device)!r}: MPS is not available on this machine")


def check_writable_folder(folder: str | os.PathLike, argument: str) -> None:
    """Check that `folder` is, or can be created as, a writable directory (without creating it)."""
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"`{argument}` {str(folder)!r} exists and is not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    try:  # a probe folder, removed at once: permission bits do not tell for root or for special file systems
        os.rmdir(tempfile.mkdtemp(prefix=".cascade-vsr-probe-", dir=existing))
    except OSError as error:
        raise ValueError(
            f"`{argument}` {str(folder)!r}: cannot create or write in {str(existing)!r} ({error.strerror})"
        ) from None


def check_writable_file(file: str | os.PathLike, argument: str) -> None:
    """Check that `file` can be written: not a directory, in a folder that exists or can be created."""
    path = Path(file).expanduser()
    if path.is_dir():
        raise ValueError(f"`{argument}` {str(file)!r} is a directory; expected a file name")
    try:
        check_writable_folder(path.parent, argument)
    except ValueError as error:
        raise ValueError(f"`{argument}` {str(file)!r}: {str(error).split(': ', 1)[1]}") from None


def safe_loading_kwargs(name_or_path: Any, kwargs: dict, argument: str = "pretrained_model_name_or_path") -> dict:
    """The `from_pretrained` kwargs with safetensors required, after `check_pretrained_source`: a missing local
    folder fails at once, pickle weights are never loaded (`use_safetensors=False` is refused)."""
    if isinstance(name_or_path, (str, os.PathLike)):  # diffusers also takes in-memory state dicts elsewhere
        check_pretrained_source(name_or_path, argument, kwargs.get("subfolder"))
    if kwargs.get("use_safetensors") is False:
        raise ValueError("`use_safetensors=False`: only safetensors weights are loaded (pickle files can run code)")
    return {**kwargs, "use_safetensors": True}
