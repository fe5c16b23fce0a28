"""Self-attention over a (T, H, W) token grid, selected per layer by the transformer's `attention_mode`.

Every function takes q, k, v of shape (B, heads, N, D) with the N tokens in (t, h, w) row-major order of
`grid = (T, H, W)` and returns (B, heads, N, D).

Modes (DESIGN.md "Attention modes"):

- `full`: every token attends to every token, optionally restricted to temporal units (blocks of
  `temporal_unit` latent frames, SimpleGVR section 4.4).
- `sparse_topk`: SimpleGVR's sparse local attention. Frames are cut into 2D window units; each unit attends
  to itself and to its `topk` best-scoring units (mean query . mean key) of all frames in scope.
- `window`: 3D (shifted) window attention with SeedVR2's adaptive, resolution-consistent window size.

The local modes never loop over units or windows: tokens are laid out unit-major (padding the ragged edges),
the selected keys are gathered into one batched tensor and one attention call runs over all tiles, with a
key-padding mask that hides the padding and the empty selection slots. That path is the default on every
device and supports backward. `backend="flex"` runs the same selection through FlexAttention with a block
mask instead (compiled on CUDA; eager forward only on CPU, where FlexAttention has no backward).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

ATTENTION_MODES = ("full", "sparse_topk", "window")
ATTENTION_BACKENDS = ("sdpa", "flex")

# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------


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


def check_window(window: Sequence[int], ndim: int, name: str = "window") -> tuple[int, ...]:
    """A window of `ndim` positive ints (a window larger than the grid is fine: it covers the whole axis)."""
    if isinstance(window, int) or len(window) != ndim or not all(isinstance(w, int) and w > 0 for w in window):
        raise ValueError(f"`{name}` must be a tuple of {ndim} positive ints, got {window!r}")
    return tuple(int(w) for w in window)


def check_temporal_unit(temporal_unit: int | None, name: str = "temporal_unit") -> int | None:
    if temporal_unit is not None and (not isinstance(temporal_unit, int) or temporal_unit <= 0):
        raise ValueError(f"`{name}` must be None or a positive int (latent frames), got {temporal_unit!r}")
    return temporal_unit


def check_topk(topk: int, name: str = "topk") -> int:
    if not isinstance(topk, int) or topk < 0:
        raise ValueError(f"`{name}` must be a non-negative int, got {topk!r}")
    return topk


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"`q`, `k`, `v` must share one (B, heads, N, D) shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )


def _check_backend(backend: str) -> str:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"`backend` must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    return backend


# ---------------------------------------------------------------------------------------------------------------
# Token layouts (pure, small, testable)
# ---------------------------------------------------------------------------------------------------------------


def partition_axis(size: int, window: int, shift: bool = False) -> tuple[int, int, int]:
    """Cut an axis of `size` tokens into windows: returns (window, front padding, number of windows).

    A window larger than the axis is clamped to it (one window, nothing to shift). A shifted partition moves
    the boundaries by window // 2 without wrap-around: the axis is padded in front by the rest of the first
    window, so the first and last windows are just smaller (ragged) and never join the two ends of the axis.
    """
    window = min(window, size)
    offset = window // 2 if shift and window < size else 0
    front = (window - offset) % window
    return window, front, -(-(size + front) // window)


def temporal_block_ids(num_frames: int, temporal_unit: int | None, shift: bool = False) -> torch.Tensor:
    """Temporal-unit index of every latent frame, shape (T,): frames attend within their block only.

    `temporal_unit >= T` (or None) puts all frames in one block. Shifted blocks start at u // 2 with no
    wrap-around: frame 0 and frame T-1 stay in different blocks whenever T > u.
    """
    if temporal_unit is None or temporal_unit >= num_frames:
        return torch.zeros(num_frames, dtype=torch.long)
    _, front, _ = partition_axis(num_frames, temporal_unit, shift)
    return (torch.arange(num_frames) + front) // temporal_unit


def _axis_segments(size: int, part: tuple[int, int, int]) -> list[tuple[int, int, int, int, int]]:
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


def window_lengths(size: int, part: tuple[int, int, int]) -> list[int]:
    """Tokens of each window along an axis of `size` tokens cut by `partition_axis`, ragged edges included."""
    return [length for _, count, _, _, length in _axis_segments(size, part) for _ in range(count)]


def _regions(grid, parts):
    """The at most 3 x 3 x 3 regions of the token grid in which all windows have the same shape: one run per
    axis (`_axis_segments`)."""
    return itertools.product(*(_axis_segments(n, p) for n, p in zip(grid, parts)))


def _region_windows(tokens: torch.Tensor, runs) -> torch.Tensor:
    """The windows of one region of (..., T, H, W, D) `tokens` as a strided view (..., nt, ny, nx, lt, ly, lx, D)."""
    src = tokens[(..., *(slice(start, start + n * length) for start, n, _, _, length in runs), slice(None))]
    for axis, (_, n, _, _, length) in reversed(list(enumerate(runs))):  # axis -> (windows, tokens)
        src = src.unflatten(2 * axis - 6, (n, length))
    base = src.ndim - 7  # (nt, lt, ny, ly, nx, lx, D) -> (nt, ny, nx, lt, ly, lx, D)
    return src.permute(*range(base), *(base + i for i in (0, 2, 4, 1, 3, 5, 6)))


def _layout_views(tokens: torch.Tensor, windows: torch.Tensor, grid, parts):
    """Pairs of matching views (token grid region, window layout region) covering every real token.

    `tokens` is (..., T, H, W, D) and `windows` (..., nt, ny, nx, wt, wy, wx, D). The views are strided
    (no copies); there are at most 3 x 3 x 3 regions whatever the number of windows.
    """
    for runs in _regions(grid, parts):
        src = _region_windows(tokens, runs)
        dst = windows[(..., *(slice(first, first + n) for _, n, first, _, _ in runs), *[slice(None)] * 4)]
        dst = dst[(..., *(slice(offset, offset + length) for _, _, _, offset, length in runs), slice(None))]
        yield src, dst


def _pad_window_layout(
    x: torch.Tensor,
    grid: tuple[int, int, int],
    parts: Sequence[tuple[int, int, int]],
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


def _flat(windows: torch.Tensor) -> torch.Tensor:
    """(..., nt, ny, nx, wt, wy, wx, D) -> (..., windows, window tokens, D) (a view)."""
    return windows.flatten(-4, -2).flatten(-5, -3)


def _unpad_window_layout(
    x: torch.Tensor, grid: tuple[int, int, int], parts: Sequence[tuple[int, int, int]]
) -> torch.Tensor:
    """Inverse of `_pad_window_layout`: (..., windows, window tokens, D) -> (..., N, D)."""
    counts, sizes = [p[2] for p in parts], [p[0] for p in parts]
    windows = x.unflatten(-2, sizes).unflatten(-5, counts)
    tokens = x.new_empty(*x.shape[:-3], *grid, x.shape[-1])
    for src, dst in _layout_views(tokens, windows, grid, parts):
        src.copy_(dst)
    return tokens.flatten(-4, -2)


def window_token_mask(grid: tuple[int, int, int], parts: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    """(windows, window tokens) bool: True for real tokens, False for the padding of ragged windows."""
    ones = torch.ones(math.prod(grid), 1, dtype=torch.bool)
    return _pad_window_layout(ones, grid, parts)[..., 0]


# ---------------------------------------------------------------------------------------------------------------
# The batched kernel all local modes share
# ---------------------------------------------------------------------------------------------------------------


def tile_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact softmax attention of many small tiles in one SDPA call: q (..., Lq, D), k/v (..., Lk, D).

    `key_mask` (..., 1, Lk) is True for keys that may be attended (broadcast over the leading dims); every
    query row keeps at least one key. SDPA beat a plain batched matmul + softmax on these tiles on CPU
    (benchmarks/attention.py measures both), and picks fused kernels on GPU.
    """
    shape = q.shape
    # SDPA's fused CPU kernel takes 4D inputs and a 4D mask only; anything else falls back to the math path,
    # which materialises the scores (several times slower).
    if q.ndim > 4:
        q, k, v = (x.reshape(-1, *x.shape[-3:]) for x in (q, k, v))
    if key_mask is not None:
        key_mask = key_mask.reshape(-1, *key_mask.shape[-3:]) if key_mask.ndim > 4 else key_mask
        key_mask = key_mask.reshape((1,) * (4 - key_mask.ndim) + tuple(key_mask.shape))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask).reshape(shape)


