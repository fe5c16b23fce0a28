"""Self-attention over a (T, H, W) token grid, configured per layer by an `AttentionSpec`.

Every function takes q, k, v of shape (B, heads, N, D) with the N tokens in (t, h, w) row-major order of
`grid = (T, H, W)` and returns (B, heads, N, D).

Modes:

- `full`: every token attends to every token, optionally restricted to temporal units (blocks of
  `temporal_unit` latent frames, SimpleGVR section 4.4).
- `sparse_topk`: SimpleGVR's sparse local attention. Frames are cut into 2D window units; each unit attends
  to itself and to its `topk` best-scoring units (mean query . mean key) of all frames in scope.
- `window`: 3D (shifted) window attention with SeedVR2's adaptive, resolution-consistent window size.

The spec (`attention_spec.AttentionSpec`) says which mode a layer runs, with which options and backend.
The local modes (`sparse_topk`, `window`, `full` with temporal units) never loop over units or windows: tokens are
laid out unit-major (`token_layout`), the selected keys are gathered into one batched tensor and one attention call
runs over all tiles. That "sdpa" path is the default on every device and supports backward. `backend="flex"` runs
the same selection through FlexAttention with a block mask instead (compiled on CUDA; eager forward only on CPU,
where FlexAttention has no backward). Plain full attention runs torch's SDPA or any of diffusers' attention
backends. Every shape decision is taken on the host from the grid, so no mode reads a tensor value on the device.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from cascade_vsr.models.attention_spec import (
    DEFAULT_BACKEND,
    LOCAL_BACKENDS,
    AttentionSpec,
    check_temporal_unit,
    check_topk,
    check_window,
    diffusers_backends,
)
from cascade_vsr.models.token_layout import (
    pad_window_layout,
    partition_axis,
    region_windows,
    sparse_unit_layout,
    temporal_block_ids,
    unpad_window_layout,
    window_regions,
    window_token_mask,
)

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


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"`q`, `k`, `v` must share one (B, heads, N, D) shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )


def _check_backend(backend: str, accepted: Sequence[str] = LOCAL_BACKENDS) -> str:
    if backend not in accepted:
        raise ValueError(f"`backend` must be one of {tuple(accepted)}, got {backend!r}")
    return backend


# ---------------------------------------------------------------------------------------------------------------
# The batched kernel all local modes share
# ---------------------------------------------------------------------------------------------------------------


def tile_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact softmax attention of many small tiles in one SDPA call: q (..., Lq, D), k/v (..., Lk, D).

    `key_mask` (..., 1, Lk) is True for keys that may be attended (broadcast over the leading dims); every
    query row keeps at least one key. SDPA picks fused kernels on CPU and GPU (benchmarks/attention.py compares
    it with a batched matmul + softmax over the same tiles).
    """
    shape = q.shape
    # SDPA's fused CPU kernel takes 4D inputs and a 4D mask only; anything else falls back to the math path,
    # which materialises the scores.
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
    valid_flat = valid.reshape(-1)

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


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = DEFAULT_BACKEND) -> torch.Tensor:
    """Every token attends to every token: torch's SDPA ("sdpa") or diffusers' `dispatch_attention_fn` on one
    of its backends ("native", "flash", "sage", "flex", ...)."""
    if backend == DEFAULT_BACKEND:
        return F.scaled_dot_product_attention(q, k, v)
    _check_backend(backend, (DEFAULT_BACKEND, *diffusers_backends()))
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    # diffusers' backends take (B, N, heads, D)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    return dispatch_attention_fn(q, k, v, backend=AttentionBackendName(backend)).transpose(1, 2)


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Sequence[int],
    window: Sequence[int] = (1, 8, 8),
    shift: bool = False,
    backend: str = DEFAULT_BACKEND,
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
    valid = window_token_mask(grid, parts, device=q.device)  # (windows, L)
    qw, kw, vw = (pad_window_layout(x, grid, parts) for x in (q, k, v))  # (B, heads, windows, L, D)
    allowed = torch.eye(valid.shape[0], dtype=torch.bool, device=q.device)[None, None]
    return unpad_window_layout(_flex_unit_attention(qw, kw, vw, allowed, valid), grid, parts)


def _ragged_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int, int], parts
) -> torch.Tensor:
    """Window attention with one unmasked SDPA call per region of equally shaped windows (at most 27).

    Grouping the windows by shape lets the ragged edge windows run at their own size, unpadded and unmasked, so
    each window costs its own size squared; padding them to the full window would spend compute on masked keys,
    most of all in shifted partitions, whose first and last windows along every axis are ragged.
    """
    tokens = [x.unflatten(-2, grid) for x in (q, k, v)]  # (B, heads, T, H, W, D)
    out = torch.empty_like(tokens[0])
    for runs in window_regions(grid, parts):
        qw, kw, vw = (region_windows(x, runs) for x in tokens)  # (B, heads, nt, ny, nx, lt, ly, lx, D)
        shape = qw.shape
        qw, kw, vw = (x.reshape(*shape[:2], -1, math.prod(shape[-4:-1]), shape[-1]) for x in (qw, kw, vw))
        region_windows(out, runs).copy_(tile_attention(qw, kw, vw).view(shape))
    return out.flatten(-4, -2)


