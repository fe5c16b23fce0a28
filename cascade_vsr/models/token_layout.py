"""Window layouts of a (T, H, W) token grid: how the local attention modes cut it into windows and units.

Tokens are stored in (t, h, w) row-major order. An axis is cut into windows by `partition_axis`; the windows of a
grid are the product of its axes' windows. Edge windows may be smaller (ragged): they are either run separately by
shape (`window_regions`) or padded to the full window size in a windows-major layout (`pad_window_layout`).

The functions that return numbers (`partition_axis`, `window_lengths`, `sparse_unit_layout`) depend on the sizes
alone and never read a tensor, so the attention modes take every decision about shapes on the host.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

Part = tuple[int, int, int]  # (window, front padding, number of windows) of one axis
Run = tuple[int, int, int, int, int]  # see `_axis_runs`


def partition_axis(size: int, window: int, shift: bool = False) -> Part:
    """Cut an axis of `size` tokens into windows: returns (window, front padding, number of windows).

    A window larger than the axis is clamped to it (one window, nothing to shift). A shifted partition moves
    the boundaries by window // 2 without wrap-around: the axis is padded in front by the rest of the first
    window, so the first and last windows are just smaller (ragged) and never join the two ends of the axis.
    """
    window = min(window, size)
    offset = window // 2 if shift and window < size else 0
    front = (window - offset) % window
    return window, front, -(-(size + front) // window)


def temporal_block_ids(
    num_frames: int, temporal_unit: int | None, shift: bool = False, device: torch.device | str | None = None
) -> torch.Tensor:
    """Temporal-unit index of every latent frame, shape (T,): frames attend within their block only.

    `temporal_unit >= T` (or None) puts all frames in one block. Shifted blocks start at u // 2 with no
    wrap-around: frame 0 and frame T-1 stay in different blocks whenever T > u.
    """
    if temporal_unit is None or temporal_unit >= num_frames:
        return torch.zeros(num_frames, dtype=torch.long, device=device)
    _, front, _ = partition_axis(num_frames, temporal_unit, shift)
    return (torch.arange(num_frames, device=device) + front) // temporal_unit


def _axis_runs(size: int, part: Part) -> list[Run]:
    """The at most three runs of an axis in the window layout: the leading partial window (shifted
    partitions), the full windows, the trailing partial window. Each run is (source start, windows,
    first window, offset in the window, tokens per window)."""
    window, front, _ = part
    head = min(window - front, size) if front else 0
    full = (size - head) // window
    tail = size - head - full * window
    runs = [(0, 1, 0, front, head), (head, full, int(head > 0), 0, window)]
    runs.append((head + full * window, 1, int(head > 0) + full, 0, tail))
    return [run for run in runs if run[1] and run[4]]


def window_lengths(size: int, part: Part) -> list[int]:
    """Tokens of each window along an axis of `size` tokens cut by `partition_axis`, ragged edges included."""
    return [length for _, count, _, _, length in _axis_runs(size, part) for _ in range(count)]


def temporal_block_sizes(num_frames: int, temporal_unit: int | None, shift: bool = False) -> list[int]:
    """Frames of each temporal block (the blocks of `temporal_block_ids`)."""
    return window_lengths(num_frames, partition_axis(num_frames, temporal_unit or num_frames, shift))


def window_regions(grid: Sequence[int], parts: Sequence[Part]) -> Iterator[tuple[Run, Run, Run]]:
    """The at most 3 x 3 x 3 regions of the token grid in which all windows have the same shape: one run per
    axis (`_axis_runs`)."""
    return itertools.product(*(_axis_runs(n, p) for n, p in zip(grid, parts)))


def region_windows(tokens: torch.Tensor, runs: Sequence[Run]) -> torch.Tensor:
    """The windows of one region of (..., T, H, W, D) `tokens` as a strided view (..., nt, ny, nx, lt, ly, lx, D)."""
    src = tokens[(..., *(slice(start, start + n * length) for start, n, _, _, length in runs), slice(None))]
    for axis, (_, n, _, _, length) in reversed(list(enumerate(runs))):  # axis -> (windows, tokens)
        src = src.unflatten(2 * axis - 6, (n, length))
    base = src.ndim - 7  # (nt, lt, ny, ly, nx, lx, D) -> (nt, ny, nx, lt, ly, lx, D)
    return src.permute(*range(base), *(base + i for i in (0, 2, 4, 1, 3, 5, 6)))


def _layout_views(tokens: torch.Tensor, windows: torch.Tensor, grid: Sequence[int], parts: Sequence[Part]):
    """Pairs of matching views (token grid region, window layout region) covering every real token.

    `tokens` is (..., T, H, W, D) and `windows` (..., nt, ny, nx, wt, wy, wx, D). The views are strided
    (no copies); there are at most 3 x 3 x 3 regions whatever the number of windows.
    """
    for runs in window_regions(grid, parts):
        src = region_windows(tokens, runs)
        dst = windows[(..., *(slice(first, first + n) for _, n, first, _, _ in runs), *[slice(None)] * 4)]
        dst = dst[(..., *(slice(offset, offset + length) for _, _, _, offset, length in runs), slice(None))]
        yield src, dst


def _flat(windows: torch.Tensor) -> torch.Tensor:
    """(..., nt, ny, nx, wt, wy, wx, D) -> (..., windows, window tokens, D) (a view)."""
    return windows.flatten(-4, -2).flatten(-5, -3)


def pad_window_layout(
    x: torch.Tensor,
    grid: tuple[int, int, int],
    parts: Sequence[Part],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(..., N, D) tokens -> (..., windows, window tokens, D), zeros on the padding of ragged windows.

    One strided copy per region instead of pad + rearrange (these layouts are memory-bound on CPU). `out`, a
    possibly strided (..., windows, window tokens, D) view, receives the layout in place.
    """
    counts, sizes = [p[2] for p in parts], [p[0] for p in parts]
    if out is None:
        windows = x.new_empty(*x.shape[:-2], *counts, *sizes, x.shape[-1])
    else:
        windows = out.unflatten(-2, sizes).unflatten(-5, counts)
    for axis, (size, (window, front, count)) in enumerate(zip(grid, parts)):
        end = size + front - (count - 1) * window  # real tokens in the last window end here
        win_dim, off_dim = axis - 7, axis - 4
        if front:
            windows.narrow(win_dim, 0, 1).narrow(off_dim, 0, front).zero_()
        if end < window:
            windows.narrow(win_dim, count - 1, 1).narrow(off_dim, end, window - end).zero_()
    tokens = x.unflatten(-2, grid)
    for src, dst in _layout_views(tokens, windows, grid, parts):
        dst.copy_(src)
    return _flat(windows)


