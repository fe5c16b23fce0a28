"""Block-causal self-attention over chunks of latent frames (InfVSR, section 4.1), and its rolling KV cache.

The frames of chunk c attend to every frame of chunk c and of the previous `cache_chunks` chunks, never to a later
frame. Queries cover Tq frames and keys Tk >= Tq frames of one (H, W) token grid, the queries being the last Tq key
frames. The offline form (training, a whole clip at once) passes the clip as both and lets `chunk_visibility` mask
what each chunk may not see; the streaming form passes one chunk as the queries and [cached chunks, that chunk] as
the keys. Both run the same code on the same rows, so a stream equals the offline computation of its clip.

Each mode keeps its spatial structure and takes its temporal extent from the chunks:
- `full`: every visible token.
- `window`: the layer's 2D spatial windows (shifted on odd layers), over all visible frames.
- `sparse_topk`: 2D units per frame; each unit attends to itself and to its top-k units among all visible frames.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from einops import rearrange

from cascade_vsr.models.attention import adaptive_window_size, select_units, tile_attention
from cascade_vsr.models.attention_spec import AttentionSpec
from cascade_vsr.models.token_layout import (
    Part,
    pad_window_layout,
    partition_axis,
    region_windows,
    unpad_window_layout,
    window_regions,
    window_token_mask,
)


def chunk_ids(num_frames: int, chunk_frames: int, first_chunk: int = 0) -> torch.Tensor:
    """Chunk index of each of `num_frames` consecutive latent frames, (T,) int64 on the host."""
    return torch.arange(num_frames) // chunk_frames + first_chunk


def chunk_visibility(query_chunks: torch.Tensor, key_chunks: torch.Tensor, cache_chunks: int) -> torch.Tensor:
    """(Tq, Tk) bool on the host: query frame i may see key frame j when chunk(j) is chunk(i) or one of the
    `cache_chunks` chunks before it."""
    lag = query_chunks[:, None] - key_chunks[None, :]
    return (lag >= 0) & (lag <= cache_chunks)


def _frame_mask(visibility: torch.Tensor, query_tokens: int, key_tokens: int, device: torch.device):
    """Token mask of frame visibility, frames expanded to blocks of tokens; None when every key is visible."""
    if bool(visibility.all()):
        return None
    mask = visibility.repeat_interleave(query_tokens, 0).repeat_interleave(key_tokens, 1)
    return mask.to(device)


def causal_full_attention(q, k, v, query_grid, visibility):
    """Every query token attends to every token of its visible frames."""
    tokens = query_grid[1] * query_grid[2]
    return tile_attention(q, k, v, _frame_mask(visibility, tokens, tokens, q.device))


def window_tiles(x: torch.Tensor, grid: Sequence[int], spatial: Sequence[Part]) -> Iterator[torch.Tensor]:
    """The 2D windows of x (B, heads, T*H*W, D), cut by the `spatial` (H, W) partitions and spanning all T frames,
    region by region (`window_regions`), each region as a strided view (B, heads, ny, nx, T, ly, lx, D)."""
    parts = [partition_axis(grid[0], grid[0]), *spatial]
    tokens = x.unflatten(-2, tuple(grid))
    for runs in window_regions(grid, parts):
        yield region_windows(tokens, runs).squeeze(2)


def _key_tiles(windows: torch.Tensor) -> torch.Tensor:
    """Key or value windows (B, heads, ny, nx, T, ly, lx, D) -> (B, heads, windows, T, window tokens, D): the layout
    the KV cache keeps, where any run of frames is a view (B, heads, windows, frames x window tokens, D)."""
    return rearrange(windows, "b h ny nx t y x d -> b h (ny nx) t (y x) d")


def _tiles_shape(windows: torch.Tensor) -> tuple[int, ...]:
    """The shape that `_key_tiles` gives windows (B, heads, ny, nx, T, ly, lx, D)."""
    batch, heads, ny, nx, frames, ly, lx, dim = windows.shape
    return (batch, heads, ny * nx, frames, ly * lx, dim)


def visible_runs(visibility: torch.Tensor) -> list[tuple[slice, slice]] | None:
    """The (Tq, Tk) frame `visibility` as runs (query frames, key frames): consecutive query frames that all see the
    same consecutive key frames and no other, or None where it is not of that form. Block-causal visibility always
    is (a chunk sees itself and the m chunks before it), so each chunk can attend to exactly its own keys."""
    counts = visibility.sum(1)
    first = visibility.int().argmax(1)
    keys = torch.arange(visibility.shape[1])
    band = (keys >= first[:, None]) & (keys < (first + counts)[:, None])
    if not bool((counts > 0).all()) or not torch.equal(band, visibility):
        return None
    starts = torch.ones_like(counts, dtype=torch.bool)
    starts[1:] = (first[1:] != first[:-1]) | (counts[1:] != counts[:-1])
    bounds = [*torch.nonzero(starts).flatten().tolist(), len(counts)]
    return [
        (slice(start, end), slice(int(first[start]), int(first[start] + counts[start])))
        for start, end in zip(bounds[:-1], bounds[1:])
    ]


def run_groups(runs: Sequence[tuple[slice, slice]]) -> list[tuple[int, int, int, int, int]]:
    """Consecutive `visible_runs` with the same numbers of query and key frames whose keys move on as far as their
    queries (a block-causal layer's chunks once `m` chunks lie behind them), as one group each:
    (first query frame, first key frame, query frames per run, key frames per run, runs)."""
    groups: list[tuple[int, int, int, int, int]] = []
    for queries, keys in runs:
        q_len, k_len = queries.stop - queries.start, keys.stop - keys.start
        if groups:
            q_start, k_start, group_q, group_k, count = groups[-1]
            follows = queries.start == q_start + count * q_len and keys.start == k_start + count * q_len
            if (q_len, k_len) == (group_q, group_k) and follows:
                groups[-1] = (q_start, k_start, q_len, k_len, count + 1)
                continue
        groups.append((queries.start, keys.start, q_len, k_len, 1))
    return groups


def attend_window_tiles(
    q: torch.Tensor,
    query_grid: tuple[int, int, int],
    spatial: Sequence[Part],
    key_tiles: Iterable[tuple[torch.Tensor, torch.Tensor]],
    visibility: torch.Tensor,
) -> torch.Tensor:
    """Window attention of q (B, heads, Tq*H*W, D) over `key_tiles`: per region of equally shaped windows, the
    (keys, values) of its windows (B, heads, windows, Tk, window tokens, D), in the order of `window_tiles`.

    Each run of query frames with the same visible key frames (`visible_runs`: a chunk of a block-causal layer)
    attends to exactly those keys, and runs of the same shape go in one SDPA call (`run_groups`: the keys of a
    group are overlapping views of the tiles, unfolded along the frames), so a region takes about m + 1 calls
    whatever the number of chunks; a `visibility` of any other form takes one call masked by it. The result is
    (B, heads, N, D) with the heads innermost in memory, so that merging them is a view."""
    batch, heads, _, dim = q.shape
    frames, height, width = query_grid
    out = q.new_empty(batch, frames, height, width, heads, dim)
    runs = visible_runs(visibility)
    if runs is None:
        groups, mask = [(0, 0, frames, visibility.shape[1], 1)], visibility
    else:
        groups, mask = run_groups(runs), None
    parts = [partition_axis(frames, frames), *spatial]
    regions = zip(window_regions(query_grid, parts), window_tiles(q, query_grid, spatial), key_tiles)
    for region, q_windows, (keys, values) in regions:
        window_tokens = q_windows.shape[-3] * q_windows.shape[-2]
        key_mask = None if mask is None else _frame_mask(mask, window_tokens, window_tokens, q.device)
        for q_start, k_start, q_len, k_len, count in groups:
            # frames are axis -4 of the windows, -3 of the key tiles; run i's keys start i * q_len frames later
            q_part = q_windows[..., q_start : q_start + count * q_len, :, :, :].unflatten(-4, (count, q_len))
            tiles = rearrange(q_part, "b h ny nx n t y x d -> b h (ny nx) n (t y x) d")
            span = slice(k_start, k_start + (count - 1) * q_len + k_len)
            keys_part, values_part = (
                x[..., span, :, :].unfold(-3, k_len, q_len).movedim(-1, -3).flatten(-3, -2) for x in (keys, values)
            )  # (B, heads, windows, runs, k_len x window tokens, D), views
            attended = tile_attention(tiles, keys_part, values_part, key_mask).view(q_part.shape)
            # a fresh view of `out` for every write: autograd refuses writes through views taken before an earlier one
            out_windows = region_windows(rearrange(out, "b t y x h d -> b h t y x d"), region).squeeze(2)
            out_windows[..., q_start : q_start + count * q_len, :, :, :].unflatten(-4, (count, q_len)).copy_(attended)
    return rearrange(out, "b t y x h d -> b h (t y x) d")


def window_partitions(height: int, width: int, window: Sequence[int], shift: bool) -> list[Part]:
    """The (H, W) partitions of a layer's 2D windows of (wh, ww) tokens, shifted by half a window when `shift`."""
    return [partition_axis(height, window[0], shift), partition_axis(width, window[1], shift)]


def causal_window_attention(q, k, v, query_grid, key_frames, visibility, window, shift):
    """2D spatial windows of (wh, ww) tokens (shifted by half a window when `shift`), each over all visible frames:
    per region of equally shaped windows (at most 9), each chunk on exactly its visible frames, chunks of one shape in
    one SDPA call (`attend_window_tiles`)."""
    spatial = window_partitions(*query_grid[1:], window, shift)
    key_grid = (key_frames, *query_grid[1:])
    key_tiles = (
        (_key_tiles(keys), _key_tiles(values))
        for keys, values in zip(window_tiles(k, key_grid, spatial), window_tiles(v, key_grid, spatial))
    )
    return attend_window_tiles(q, query_grid, spatial, key_tiles, visibility)


def causal_sparse_topk_attention(q, k, v, query_grid, key_frames, visibility, window, topk):
    """SimpleGVR's sparse local attention over the visible frames: 2D units of (wh, ww) tokens in every frame; a
    query unit attends to its own unit and to its `topk` best units (mean query . mean key) among the units of
    its visible frames. Softmax is exact over the union."""
    batch, heads, _, dim = q.shape
    frames, height, width = query_grid
    key_grid = (key_frames, height, width)
    spatial = (partition_axis(height, window[0]), partition_axis(width, window[1]))
    q_parts, k_parts = ((1, 0, frames), *spatial), ((1, 0, key_frames), *spatial)
    per_frame = spatial[0][2] * spatial[1][2]
    q_valid = window_token_mask(query_grid, q_parts, device=q.device)  # (Uq, L)
    k_valid = window_token_mask(key_grid, k_parts, device=q.device)  # (Uk, L)
    num_q, num_k = frames * per_frame, key_frames * per_frame
    own = torch.arange(num_q) + (key_frames - frames) * per_frame  # the key unit at each query unit's place

    # Candidates (on the host, from the visibility): the units of visible frames, except the unit's own.
    candidates = visibility.repeat_interleave(per_frame, 0).repeat_interleave(per_frame, 1)
    candidates[torch.arange(num_q), own] = False
    slots = 1 + min(topk, int(candidates.sum(1).max()))
    candidates, own = candidates.to(q.device), own.to(q.device)

    qu = pad_window_layout(q, query_grid, q_parts)  # (B, heads, Uq, L, D)
    ku, vu = pad_window_layout(k, key_grid, k_parts), pad_window_layout(v, key_grid, k_parts)
    with torch.no_grad():
        q_mean = qu.sum(-2) / q_valid.sum(-1, keepdim=True).to(q.dtype)
        k_mean = ku.sum(-2) / k_valid.sum(-1, keepdim=True).to(k.dtype)
        chosen, is_candidate = select_units(q_mean, k_mean, candidates, slots - 1)
    own_index = own[:, None].expand(batch, heads, num_q, 1)
    selected = torch.cat([own_index, chosen], dim=-1)  # (B, heads, Uq, slots)
    slot_ok = torch.cat([torch.ones_like(own_index, dtype=torch.bool), is_candidate], dim=-1)
    offsets = torch.arange(batch * heads, device=q.device).view(batch, heads, 1, 1) * num_k
    flat_index = (selected + offsets).flatten()
    k_sel, v_sel = (
        rearrange(x.flatten(0, 2)[flat_index], "(b h u s) l d -> b h u (s l) d", b=batch, h=heads, u=num_q)
        for x in (ku, vu)
    )
    key_mask = rearrange(k_valid[selected] & slot_ok[..., None], "b h u s l -> b h u 1 (s l)")
    out = tile_attention(qu, k_sel, v_sel, key_mask)
    return unpad_window_layout(out, query_grid, list(q_parts))


def causal_self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_grid: Sequence[int],
    key_frames: int,
    visibility: torch.Tensor,
    spec: AttentionSpec,
    cache: CausalKVCache | None = None,
    layer: object = None,
) -> torch.Tensor:
    """Block-causal self-attention of one layer: q (B, heads, Tq*H*W, D) of the `query_grid`, `visibility`
    (Tq, key_frames) bool on the host (`chunk_visibility`). The layer's `spec` gives the mode and its spatial window.

    Offline, k / v (B, heads, key_frames*H*W, D) hold every key frame, the last Tq being the queries' own. Streaming,
    they hold the chunk's own Tq frames and `cache` adds the earlier ones of `layer` (its key for the cache)."""
    query_grid = tuple(int(g) for g in query_grid)
    frames, height, width = query_grid
    if visibility.shape != (frames, key_frames) or key_frames < frames:
        raise ValueError(
            f"`visibility` must have shape (Tq, Tk) = ({frames}, {key_frames}) with Tk >= Tq, got "
            f"{tuple(visibility.shape)}"
        )
    given_frames = key_frames if cache is None else frames
    if k.shape[-2] != given_frames * height * width or k.shape != v.shape:
        raise ValueError(
            f"`k` and `v` must hold {given_frames} frames of {height}x{width} tokens, got {tuple(k.shape)}"
        )
    if spec.mode == "window":
        window = spec.window
        if window is None:
            window = adaptive_window_size(query_grid, spec.window_reference, spec.num_windows, spec.max_frames)
        if cache is None:
            return causal_window_attention(q, k, v, query_grid, key_frames, visibility, window[-2:], spec.shift)
        spatial = window_partitions(height, width, window[-2:], spec.shift)
        key_tiles = cache.window_tiles(layer, k, v, query_grid, spatial)
        return attend_window_tiles(q, query_grid, spatial, key_tiles, visibility)
    if cache is not None:
        k, v = cache.keys_values(layer, k, v, frames)
    if spec.mode == "full":
        return causal_full_attention(q, k, v, query_grid, visibility)
    return causal_sparse_topk_attention(q, k, v, query_grid, key_frames, visibility, spec.window, spec.topk)