_compiled_flex = None


def _flex_unit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """FlexAttention over the unit-major layout: q, k, v (B, heads, U, L, D); `allowed` (B|1, heads|1, U, U)
    says which key unit each query unit sees, `valid` (U, L) which tokens are real. Returns (B, heads, U, L, D).
    """
    global _compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if q.device.type == "cpu" and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise ValueError(
            "`backend='flex'` has no backward on CPU (a FlexAttention limitation); use backend='sdpa' to train "
            "on CPU or run the flex path under torch.no_grad()"
        )
    batch, heads, units, length, _ = q.shape
    allowed = allowed.expand(batch, heads, units, units)
    valid_flat = valid.reshape(-1).to(q.device)

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed[b, h, q_idx // length, kv_idx // length] & valid_flat[kv_idx]

    tokens = units * length
    block_mask = create_block_mask(mask_mod, batch, heads, tokens, tokens, device=q.device)
    if q.device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        attend = _compiled_flex
    else:
        attend = flex_attention  # eager: correct, but it does not skip the masked blocks
    flat = (rearrange(x, "b h u l d -> b h (u l) d") for x in (q, k, v))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        out = attend(*flat, block_mask=block_mask)
    return rearrange(out, "b h (u l) d -> b h u l d", l=length)


# ---------------------------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------------------------


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Every token attends to every token (one SDPA call)."""
    return F.scaled_dot_product_attention(q, k, v)


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Sequence[int],
    window: Sequence[int] = (1, 8, 8),
    shift: bool = False,
    backend: str = "sdpa",
) -> torch.Tensor:
    """3D window attention (SeedVR / Swin) without wrap-around.

    Args:
        window: (wt, wh, ww) tokens; clamped to the grid (a window as large as an axis never shifts on it).
        shift: move the window boundaries by half a window (odd layers); the edge windows become smaller
            ragged windows instead of rolling the far edge around, so opposite borders never attend each other.
        backend: "sdpa" (batched tiles, default, differentiable) or "flex".
    """
    _check_qkv(q, k, v)
    grid = check_grid(grid, q.shape[-2])
    window = check_window(window, 3, "window")
    _check_backend(backend)
    parts = [partition_axis(size, w, shift) for size, w in zip(grid, window)]
    if backend == "sdpa":
        return _ragged_window_attention(q, k, v, grid, parts)
    valid = window_token_mask(grid, parts).to(q.device)  # (windows, L)
    qw, kw, vw = (_pad_window_layout(x, grid, parts) for x in (q, k, v))  # (B, heads, windows, L, D)
    allowed = torch.eye(valid.shape[0], dtype=torch.bool, device=q.device)[None, None]
    return _unpad_window_layout(_flex_unit_attention(qw, kw, vw, allowed, valid), grid, parts)


def _ragged_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int, int], parts
) -> torch.Tensor:
    """Window attention with one unmasked SDPA call per region of equally shaped windows (at most 27).

    Padding the ragged edge windows of a shifted partition to full size spends compute on masked keys: with
    12x12 windows on a 48x80 grid, 45% of a shifted layer's attention FLOPs (40 padded windows of 144 tokens
    per frame against sum(n^2) over the real ones) and 8% of an unshifted one's.
    """
    tokens = [x.unflatten(-2, grid) for x in (q, k, v)]  # (B, heads, T, H, W, D)
    out = torch.empty_like(tokens[0])
    for runs in _regions(grid, parts):
        qw, kw, vw = (_region_windows(x, runs) for x in tokens)  # (B, heads, nt, ny, nx, lt, ly, lx, D)
        shape = qw.shape
        qw, kw, vw = (x.reshape(*shape[:2], -1, math.prod(shape[-4:-1]), shape[-1]) for x in (qw, kw, vw))
        _region_windows(out, runs).copy_(tile_attention(qw, kw, vw).view(shape))
    return out.flatten(-4, -2)


def temporal_unit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Sequence[int], temporal_unit: int, shift: bool = False
) -> torch.Tensor:
    """Full attention within blocks of `temporal_unit` latent frames (SimpleGVR's interleaving temporal units).

    It is window attention with a (u, H, W) window: only the time axis is cut, and `shift` moves the block
    boundaries by u // 2 without wrap-around. `temporal_unit >= T` is plain full attention.
    """
    grid = check_grid(grid, q.shape[-2])
    check_temporal_unit(temporal_unit)
    if temporal_unit >= grid[0]:
        return full_attention(q, k, v)
    return window_attention(q, k, v, grid, (temporal_unit, grid[1], grid[2]), shift)


def select_units(
    q_mean: torch.Tensor, k_mean: torch.Tensor, candidates: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k key units of every query unit: q_mean, k_mean (B, heads, U, D), candidates (U, U) bool.

    Score = q_mean . k_mean / sqrt(D), per head. Non-candidates never win; ties go to the lower unit index
    (stable sort). Returns indices (B, heads, U, k) and whether each slot holds a real candidate (a unit with
    fewer than k candidates gets empty slots), with k = min(topk, most candidates of any unit).
    """
    k_eff = min(topk, int(candidates.sum(-1).max()))
    if k_eff == 0:  # nothing to select (topk=0, or one unit per scope): skip the scoring
        empty = q_mean.new_zeros(*q_mean.shape[:-1], 0, dtype=torch.long)
        return empty, empty.bool()
    scores = torch.matmul(q_mean, k_mean.transpose(-1, -2)) * (q_mean.shape[-1] ** -0.5)
    scores = scores.masked_fill(~candidates, float("-inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k_eff]
    is_candidate = torch.gather(candidates.expand(*scores.shape), -1, order)
    return order, is_candidate


def sparse_topk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Sequence[int],
    window: Sequence[int] = (12, 9),
    topk: int = 1,
    temporal_unit: int | None = None,
    shift: bool = False,
    backend: str = "sdpa",
) -> torch.Tensor:
    """SimpleGVR's sparse local attention.

    Args:
        window: (wh, ww) tokens of a 2D window unit (12 x 9 in the paper); ragged edge units are padded, the
            padding is never attended and does not enter the unit means. Clamped to the frame size.
        topk: other units every unit attends to besides itself (1 in the paper), chosen per head by
            mean(q over unit) . mean(k over unit) / sqrt(D) among all units of all frames in scope (past
            and future); ties go to the lower unit index (units are numbered in (t, h, w) order), and a scope
            with fewer than `topk` other units gives all of them. Softmax is exact over the union of the
            selected units' keys. The selection is discrete and carries no gradient.
        temporal_unit: scope = blocks of this many latent frames (None: the whole video).
        shift: move the temporal blocks by temporal_unit // 2 (odd layers), without wrap-around.
        backend: "sdpa" (gather the selected units into (B*heads*U, (1+k)*L, D) tiles and run one batched
            attention; default, differentiable) or "flex" (FlexAttention block mask from the selection).
    """
    _check_qkv(q, k, v)
    grid = check_grid(grid, q.shape[-2])
    wh, ww = check_window(window, 2, "window")
    check_topk(topk)
    check_temporal_unit(temporal_unit)
    _check_backend(backend)
    batch, heads, _, dim = q.shape
    parts = [(1, 0, grid[0]), partition_axis(grid[1], wh), partition_axis(grid[2], ww)]
    valid = window_token_mask(grid, parts).to(q.device)  # (U, L), units in (t, y, x) order
    num_units, length = valid.shape
    padded = not bool(valid.all())

    # 1. Candidates: other units in the same temporal block; every unit keeps itself + `slots - 1` others.
    frame_of_unit = torch.arange(num_units, device=q.device) // (num_units // grid[0])
    block = temporal_block_ids(grid[0], temporal_unit, shift).to(q.device)[frame_of_unit]
    candidates = (block[:, None] == block[None, :]) & ~torch.eye(num_units, dtype=torch.bool, device=q.device)
    slots = 1 + min(topk, int(candidates.sum(-1).max()))

    # 2. Unit-major layout. Keys and values go straight into slot 0 of the gather buffers
    #    (B, heads, U, slots, L, D): the selected units are copied next to them, so each tile's keys are contiguous.
    qu = _pad_window_layout(q, grid, parts)  # (B, heads, U, L, D)
    k_tiles, v_tiles = (x.new_empty(batch, heads, num_units, slots, length, dim) for x in (k, v))
    ku, vu = k_tiles[:, :, :, 0], v_tiles[:, :, :, 0]
    _pad_window_layout(k, grid, parts, out=ku)
    _pad_window_layout(v, grid, parts, out=vu)

    # 3. Selection from the unit means over real tokens (padding is zero, so sum / count is the real mean).
    with torch.no_grad():
        counts = valid.sum(-1, keepdim=True).to(q.dtype)
        chosen, is_candidate = select_units(qu.sum(-2) / counts, ku.sum(-2) / counts, candidates, topk)
    self_index = torch.arange(num_units, device=q.device)[:, None].expand(batch, heads, num_units, 1)
    selected = torch.cat([self_index, chosen], dim=-1)  # (B, heads, U, slots)
    slot_ok = torch.cat([torch.ones_like(self_index, dtype=torch.bool), is_candidate], dim=-1)

    if backend == "flex":
        allowed = torch.zeros(batch, heads, num_units, num_units, dtype=torch.bool, device=q.device)
        allowed.scatter_(-1, selected, slot_ok)
        out = _flex_unit_attention(qu, ku, vu, allowed, valid)
        return _unpad_window_layout(out, grid, parts)

    # 4. Gather the selected units into slots 1.. with one index_select over the flattened (B, heads, U) units
    #    per top-k rank (a loop over ranks, k = 1 in the paper, never over units).
    offsets = torch.arange(batch * heads, device=q.device).view(batch, heads, 1, 1) * num_units
    flat_index = rearrange(chosen + offsets, "b h u s -> s (b h u)")
    differentiable = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
    for tiles in (k_tiles, v_tiles):
        flat = tiles.flatten(0, 2)  # (B*heads*U, slots, L, D), a view
        for rank, index in enumerate(flat_index, start=1):
            if differentiable:
                flat[:, rank].copy_(flat[:, 0].index_select(0, index))
            else:  # no temporary: write the gathered rows in place
                torch.index_select(flat[:, 0], 0, index, out=flat[:, rank])

    key_mask = None
    if padded or not bool(slot_ok.all()):
        key_mask = valid[selected] & slot_ok[..., None]  # (B, heads, U, slots, L)
        key_mask = rearrange(key_mask, "b h u s l -> b h u 1 (s l)")
    out = tile_attention(qu, k_tiles.flatten(-3, -2), v_tiles.flatten(-3, -2), key_mask)
    return _unpad_window_layout(out, grid, parts)


# ---------------------------------------------------------------------------------------------------------------
# Adaptive window size (SeedVR2 section 3.2)
# ---------------------------------------------------------------------------------------------------------------


def adaptive_window_size(
    grid: Sequence[int],
    reference: Sequence[int] = (45, 80),
    num_windows: Sequence[int] = (1, 3, 3),
    max_frames: int = 30,
) -> tuple[int, int, int]:
    """SeedVR2's adaptive, resolution-consistent 3D window (equations (1) and (2)).

    The spatial window is sized as if the frame had the training resolution's area: the proxy size
    h~ = sqrt(h_ref * w_ref * H / W), w~ = sqrt(h_ref * w_ref * W / H) keeps the test aspect ratio at the
    training area, so a 1080p input gets the same window size (in tokens) as the 720p training data and just
    more windows. Then p_t = ceil(min(T, max_frames) / n_t), p_h = ceil(h~ / n_h), p_w = ceil(w~ / n_w).

    Args:
        grid: (T, H, W) tokens of the input.
        reference: (h_ref, w_ref) tokens of the training resolution (45 x 80 = 720p after an 8x VAE and a
            2x2 patch, SeedVR2's setting).
        num_windows: (n_t, n_h, n_w) windows per axis at the training area (3 x 3 spatially in SeedVR2).
        max_frames: temporal cap, so long test videos keep the training sequence length per window.
    """
    if len(grid) != 3 or not all(isinstance(g, int) and g > 0 for g in grid):
        raise ValueError(f"`grid` must be a (T, H, W) triple of positive ints, got {grid!r}")
    ref_h, ref_w = check_window(reference, 2, "reference")
    n_t, n_h, n_w = check_window(num_windows, 3, "num_windows")
    if not isinstance(max_frames, int) or max_frames <= 0:
        raise ValueError(f"`max_frames` must be a positive int, got {max_frames!r}")
    frames, height, width = grid
    area = ref_h * ref_w
    proxy_h, proxy_w = math.sqrt(area * height / width), math.sqrt(area * width / height)
    return (
        math.ceil(min(frames, max_frames) / n_t),
        max(1, math.ceil(proxy_h / n_h)),
        max(1, math.ceil(proxy_w / n_w)),
    )


# ---------------------------------------------------------------------------------------------------------------
# Dispatcher
# ---------------------------------------------------------------------------------------------------------------


def self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Sequence[int],
    mode: str = "full",
    shift: bool = False,
    **options,
) -> torch.Tensor:
    """Dispatch to the attention of `mode`; `shift` is set on odd layers (shifted windows / temporal units).

    Options per mode:
        full: temporal_unit=None.
        sparse_topk: window=(12, 9), topk=1, temporal_unit=None, backend="sdpa".
        window: window=None (None: `adaptive_window_size(grid, window_reference, num_windows, max_frames)`),
            window_reference=(45, 80), num_windows=(1, 3, 3), max_frames=30, backend="sdpa".
    """
    check_grid(grid, q.shape[-2])
    check_attention_mode(mode, "mode")
    if mode == "full":
        temporal_unit = options.pop("temporal_unit", None)
        _reject_unknown(options, mode)
        if temporal_unit is None:
            return full_attention(q, k, v)
        return temporal_unit_attention(q, k, v, grid, temporal_unit, shift)
    if mode == "sparse_topk":
        allowed = {"window", "topk", "temporal_unit", "backend"}
        _reject_unknown({k: v for k, v in options.items() if k not in allowed}, mode)
        return sparse_topk_attention(q, k, v, grid, shift=shift, **options)
    window = options.pop("window", None)
    adaptive = {name: options.pop(name) for name in ("num_windows", "max_frames") if name in options}
    reference = options.pop("window_reference", (45, 80))
    backend = options.pop("backend", "sdpa")
    _reject_unknown(options, mode)
    if window is None:
        window = adaptive_window_size(tuple(grid), reference, **adaptive)
    return window_attention(q, k, v, grid, window, shift, backend)


def _reject_unknown(options: dict, mode: str) -> None:
    if options:
        raise ValueError(f"unknown attention options for mode {mode!r}: {sorted(options)}")