def unpad_window_layout(x: torch.Tensor, grid: tuple[int, int, int], parts: Sequence[Part]) -> torch.Tensor:
    """Inverse of `pad_window_layout`: (..., windows, window tokens, D) -> (..., N, D)."""
    counts, sizes = [p[2] for p in parts], [p[0] for p in parts]
    windows = x.unflatten(-2, sizes).unflatten(-5, counts)
    tokens = x.new_empty(*x.shape[:-3], *grid, x.shape[-1])
    for src, dst in _layout_views(tokens, windows, grid, parts):
        src.copy_(dst)
    return tokens.flatten(-4, -2)


def window_token_mask(
    grid: tuple[int, int, int], parts: Sequence[Part], device: torch.device | str | None = None
) -> torch.Tensor:
    """(windows, window tokens) bool: True for real tokens, False for the padding of ragged windows.

    Built on `device` directly, so using it there copies nothing from the host.
    """
    ones = torch.ones(math.prod(grid), 1, dtype=torch.bool, device=device)
    return pad_window_layout(ones, grid, parts)[..., 0]


@dataclass(frozen=True)
class SparseUnitLayout:
    """Shapes of `sparse_topk` attention on one grid, all known from the sizes (see `sparse_unit_layout`)."""

    parts: tuple[Part, Part, Part]  # (t, h, w) partitions: one frame per unit on t
    units_per_frame: int
    num_units: int
    unit_tokens: int  # L: tokens of a full unit (ragged units are padded to it)
    slots: int  # units every unit attends to: itself + min(topk, most candidates of any unit)
    padded: bool  # ragged edge units hold padding tokens
    masked: bool  # the gathered keys need a mask: padding, or a unit with fewer candidates than slots - 1


@functools.lru_cache(maxsize=256)
def sparse_unit_layout(
    grid: tuple[int, int, int],
    window: tuple[int, int],
    topk: int,
    temporal_unit: int | None = None,
    shift: bool = False,
) -> SparseUnitLayout:
    """The unit layout of `sparse_topk` attention: 2D units of `window` (h, w) tokens in every frame, candidates
    the other units of the same temporal block. Pure and cached: it depends on the sizes only."""
    frames, height, width = grid
    parts = ((1, 0, frames), partition_axis(height, window[0]), partition_axis(width, window[1]))
    units_per_frame = parts[1][2] * parts[2][2]
    block_sizes = temporal_block_sizes(frames, temporal_unit, shift)
    most, least = (n * units_per_frame - 1 for n in (max(block_sizes), min(block_sizes)))
    selected = min(topk, most)
    padded = any(count * size != n for (size, _, count), n in zip(parts[1:], grid[1:]))
    return SparseUnitLayout(
        parts=parts,
        units_per_frame=units_per_frame,
        num_units=frames * units_per_frame,
        unit_tokens=parts[1][0] * parts[2][0],
        slots=1 + selected,
        padded=padded,
        masked=padded or least < selected,
    )