@dataclass(frozen=True)
class CausalContext:
    """What a layer's self-attention needs to be block-causal: the (Tq, Tk) frame `visibility` (host), the key
    frame count, and the streaming cache (None offline: the keys are the queries' own frames)."""

    visibility: torch.Tensor
    key_frames: int
    cache: CausalKVCache | None = None


class _RollingBuffer:
    """One layer's cached keys and values: tensors that grow along `axis` (tokens, or frames of window tiles) as
    chunks arrive and drop their oldest entries as the cache rolls. They live in buffers of about twice the entries
    a forward needs: a chunk is written after the held entries and the held ones are views, so each entry is copied
    once on arrival and once more per compaction (when a buffer's end is reached), instead of once per chunk it stays
    in the cache, as concatenating the cache and the chunk at every chunk would."""

    def __init__(self, axis: int):
        self.axis = axis
        self.tensors: list[torch.Tensor] = []
        self.start = self.end = 0

    @property
    def batch_size(self) -> int | None:
        return self.tensors[0].shape[0] if self.tensors else None

    def make_room(self, like: torch.Tensor, shapes: Sequence[Sequence[int]], entries: int) -> list[torch.Tensor]:
        """Slices of `entries` along the axis after the held ones, one per tensor (of `shapes`, the chunk's, with
        the dtype and device of `like`), for the caller to write; compacts or grows the buffers first if needed."""
        axis, kept = self.axis, self.end - self.start
        capacity = self.tensors[0].shape[axis] if self.tensors else 0
        if self.end + entries > capacity:
            if not (self.start >= kept and kept + entries <= capacity):  # no room, or compacting would overlap
                capacity = 2 * (kept + entries)
                grown = []
                for shape in shapes:
                    shape = list(shape)
                    shape[axis] = capacity
                    grown.append(like.new_empty(shape))
                for new, old in zip(grown, self.tensors):
                    new.narrow(axis, 0, kept).copy_(old.narrow(axis, self.start, kept))
                self.tensors = grown
            else:
                for tensor in self.tensors:
                    tensor.narrow(axis, 0, kept).copy_(tensor.narrow(axis, self.start, kept))
            self.start, self.end = 0, kept
        slots = [tensor.narrow(axis, self.end, entries) for tensor in self.tensors]
        self.end += entries
        return slots

    def held(self) -> list[torch.Tensor]:
        """The held entries of every tensor, as views (valid until the next `make_room`)."""
        return [tensor.narrow(self.axis, self.start, self.end - self.start) for tensor in self.tensors]

    def keep_last(self, entries: int) -> None:
        self.start = max(self.start, self.end - entries)


