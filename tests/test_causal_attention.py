"""Block-causal attention (InfVSR): every mode against a dense masked softmax built token by token, and the
streamed transformer (rolling KV cache) against its offline block-causal form."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from cascade_vsr import CascadeVSRTransformer3DModel
from cascade_vsr.models.attention_spec import AttentionSpec
from cascade_vsr.models.causal_attention import (
    CausalKVCache,
    causal_self_attention,
    chunk_ids,
    chunk_visibility,
)

from .conftest import randomize_


def test_chunk_visibility_is_the_chunk_and_the_previous_m():
    chunks = chunk_ids(5, 2)
    assert chunks.tolist() == [0, 0, 1, 1, 2]
    visible = chunk_visibility(chunks, chunks, 1)
    expected = [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert visible.int().tolist() == expected
    assert chunk_visibility(chunks, chunks, 0).int().tolist()[4] == [0, 0, 0, 0, 1]
    assert chunk_ids(3, 2, first_chunk=4).tolist() == [4, 4, 5]


def _axis_window(index: int, size: int, window: int, shift: bool) -> int:
    """Window of an index along an axis, by hand: shifted partitions start half a window early."""
    window = min(window, size)
    offset = window // 2 if shift and window < size else 0
    return (index + (window - offset) % window) // window


def _dense_reference(q, k, v, grid, key_frames, visibility, spec):
    """Softmax over an explicit (B, heads, Nq, Nk) mask, decided token by token."""
    frames, height, width = grid
    batch, heads, _, dim = q.shape
    first_query_frame = key_frames - frames
    queries = list(itertools.product(range(frames), range(height), range(width)))
    keys = list(itertools.product(range(key_frames), range(height), range(width)))
    mask = torch.zeros(batch, heads, len(queries), len(keys), dtype=torch.bool)
    if spec.mode in ("full", "window"):
        wh, ww = (height, width) if spec.mode == "full" else spec.window[-2:]
        for (i, (t, y, x)), (j, (s, yy, xx)) in itertools.product(enumerate(queries), enumerate(keys)):
            same_window = _axis_window(y, height, wh, spec.shift) == _axis_window(yy, height, wh, spec.shift)
            same_window &= _axis_window(x, width, ww, spec.shift) == _axis_window(xx, width, ww, spec.shift)
            mask[:, :, i, j] = bool(visibility[t, s]) and same_window
    else:  # sparse_topk: units of (wh, ww) tokens per frame; own unit + top-k by mean q . mean k among visible ones
        wh, ww = spec.window

        def unit(t, y, x):
            return t, y // wh, x // ww

        q_units = sorted({unit(*p) for p in queries})
        k_units = sorted({unit(*p) for p in keys})
        members_q = {u: [i for i, p in enumerate(queries) if unit(*p) == u] for u in q_units}
        members_k = {u: [j for j, p in enumerate(keys) if unit(*p) == u] for u in k_units}
        for b, h, qu in itertools.product(range(batch), range(heads), q_units):
            q_mean = q[b, h, members_q[qu]].mean(0)
            own = (qu[0] + first_query_frame, qu[1], qu[2])
            ranked = []
            for index, ku in enumerate(k_units):
                if ku != own and visibility[qu[0], ku[0]]:
                    score = float(q_mean @ k[b, h, members_k[ku]].mean(0)) / math.sqrt(dim)
                    ranked.append((-score, index, ku))
            chosen = [own] + [ku for _, _, ku in sorted(ranked)[: spec.topk]]
            for i in members_q[qu]:
                for ku in chosen:
                    mask[b, h, i, members_k[ku]] = True
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(dim)
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


SPECS = [
    AttentionSpec(),
    AttentionSpec(mode="window", window=(4, 2, 3)),
    AttentionSpec(mode="window", window=(4, 2, 3), shift=True),
    AttentionSpec(mode="sparse_topk", window=(2, 2), topk=1),
    AttentionSpec(mode="sparse_topk", window=(3, 2), topk=2),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label + ("-shift" if s.shift else ""))
@pytest.mark.parametrize("streamed", [False, True], ids=["offline", "streamed"])
def test_causal_modes_match_a_dense_reference(spec, streamed):
    generator = torch.Generator().manual_seed(0)
    frames, height, width = (2, 3, 5) if streamed else (5, 3, 5)
    key_frames = 4 if streamed else frames  # streamed: 2 cached frames (one chunk of 2), then the chunk's own
    if streamed:
        visibility = chunk_visibility(torch.full((frames,), 1), torch.tensor([0, 0, 1, 1]), 1)
    else:
        chunks = chunk_ids(frames, 2)
        visibility = chunk_visibility(chunks, chunks, 1)
    q = torch.randn(2, 2, frames * height * width, 8, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(2, 2, key_frames * height * width, 8, generator=generator, dtype=torch.float64) for _ in "kv")
    out = causal_self_attention(q, k, v, (frames, height, width), key_frames, visibility, spec)
    reference = _dense_reference(q, k, v, (frames, height, width), key_frames, visibility, spec)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-12)


def _tiny_causal(mode: str, chunk: int, cache: int) -> CascadeVSRTransformer3DModel:
    torch.manual_seed(0)
    options = {"window": dict(window_size=(4, 3, 3)), "sparse_topk": dict(sparse_window=(2, 3), sparse_topk=1)}
    model = CascadeVSRTransformer3DModel(
        latent_channels=4,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=12,
        ffn_dim=32,
        text_dim=16,
        patch_size=(1, 1, 1),
        attention_mode=mode,
        causal_chunk_frames=chunk,
        causal_cache_chunks=cache,
        **options.get(mode, {}),
    )
    return randomize_(model).eval()


def _inputs(frames: int = 6):
    generator = torch.Generator().manual_seed(1)
    x, condition = (torch.randn(2, 4, frames, 5, 7, generator=generator) for _ in range(2))
    text = torch.randn(2, 3, 16, generator=generator)
    return x, condition, torch.tensor([500.0, 300.0]), torch.tensor([0.1, 0.2]), text


@pytest.mark.parametrize("mode", ["full", "window", "sparse_topk"])
@pytest.mark.parametrize("chunk, cache", [(2, 1), (1, 2), (3, 1), (2, 0), (4, 1)])
@torch.no_grad()
def test_streamed_transformer_equals_its_offline_block_causal_form(mode, chunk, cache):
    model = _tiny_causal(mode, chunk, cache)
    x, condition, t, s, text = _inputs()
    offline = model(x, condition, t, s, text, return_dict=False)[0]
    kv_cache = CausalKVCache(cache)
    streamed = []
    for start in range(0, x.shape[2], chunk):  # the last chunk may be shorter
        part = slice(start, start + chunk)
        streamed.append(model(x[:, :, part], condition[:, :, part], t, s, text, kv_cache=kv_cache)[0])
        assert kv_cache.num_chunks <= cache and len(kv_cache.frame_chunks) <= cache * chunk
    assert kv_cache.frames_seen == x.shape[2]
    torch.testing.assert_close(torch.cat(streamed, dim=2), offline, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["full", "window", "sparse_topk"])
@torch.no_grad()
def test_a_chunk_never_sees_a_later_frame(mode):
    model = _tiny_causal(mode, chunk=2, cache=2)
    x, condition, t, s, text = _inputs()
    before = model(x, condition, t, s, text)[0]
    for frame in (5, 3):
        changed_x, changed_condition = x.clone(), condition.clone()
        changed_x[:, :, frame] += 1
        changed_condition[:, :, frame] -= 1
        after = model(changed_x, changed_condition, t, s, text)[0]
        earlier = frame // 2 * 2  # the frames of the chunks before the changed frame's
        assert torch.equal(after[:, :, :earlier], before[:, :, :earlier])
        assert not torch.equal(after[:, :, earlier:], before[:, :, earlier:])


def test_offline_block_causal_form_trains():
    model = _tiny_causal("sparse_topk", chunk=2, cache=1).train()
    x, condition, t, s, text = _inputs(4)
    model(x, condition, t, s, text)[0].square().mean().backward()
    grads = [p.grad for p in model.blocks[0].attn1.to_k.parameters()]
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_causal_config_and_cache_checks():
    with pytest.raises(ValueError, match="`causal_chunk_frames`"):
        CascadeVSRTransformer3DModel(num_layers=1, causal_chunk_frames=0)
    with pytest.raises(ValueError, match="temporal patch of 1"):
        CascadeVSRTransformer3DModel(num_layers=1, causal_chunk_frames=2, patch_size=(2, 2, 2))
    with pytest.raises(ValueError, match="temporal_unit"):
        CascadeVSRTransformer3DModel(num_layers=1, causal_chunk_frames=2, temporal_unit=5)
    with pytest.raises(ValueError, match="`cache_chunks`"):
        CausalKVCache(-1)
    model = _tiny_causal("full", chunk=2, cache=1)
    x, condition, t, s, text = _inputs()
    with pytest.raises(ValueError, match="at most causal_chunk_frames=2"):
        model(x, condition, t, s, text, kv_cache=CausalKVCache(1))
    with pytest.raises(ValueError, match=r"CausalKVCache\(1\)"):
        model(x[:, :, :2], condition[:, :, :2], t, s, text, kv_cache=CausalKVCache(3))
    plain = CascadeVSRTransformer3DModel(
        latent_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=12, ffn_dim=32, text_dim=16
    )
    with pytest.raises(ValueError, match="no `causal_chunk_frames`"):
        plain(x[:, :, :2], condition[:, :, :2], t, s, text, kv_cache=CausalKVCache(1))
