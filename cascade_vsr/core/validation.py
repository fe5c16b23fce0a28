"""Argument checks shared by the models, the pipeline and the trainer.

Every check raises `ValueError` naming the argument and the expected form, before any heavy compute.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