@dataclass
class CausalKVCache:
    """Rolling keys and values of every self-attention layer over the last `cache_chunks` chunks, for streaming a
    block-causal model chunk by chunk (`CascadeVSRTransformer3DModel(..., kv_cache=cache)`).

    A forward on the next chunks reads each layer's cached (k, v) followed by theirs; `advance` then keeps the last
    `cache_chunks` chunks and drops what is older, so the cache never holds more. `window` layers keep their keys
    and values as window tiles (`window_tiles`), the others as tokens (`keys_values`). Keys are stored after
    RoPE at their absolute frame positions (`frames_seen` is the next chunk's first position): attention scores
    only depend on position differences, so the rolled cache stays consistent. Streaming is inference: the cached
    tensors are written in place, so the model refuses a streamed forward with gradients enabled."""

    cache_chunks: int
    next_chunk: int = 0
    frames_seen: int = 0
    frame_chunks: list[int] = field(default_factory=list)  # chunk of each cached frame
    guidance: torch.Tensor | None = None  # the first chunk's pooled key frames (visual guidance), kept for all
    _entries: dict = field(default_factory=dict)  # layer -> _RollingBuffer
    _staged_frames: int | None = None
    _query_chunks: list[int] | None = None  # chunk of each frame of the forward under way
    _ended: bool = False  # a chunk shorter than the model's chunk came: the stream is over

    def __post_init__(self):
        if isinstance(self.cache_chunks, bool) or not isinstance(self.cache_chunks, int) or self.cache_chunks < 0:
            raise ValueError(f"`cache_chunks` must be an int >= 0, got {self.cache_chunks!r}")

    @property
    def num_chunks(self) -> int:
        """Chunks held now."""
        return len(set(self.frame_chunks))

    def visibility(self, num_frames: int, chunk_frames: int | None = None) -> tuple[torch.Tensor, int]:
        """(visibility, key frames) of a forward on the next `num_frames` frames, cut into chunks of `chunk_frames`
        (None: one chunk): the cached frames, then its own. A chunk shorter than `chunk_frames` ends the stream."""
        if self._ended:
            raise ValueError(
                "the stream's last chunk was shorter than causal_chunk_frames: no frame can follow it (only the "
                "stream's last chunk may be shorter)"
            )
        queries = chunk_ids(num_frames, chunk_frames or num_frames, self.next_chunk)
        self._ended = chunk_frames is not None and num_frames % chunk_frames != 0
        self._query_chunks = queries.tolist()
        keys = torch.tensor([*self.frame_chunks, *self._query_chunks], dtype=torch.long)
        return chunk_visibility(queries, keys, self.cache_chunks), len(keys)

    def _buffer(self, layer: object, key: torch.Tensor, num_frames: int, axis: int) -> _RollingBuffer:
        """The layer's buffer (a new one for a layer not seen yet), after checking that the chunk fits the stream."""
        if self._staged_frames not in (None, num_frames):
            raise ValueError("every layer of one forward must see the same chunk")
        self._staged_frames = num_frames
        buffer = self._entries.setdefault(layer, _RollingBuffer(axis))
        if buffer.axis != axis:
            raise ValueError("a layer's attention mode (its cache layout) must not change within a stream")
        if buffer.batch_size not in (None, key.shape[0]):
            raise ValueError(
                f"the streamed batch changed from {buffer.batch_size} to {key.shape[0]} (with classifier-free "
                "guidance, stream the conditional and unconditional halves as one batch throughout)"
            )
        return buffer

    def keys_values(
        self, layer: object, key: torch.Tensor, value: torch.Tensor, num_frames: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's cached (k, v) followed by the current chunk's, (B, heads, tokens, D) each."""
        buffer = self._buffer(layer, key, num_frames, axis=-2)
        for slot, chunk in zip(buffer.make_room(key, (key.shape, value.shape), key.shape[-2]), (key, value)):
            slot.copy_(chunk)
        keys, values = buffer.held()
        return keys, values

    def window_tiles(
        self, layer: object, key: torch.Tensor, value: torch.Tensor, grid: Sequence[int], spatial: Sequence[Part]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The layer's cached keys and values followed by the current chunk's, (B, heads, tokens, D) each over the
        chunk's (Tq, H, W) `grid`, cut into the `spatial` windows: per region (`window_tiles`), (keys, values) of
        (B, heads, windows, frames, window tokens, D). The cache keeps them in this layout, so attention reads views
        of it and only the chunk's own frames are copied."""
        chunk = [*window_tiles(key, grid, spatial), *window_tiles(value, grid, spatial)]
        shapes = [_tiles_shape(windows) for windows in chunk]
        buffer = self._buffer(layer, key, grid[0], axis=-3)
        for slot, windows in zip(buffer.make_room(key, shapes, grid[0]), chunk):
            slot.unflatten(2, windows.shape[2:4]).unflatten(-2, windows.shape[-3:-1]).copy_(windows)
        held = buffer.held()
        regions = len(held) // 2
        return list(zip(held[:regions], held[regions:]))

    def advance(self) -> None:
        """Commit the chunks just computed and drop the frames of chunks older than `cache_chunks`."""
        if self._staged_frames is None:
            raise ValueError("`advance` needs a forward of the chunk first")
        chunks = self._query_chunks or [self.next_chunk] * self._staged_frames
        frame_chunks = [*self.frame_chunks, *chunks]
        keep = [c > chunks[-1] - self.cache_chunks for c in frame_chunks] if self.cache_chunks else []
        kept_frames = sum(keep)
        for buffer in self._entries.values():  # entries (tokens or frames) per frame, times the frames kept
            buffer.keep_last((buffer.end - buffer.start) // len(frame_chunks) * kept_frames)
        self.frame_chunks = frame_chunks[len(frame_chunks) - kept_frames :]
        self.frames_seen += len(chunks)
        self.next_chunk = chunks[-1] + 1
        self._staged_frames, self._query_chunks = None, None
