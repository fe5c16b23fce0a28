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

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from einops import rearrange

from cascade_vsr.models.attention import adaptive_window_size, select_units, tile_attention
from cascade_vsr.models.attention_spec import AttentionSpec
from cascade_vsr.models.token_layout import (
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


def causal_window_attention(q, k, v, query_grid, key_frames, visibility, window, shift):
    """2D spatial windows of (wh, ww) tokens (shifted by half a window when `shift`), each over all visible frames:
    one masked SDPA call per region of equally shaped windows (at most 9)."""
    frames, height, width = query_grid
    key_grid = (key_frames, height, width)
    spatial = [partition_axis(height, window[0], shift), partition_axis(width, window[1], shift)]
    q_parts, k_parts = [partition_axis(frames, frames), *spatial], [partition_axis(key_frames, key_frames), *spatial]
    q_tokens, k_tokens, v_tokens = q.unflatten(-2, query_grid), k.unflatten(-2, key_grid), v.unflatten(-2, key_grid)
    out = torch.empty_like(q_tokens)
    for q_runs, k_runs in zip(window_regions(query_grid, q_parts), window_regions(key_grid, k_parts), strict=True):
        qw = region_windows(q_tokens, q_runs)  # (B, heads, 1, ny, nx, Tq, ly, lx, D)
        kw, vw = region_windows(k_tokens, k_runs), region_windows(v_tokens, k_runs)
        window_tokens = qw.shape[-3] * qw.shape[-2]
        tiles = [rearrange(x, "b h 1 ny nx t y x d -> b h (ny nx) (t y x) d") for x in (qw, kw, vw)]
        mask = _frame_mask(visibility, window_tokens, window_tokens, q.device)
        region_windows(out, q_runs).copy_(tile_attention(*tiles, mask).view(qw.shape))
    return out.flatten(-4, -2)


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
) -> torch.Tensor:
    """Block-causal self-attention of one layer: q (B, heads, Tq*H*W, D) of the `query_grid`, k / v
    (B, heads, key_frames*H*W, D) whose last Tq frames are the queries' own, `visibility` (Tq, key_frames) bool on
    the host (`chunk_visibility`). The layer's `spec` gives the mode and its spatial window."""
    query_grid = tuple(int(g) for g in query_grid)
    frames, height, width = query_grid
    if visibility.shape != (frames, key_frames) or key_frames < frames:
        raise ValueError(
            f"`visibility` must have shape (Tq, Tk) = ({frames}, {key_frames}) with Tk >= Tq, got "
            f"{tuple(visibility.shape)}"
        )
    if k.shape[-2] != key_frames * height * width or k.shape != v.shape:
        raise ValueError(f"`k` and `v` must hold {key_frames} frames of {height}x{width} tokens, got {tuple(k.shape)}")
    if spec.mode == "full":
        return causal_full_attention(q, k, v, query_grid, visibility)
    if spec.mode == "sparse_topk":
        return causal_sparse_topk_attention(q, k, v, query_grid, key_frames, visibility, spec.window, spec.topk)
    window = spec.window
    if window is None:
        window = adaptive_window_size(query_grid, spec.window_reference, spec.num_windows, spec.max_frames)
    return causal_window_attention(q, k, v, query_grid, key_frames, visibility, window[-2:], spec.shift)


@dataclass(frozen=True)
class CausalContext:
    """What a layer's self-attention needs to be block-causal: the (Tq, Tk) frame `visibility` (host), the key
    frame count, and the streaming cache (None offline: the keys are the queries' own frames)."""

    visibility: torch.Tensor
    key_frames: int
    cache: CausalKVCache | None = None


