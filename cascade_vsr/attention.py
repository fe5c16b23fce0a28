"""Self-attention over a (T, H, W) token grid, selected per layer by the transformer's `attention_mode`.

Every function takes q, k, v of shape (B, heads, N, D) with the N tokens in (t, h, w) row-major order of
`grid = (T, H, W)` and returns (B, heads, N, D).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

ATTENTION_MODES = ("full",)


def check_grid(grid: Sequence[int], num_tokens: int) -> tuple[int, int, int]:
    """Validate a (T, H, W) token grid against the token count N."""
    if len(grid) != 3 or not all(isinstance(g, int) and g > 0 for g in grid):
        raise ValueError(f"`grid` must be a (T, H, W) triple of positive ints, got {grid!r}")
    if grid[0] * grid[1] * grid[2] != num_tokens:
        raise ValueError(f"`grid` {tuple(grid)} must multiply to the number of tokens N={num_tokens}")
    return int(grid[0]), int(grid[1]), int(grid[2])


def check_attention_mode(mode: str, name: str = "attention_mode") -> str:
    if mode not in ATTENTION_MODES:
        raise ValueError(f"`{name}` must be one of {ATTENTION_MODES}, got {mode!r}")
    return mode


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Every token attends to every token (one SDPA call)."""
    return F.scaled_dot_product_attention(q, k, v)


def self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Sequence[int],
    mode: str = "full",
    shift: bool = False,
    **options,
) -> torch.Tensor:
    """Dispatch to the attention of `mode`; `shift` is set on odd layers (shifted windows / temporal units)."""
    check_grid(grid, q.shape[-2])
    check_attention_mode(mode, "mode")
    if mode == "full":
        return full_attention(q, k, v)
    raise NotImplementedError(mode)  # unreachable: check_attention_mode guards the list
