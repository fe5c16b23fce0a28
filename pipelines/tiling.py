"""Spatial tiles for frames too large to super-resolve at once: overlapping LR tiles, blended HR tiles.

Each LR tile is super-resolved on its own and pasted into the HR frame with a weight that ramps linearly from the
tile's inner edges over the overlap, so neighbouring tiles cross-fade instead of meeting at a seam. Tile layouts are
small pure functions of the frame size, testable alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def tile_starts(size: int, tile: int, overlap: int, multiple: int = 1) -> list[int]:
    """Starts of tiles of `tile` pixels covering an axis of `size` with at least `overlap` shared pixels.

    Starts are multiples of `multiple` (an autoencoder's spatial factor), the last tile ends exactly at `size`, and
    an axis no longer than `tile` is one tile.
    """
    if tile % multiple or overlap % multiple:
        raise ValueError(f"`tile` ({tile}) and `overlap` ({overlap}) must be multiples of {multiple}")
    if not 0 <= overlap < tile:
        raise ValueError(f"`overlap` must lie in [0, tile={tile}), got {overlap}")
    if size <= tile:
        return [0]
    count = math.ceil((size - overlap) / (tile - overlap))
    last = size - tile
    starts = [round(index * last / (count - 1) / multiple) * multiple for index in range(count)]
    return sorted(set(starts))


def ramp_weights(length: int, lead: int, trail: int) -> torch.Tensor:
    """(length,) weights: a linear ramp up over the first `lead` pixels, 1 inside, a ramp down over the last `trail`.

    Ramps are strictly positive, so every pixel of a tile has weight, and two ramps of one overlap sum to a constant.
    """
    weights = torch.ones(length, dtype=torch.float64)
    if lead:
        weights[:lead] = (torch.arange(lead, dtype=torch.float64) + 0.5) / lead
    if trail:
        weights[length - trail :] = torch.minimum(
            weights[length - trail :], (torch.arange(trail, 0, -1, dtype=torch.float64) - 0.5) / trail
        )
    return weights


def _axis_tiles(size: int, out_size: int, tile: int, overlap: int, multiple: int) -> list[tuple[int, int, int, int]]:
    """(lr start, lr stop, hr start, hr stop) of every tile along one axis; HR boxes follow the LR boxes by the
    axis's scale, rounded, and the last one ends exactly at `out_size`."""
    starts = tile_starts(size, tile, overlap, multiple)
    scale = out_size / size
    boxes = []
    for start in starts:
        stop = min(start + tile, size)
        boxes.append((start, stop, round(start * scale), out_size if stop == size else round(stop * scale)))
    return boxes


def tiled_super_resolve(
    super_resolve: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor],
    video: torch.Tensor,
    out_size: tuple[int, int],
    tile: int,
    overlap: int,
    multiple: int = 1,
) -> torch.Tensor:
    """Super-resolve (B, T, C, H, W) `video` tile by tile with `super_resolve(lr_tile, hr_tile_size)`, which returns
    (B, T, C, h, w) HR frames; the tiles are blended into (B, T, C, *out_size) (float64 accumulation)."""
    height, width = video.shape[-2:]
    rows = _axis_tiles(height, out_size[0], tile, overlap, multiple)
    cols = _axis_tiles(width, out_size[1], tile, overlap, multiple)
    total = weight_sum = None
    for row_index, (y0, y1, hy0, hy1) in enumerate(rows):  # one pipeline call per tile: the tiles bound memory
        for col_index, (x0, x1, hx0, hx1) in enumerate(cols):
            out = super_resolve(video[..., y0:y1, x0:x1], (hy1 - hy0, hx1 - hx0)).double()
            if total is None:
                total = out.new_zeros(*out.shape[:-2], *out_size)
                weight_sum = out.new_zeros(out_size)
            lead_y = rows[row_index - 1][3] - hy0 if row_index else 0
            trail_y = hy1 - rows[row_index + 1][2] if row_index + 1 < len(rows) else 0
            lead_x = cols[col_index - 1][3] - hx0 if col_index else 0
            trail_x = hx1 - cols[col_index + 1][2] if col_index + 1 < len(cols) else 0
            weight = torch.outer(
                ramp_weights(hy1 - hy0, max(lead_y, 0), max(trail_y, 0)),
                ramp_weights(hx1 - hx0, max(lead_x, 0), max(trail_x, 0)),
            ).to(out.device)
            total[..., hy0:hy1, hx0:hx1] += out * weight
            weight_sum[hy0:hy1, hx0:hx1] += weight
    return total / weight_sum