def temporal_unit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Sequence[int],
    temporal_unit: int,
    shift: bool = False,
    backend: str = DEFAULT_BACKEND,
) -> torch.Tensor:
    """Full attention within blocks of `temporal_unit` latent frames (SimpleGVR's interleaving temporal units).

    It is window attention with a (u, H, W) window: only the time axis is cut, and `shift` moves the block
    boundaries by u // 2 without wrap-around. `temporal_unit >= T` is one block: plain full attention (torch's
    SDPA on either backend).
    """
    grid = check_grid(grid, q.shape[-2])
    check_temporal_unit(temporal_unit)
    _check_backend(backend)
    if temporal_unit >= grid[0]:
        return full_attention(q, k, v)
    return window_attention(q, k, v, grid, (temporal_unit, grid[1], grid[2]), shift, backend)


def select_units(
    q_mean: torch.Tensor, k_mean: torch.Tensor, candidates: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k key units of every query unit: q_mean, k_mean (B, heads, U, D), candidates (U, U) bool.

    Score = q_mean . k_mean / sqrt(D), per head. Non-candidates never win; ties go to the lower unit index
    (stable sort). Returns indices (B, heads, U, k) and whether each slot holds a real candidate (a unit with
    fewer than k candidates gets empty slots), with k = min(topk, Uk - 1) taken from the shapes: a caller that
    knows that no unit has that many candidates passes a smaller `topk` (`sparse_unit_layout.slots - 1`).
    """
    k_eff = min(topk, k_mean.shape[-2] - 1)
    if k_eff <= 0:  # nothing to select (topk=0, or one unit per scope): skip the scoring
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
    backend: str = DEFAULT_BACKEND,
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
    window = check_window(window, 2, "window")
    check_topk(topk)
    check_temporal_unit(temporal_unit)
    _check_backend(backend)
    batch, heads, _, dim = q.shape
    layout = sparse_unit_layout(grid, window, topk, temporal_unit, shift)  # shapes, from the grid on the host
    parts, num_units, length, slots = list(layout.parts), layout.num_units, layout.unit_tokens, layout.slots
    valid = window_token_mask(grid, parts, device=q.device)  # (U, L), units in (t, y, x) order

    # 1. Candidates: other units in the same temporal block; every unit keeps itself + `slots - 1` others.
    frame_of_unit = torch.arange(num_units, device=q.device) // layout.units_per_frame
    block = temporal_block_ids(grid[0], temporal_unit, shift, device=q.device)[frame_of_unit]
    candidates = (block[:, None] == block[None, :]) & ~torch.eye(num_units, dtype=torch.bool, device=q.device)

    # 2. Unit-major layout. Keys and values go straight into slot 0 of the gather buffers
    #    (B, heads, U, slots, L, D): the selected units are copied next to them, so each tile's keys are contiguous.
    qu = pad_window_layout(q, grid, parts)  # (B, heads, U, L, D)
    k_tiles, v_tiles = (x.new_empty(batch, heads, num_units, slots, length, dim) for x in (k, v))
    ku, vu = k_tiles[:, :, :, 0], v_tiles[:, :, :, 0]
    pad_window_layout(k, grid, parts, out=ku)
    pad_window_layout(v, grid, parts, out=vu)

    # 3. Selection from the unit means over real tokens (padding is zero, so sum / count is the real mean).
    with torch.no_grad():
        counts = valid.sum(-1, keepdim=True).to(q.dtype)
        chosen, is_candidate = select_units(qu.sum(-2) / counts, ku.sum(-2) / counts, candidates, slots - 1)
    self_index = torch.arange(num_units, device=q.device)[:, None].expand(batch, heads, num_units, 1)
    selected = torch.cat([self_index, chosen], dim=-1)  # (B, heads, U, slots)
    slot_ok = torch.cat([torch.ones_like(self_index, dtype=torch.bool), is_candidate], dim=-1)

    if backend == "flex":
        allowed = torch.zeros(batch, heads, num_units, num_units, dtype=torch.bool, device=q.device)
        allowed.scatter_(-1, selected, slot_ok)
        out = _flex_unit_attention(qu, ku, vu, allowed, valid)
        return unpad_window_layout(out, grid, parts)

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
    if layout.masked:  # padding tokens, or units with empty slots
        key_mask = valid[selected] & slot_ok[..., None]  # (B, heads, U, slots, L)
        key_mask = rearrange(key_mask, "b h u s l -> b h u 1 (s l)")
    out = tile_attention(qu, k_tiles.flatten(-3, -2), v_tiles.flatten(-3, -2), key_mask)
    return unpad_window_layout(out, grid, parts)


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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Sequence[int], spec: AttentionSpec | None = None
) -> torch.Tensor:
    """Self-attention of one layer as its `spec` says (None: full attention on torch's SDPA)."""
    spec = AttentionSpec() if spec is None else spec
    if not isinstance(spec, AttentionSpec):
        raise ValueError(f"`spec` must be an AttentionSpec, got {type(spec).__name__}")
    grid = check_grid(grid, q.shape[-2])
    if spec.mode == "full":
        if spec.temporal_unit is None:
            return full_attention(q, k, v, spec.backend)
        return temporal_unit_attention(q, k, v, grid, spec.temporal_unit, spec.shift, spec.backend)
    if spec.mode == "sparse_topk":
        return sparse_topk_attention(
            q, k, v, grid, spec.window, spec.topk, spec.temporal_unit, spec.shift, spec.backend
        )
    window = spec.window
    if window is None:
        window = adaptive_window_size(grid, spec.window_reference, spec.num_windows, spec.max_frames)
    return window_attention(q, k, v, grid, window, spec.shift, spec.backend)