class _KeyValueBuffer:
    """One layer's cached keys and values, (B, heads, tokens, D) each, kept in a buffer of twice the tokens that a
    forward needs: a chunk is written after the cached frames and the keys are a view of the buffer, so each token is
    copied once on arrival and once more per compaction (when the buffer's end is reached), instead of once per chunk
    it stays in the cache, as concatenating the cache and the chunk at every chunk would."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        self.keys, self.values = key, value
        self.start, self.end = 0, key.shape[-2]

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept (k, v) followed by the chunk's, as views of the buffer (valid until the next append)."""
        kept, new = self.end - self.start, key.shape[-2]
        capacity = self.keys.shape[-2]
        if self.end + new > capacity and self.start >= kept and kept + new <= capacity:  # compact, no overlap
            self.keys[..., :kept, :] = self.keys[..., self.start : self.end, :]
            self.values[..., :kept, :] = self.values[..., self.start : self.end, :]
            self.start, self.end = 0, kept
        elif self.end + new > capacity:
            capacity = 2 * (kept + new)
            keys = key.new_empty(*key.shape[:-2], capacity, key.shape[-1])
            values = value.new_empty(*value.shape[:-2], capacity, value.shape[-1])
            keys[..., :kept, :] = self.keys[..., self.start : self.end, :]
            values[..., :kept, :] = self.values[..., self.start : self.end, :]
            self.keys, self.values, self.start, self.end = keys, values, 0, kept
        self.keys[..., self.end : self.end + new, :] = key
        self.values[..., self.end : self.end + new, :] = value
        self.end += new
        return self.keys[..., self.start : self.end, :], self.values[..., self.start : self.end, :]

    def keep_last(self, tokens: int) -> None:
        self.start = max(self.start, self.end - tokens)


@dataclass
class CausalKVCache:
    """Rolling keys and values of every self-attention layer over the last `cache_chunks` chunks, for streaming a
    block-causal model chunk by chunk (`CascadeVSRTransformer3DModel(..., kv_cache=cache)`).

    A forward on chunk c reads each layer's cached (k, v) followed by the chunk's own; `advance` then keeps the
    chunk and drops what is older than `cache_chunks` chunks, so the cache never holds more. Keys are stored after
    RoPE at their absolute frame positions (`frames_seen` is the next chunk's first position): attention scores
    only depend on position differences, so the rolled cache stays consistent. Streaming is inference: the cached
    tensors are written in place, so the model refuses a streamed forward with gradients enabled."""

    cache_chunks: int
    next_chunk: int = 0
    frames_seen: int = 0
    frame_chunks: list[int] = field(default_factory=list)  # chunk of each cached frame
    guidance: torch.Tensor | None = None  # the first chunk's pooled key frames (visual guidance), kept for all
    _entries: dict = field(default_factory=dict)  # layer -> _KeyValueBuffer
    _staged_frames: int | None = None

    def __post_init__(self):
        if isinstance(self.cache_chunks, bool) or not isinstance(self.cache_chunks, int) or self.cache_chunks < 0:
            raise ValueError(f"`cache_chunks` must be an int >= 0, got {self.cache_chunks!r}")

    @property
    def num_chunks(self) -> int:
        """Chunks held now."""
        return len(set(self.frame_chunks))

    def visibility(self, num_frames: int) -> tuple[torch.Tensor, int]:
        """(visibility, key frames) of the next chunk of `num_frames` frames: the cached frames, then its own."""
        keys = torch.tensor([*self.frame_chunks, *[self.next_chunk] * num_frames], dtype=torch.long)
        queries = torch.full((num_frames,), self.next_chunk, dtype=torch.long)
        return chunk_visibility(queries, keys, self.cache_chunks), len(keys)

    def keys_values(self, layer: object, key: torch.Tensor, value: torch.Tensor, num_frames: int):
        """The layer's cached (k, v) followed by the current chunk's."""
        if self._staged_frames not in (None, num_frames):
            raise ValueError("every layer of one forward must see the same chunk")
        self._staged_frames = num_frames
        if layer not in self._entries:
            self._entries[layer] = _KeyValueBuffer(key, value)
            return key, value
        entry = self._entries[layer]
        if entry.keys.shape[0] != key.shape[0]:
            raise ValueError(
                f"the streamed batch changed from {entry.keys.shape[0]} to {key.shape[0]} (with classifier-free "
                "guidance, stream the conditional and unconditional halves as one batch throughout)"
            )
        return entry.append(key, value)

    def advance(self) -> None:
        """Commit the chunk just computed and drop the frames of chunks older than `cache_chunks`."""
        if self._staged_frames is None:
            raise ValueError("`advance` needs a forward of the chunk first")
        num_frames = self._staged_frames
        frame_chunks = [*self.frame_chunks, *[self.next_chunk] * num_frames]
        keep = [c >= self.next_chunk - self.cache_chunks + 1 for c in frame_chunks] if self.cache_chunks else []
        kept_frames = sum(keep)
        for entry in self._entries.values():
            entry.keep_last((entry.end - entry.start) // len(frame_chunks) * kept_frames)
        self.frame_chunks = frame_chunks[len(frame_chunks) - kept_frames :]
        self.frames_seen += num_frames
        self.next_chunk += 1
        self._staged_frames = None
