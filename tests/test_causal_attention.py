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
    run_groups,
    visible_runs,
)

from .conftest import randomize_, tiny_causal_stage, tiny_causal_transformer


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


def test_visible_runs_are_the_chunks_of_block_causal_visibility():
    chunks = chunk_ids(7, 2)
    runs = visible_runs(chunk_visibility(chunks, chunks, 1))
    assert runs == [(slice(0, 2), slice(0, 2)), (slice(2, 4), slice(0, 4)), (slice(4, 6), slice(2, 6)),
                    (slice(6, 7), slice(4, 7))]  # fmt: skip
    assert visible_runs(torch.tensor([[True, False, True], [False, True, True]])) is None  # a hole
    assert visible_runs(torch.tensor([[True, True], [False, False]])) is None  # a query frame that sees nothing
    # nine 1-frame chunks seeing 3 cached ones: the first three runs are shorter, the other six go in one call
    chunks = chunk_ids(9, 1)
    groups = run_groups(visible_runs(chunk_visibility(chunks, chunks, 3)))
    assert groups == [(0, 0, 1, 1, 1), (1, 0, 1, 2, 1), (2, 0, 1, 3, 1), (3, 0, 1, 4, 6)]
    chunks = chunk_ids(7, 2)  # the last chunk is shorter: its own group
    assert run_groups(visible_runs(chunk_visibility(chunks, chunks, 1))) == [
        (0, 0, 2, 2, 1),
        (2, 0, 2, 4, 2),
        (6, 4, 1, 3, 1),
    ]


@pytest.mark.parametrize("hole", [False, True], ids=["block-causal", "any visibility"])
@pytest.mark.parametrize("shift", [False, True])
def test_window_attention_gradients_match_a_dense_reference(hole, shift):
    """Training runs the offline form: the gradients of q, k and v through the per-chunk calls (or the masked call)
    equal those of the dense masked softmax."""
    generator = torch.Generator().manual_seed(3)
    grid = (4, 3, 5)
    chunks = chunk_ids(4, 2)
    visibility = chunk_visibility(chunks, chunks, 1)
    if hole:
        visibility[3, 1] = False
    spec = AttentionSpec(mode="window", window=(1, 2, 3), shift=shift)
    inputs = [torch.randn(1, 2, 4 * 15, 8, generator=generator, dtype=torch.float64) for _ in "qkv"]
    weights = torch.randn(1, 2, 4 * 15, 8, generator=generator, dtype=torch.float64)
    grads = []
    for attend in (causal_self_attention, _dense_reference):
        leaves = [x.clone().requires_grad_() for x in inputs]
        (attend(*leaves, grid, 4, visibility, spec) * weights).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)


def test_window_attention_under_any_visibility_matches_a_dense_reference():
    """A visibility that is no run of key frames per query frame takes the masked call."""
    generator = torch.Generator().manual_seed(2)
    grid, key_frames = (2, 3, 5), 3
    visibility = torch.tensor([[True, False, True], [False, True, True]])
    spec = AttentionSpec(mode="window", window=(1, 2, 3), shift=True)
    q = torch.randn(1, 2, 2 * 15, 8, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(1, 2, key_frames * 15, 8, generator=generator, dtype=torch.float64) for _ in "kv")
    out = causal_self_attention(q, k, v, grid, key_frames, visibility, spec)
    reference = _dense_reference(q, k, v, grid, key_frames, visibility, spec)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-12)


def _tiny_causal(mode: str, chunk: int, cache: int, **config) -> CascadeVSRTransformer3DModel:
    return tiny_causal_transformer(mode, chunk, cache, **config)


def _inputs(frames: int = 6):
    generator = torch.Generator().manual_seed(1)
    x, condition = (torch.randn(2, 4, frames, 5, 7, generator=generator) for _ in range(2))
    text = torch.randn(2, 3, 16, generator=generator)
    return x, condition, torch.tensor([500.0, 300.0]), torch.tensor([0.1, 0.2]), text


@pytest.mark.parametrize("mode", ["full", "window", "sparse_topk"])
@pytest.mark.parametrize(
    "chunk, cache, per_call", [(2, 1, 1), (1, 2, 1), (3, 1, 1), (2, 0, 1), (4, 1, 1), (1, 2, 2), (2, 1, 2), (1, 1, 4)]
)
@torch.no_grad()
def test_streamed_transformer_equals_its_offline_block_causal_form(mode, chunk, cache, per_call):
    """Chunk by chunk, or `per_call` chunks per forward (each attending to exactly its own cached and current keys)."""
    model = _tiny_causal(mode, chunk, cache)
    x, condition, t, s, text = _inputs()
    offline = model(x, condition, t, s, text, return_dict=False)[0]
    kv_cache = CausalKVCache(cache)
    streamed = []
    for start in range(0, x.shape[2], chunk * per_call):  # the last chunk may be shorter
        part = slice(start, start + chunk * per_call)
        streamed.append(model(x[:, :, part], condition[:, :, part], t, s, text, kv_cache=kv_cache)[0])
        assert kv_cache.num_chunks <= cache and len(kv_cache.frame_chunks) <= cache * chunk
    assert kv_cache.frames_seen == x.shape[2]
    torch.testing.assert_close(torch.cat(streamed, dim=2), offline, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["full", "window"])
@torch.no_grad()
def test_a_long_stream_rolls_its_cache_through_compactions(mode):
    """Eleven chunks of one frame through a cache of 2: the layers' buffers grow, then compact several times (window
    layers keep window tiles, the others tokens); the stream still equals the offline form and each layer holds
    exactly the cached frames."""
    model = _tiny_causal(mode, chunk=1, cache=2)
    x, condition, t, s, text = _inputs(11)
    offline = model(x, condition, t, s, text, return_dict=False)[0]
    kv_cache = CausalKVCache(2)
    streamed = []
    for frame in range(x.shape[2]):
        part = slice(frame, frame + 1)
        streamed.append(model(x[:, :, part], condition[:, :, part], t, s, text, kv_cache=kv_cache)[0])
        for buffer in kv_cache._entries.values():
            per_frame = 1 if buffer.axis == -3 else 5 * 7  # window tiles hold frames, the token layout tokens
            assert buffer.end - buffer.start == len(kv_cache.frame_chunks) * per_frame
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
    with torch.no_grad():  # a chunk shorter than the model's ends the stream
        kv_cache = CausalKVCache(1)
        model(x[:, :, :3], condition[:, :, :3], t, s, text, kv_cache=kv_cache)
        with pytest.raises(ValueError, match="no frame can follow it"):
            model(x[:, :, 3:5], condition[:, :, 3:5], t, s, text, kv_cache=kv_cache)
    with pytest.raises(ValueError, match=r"CausalKVCache\(1\)"):
        model(x[:, :, :2], condition[:, :, :2], t, s, text, kv_cache=CausalKVCache(3))
    with pytest.raises(ValueError, match=r"run the forward under torch.no_grad\(\)"):
        model(x[:, :, :2], condition[:, :, :2], t, s, text, kv_cache=CausalKVCache(1))
    plain = CascadeVSRTransformer3DModel(
        latent_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=12, ffn_dim=32, text_dim=16
    )
    with pytest.raises(ValueError, match="no `causal_chunk_frames`"):
        plain(x[:, :, :2], condition[:, :, :2], t, s, text, kv_cache=CausalKVCache(1))


# ---------------------------------------------------------------- the streaming pipeline


def _streaming_stage(chunk: int, cache: int, num_blocks: int = 1):
    """A tiny pixel-space block-causal stage, its layers alternating window and sparse_topk attention."""
    from cascade_vsr import SpaceToDepthAutoencoder

    modes = ["window", "sparse_topk"]
    return tiny_causal_stage(SpaceToDepthAutoencoder(), None, modes, chunk, cache, num_blocks)


def test_upsampler_temporal_radius_is_its_receptive_field():
    from cascade_vsr import LatentUpsampler3D

    upsampler = randomize_(LatentUpsampler3D(latent_channels=4, hidden_channels=8, num_blocks=2)).eval()
    x = torch.randn(1, 4, 17, 3, 3, generator=torch.Generator().manual_seed(0))
    changed = x.clone()
    changed[:, :, 8] += 1
    with torch.no_grad():
        delta = (upsampler(changed, (6, 6)).sample - upsampler(x, (6, 6)).sample).abs().amax(dim=(0, 1, 3, 4))
    reached = (delta > 0).nonzero().flatten()
    assert upsampler.temporal_radius == 7 and reached.min() == 8 - 7 and reached.max() == 8 + 7


@pytest.mark.parametrize(
    "num_blocks, pieces, space_to_depth",
    [(2, [1, 1, 5, 2, 8, 1], False), (1, [17], False), (0, [2, 3], False), (2, [1], False), (1, [4, 9, 4], True)],
)
def test_upsampler_stream_equals_whole_clip_call(num_blocks, pieces, space_to_depth):
    """Frames pushed in pieces of any length (a single frame, a clip shorter than the radius) come out as the
    whole-clip call computes them, each frame once, and no frame leaves before its `temporal_radius` later
    frames have arrived."""
    from cascade_vsr import LatentUpsampler3D

    channels, factor = (16, 2) if space_to_depth else (4, 1)
    upsampler = LatentUpsampler3D(
        latent_channels=channels, hidden_channels=8, num_blocks=num_blocks, space_to_depth_factor=factor
    )
    upsampler = randomize_(upsampler).eval()
    clip = torch.randn(2, channels, sum(pieces), 3, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = upsampler(clip, (6, 10)).sample
    stream, outputs, received = upsampler.stream((6, 10)), [], 0
    for piece in clip.split(pieces, dim=2):
        stream.push(piece)
        received += piece.shape[2]
        emitted = sum(frames.shape[2] for frames in outputs) + stream.available
        assert emitted == max(received - upsampler.temporal_radius, 0)
        if stream.available:
            outputs.append(stream.pop(2))
    stream.end()
    while stream.available:
        outputs.append(stream.pop(3))
    streamed = torch.cat(outputs, dim=2)
    assert streamed.shape == whole.shape
    torch.testing.assert_close(streamed, whole, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="after `end`"):
        stream.push(piece)


@pytest.mark.parametrize(
    "chunk, cache, steps, pieces, per_forward",
    [
        (2, 1, 1, [1, 3, 2, 3], 1),
        (3, 2, 2, [4, 5], 1),
        (1, 1, 2, [9], 1),
        (2, 1, 1, [1, 3, 2, 3], 2),
        (1, 2, 2, [9], 4),
        (2, 1, 1, [1, 3, 2, 3], "auto"),
    ],
)
@torch.no_grad()
def test_streamed_pipeline_equals_the_offline_block_causal_computation(chunk, cache, steps, pieces, per_forward):
    """Upsampler (streamed with per-layer frame caches), block-causal transformer (one cache per step) and the
    per-frame VAE: the stream of LR pieces of any lengths gives the frames of the whole-clip computation with the
    same noise."""
    from cascade_vsr.core.flow import noise_augment
    from cascade_vsr.pipelines.sampling import set_schedule

    pipe = _streaming_stage(chunk, cache)
    frames = sum(pieces)
    lr = torch.randn(1, 48, frames, 4, 5, generator=torch.Generator().manual_seed(3))
    text = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(4))
    kwargs = dict(
        scale=1.5, num_inference_steps=steps, noise_aug_strength=0.2, noise_frame_correlation=0.5,
        prompt_embeds=text, guidance_scale=2.0, chunks_per_forward=per_forward,
    )  # fmt: skip
    starts = torch.tensor([0, *pieces]).cumsum(0).tolist()
    lr_pieces = [lr[:, :, a:b] for a, b in zip(starts[:-1], starts[1:])]
    streamed = list(pipe.stream(lr_pieces, output_type="pt", generator=torch.Generator().manual_seed(7), **kwargs))
    if per_forward == "auto":  # as many chunks as fit 32768 tokens: here the whole clip in one forward
        per_forward = 32768 // pipe.sequence_length((chunk, 6, 8))
        assert per_forward * chunk >= frames
    piece = chunk * per_forward
    assert [c.shape[1] for c in streamed] == [min(piece, frames - s) for s in range(0, frames, piece)]
    streamed_latents = torch.cat(
        list(pipe.stream(lr_pieces, output_type="latent", generator=torch.Generator().manual_seed(7), **kwargs)), 2
    )

    # The offline reference: whole-clip upsampling, the stream's noise draws in their documented order, the
    # transformer's offline block-causal form at each step, one decode.
    size = (6, 8)  # 1.5 x (4, 5) latents, rounded up
    up = pipe.upsampler(lr, size).sample
    generator = torch.Generator().manual_seed(7)
    shared = torch.randn((1, 48, 1, *size), generator=generator)
    condition_noise, initial = [], []
    for start in range(0, frames, chunk):
        shape = (1, 48, min(chunk, frames - start), *size)
        condition_noise.append(torch.randn(shape, generator=generator))
        initial.append(0.5**0.5 * shared + 0.5**0.5 * torch.randn(shape, generator=generator))
    condition = noise_augment(up, 0.2, noise=torch.cat(condition_noise, 2))
    latents = torch.cat(initial, 2)
    set_schedule(pipe.scheduler, None, steps, 0, "cpu")  # the pipeline's default schedule (static shift)
    null = pipe.transformer.null_text_embeds(1, 3)
    for sigma, sigma_next in zip(pipe.scheduler.sigmas[:-1], pipe.scheduler.sigmas[1:]):
        velocity = pipe.transformer(
            torch.cat([latents] * 2), torch.cat([condition] * 2), (sigma * 1000).expand(2), torch.full((2,), 0.2),
            torch.cat([null, text]), torch.ones(2, 3, dtype=torch.long),
        ).sample  # fmt: skip
        uncond, cond = velocity.chunk(2)
        latents = latents + (sigma_next - sigma) * (uncond + 2.0 * (cond - uncond))
    torch.testing.assert_close(streamed_latents, latents, rtol=0, atol=1e-5)
    decoded = pipe.video_processor.postprocess_video(pipe.vae.decode(latents).sample[..., :24, :30], "pt")
    torch.testing.assert_close(torch.cat(streamed, 1), decoded, rtol=0, atol=1e-5)


def test_auto_chunks_per_forward_fills_the_token_budget():
    from cascade_vsr.pipelines.streaming import auto_chunks_per_forward

    # 320x192 on the demo model (48x80 tokens a frame), 960x540 (135x240), larger, tiny
    assert [auto_chunks_per_forward(n) for n in (3840, 32400, 129600, 1)] == [8, 1, 1, 32768]
    assert auto_chunks_per_forward(3840, token_budget=16384) == 4
    with pytest.raises(ValueError, match="`chunk_tokens` must be >= 1, got 0"):
        auto_chunks_per_forward(0)


@pytest.mark.parametrize("correlation, strength", [(0.5, 0.2), (1.0, 0.0), (0.0, 0.3), (1.0, 0.4)])
def test_streaming_noise_draws_in_order_and_skips_what_weighs_nothing(correlation, strength):
    """Per chunk: the condition's noise when its strength is above 0, then the chunk's own noise when the correlation
    is below 1, after the shared image (drawn once, first, when the correlation is above 0)."""
    from cascade_vsr.pipelines.streaming import StreamingNoise

    shape = (1, 3, 2, 4, 5)
    noise = StreamingNoise(correlation, strength, torch.Generator().manual_seed(5))
    draws = [noise.chunk(shape, torch.device("cpu")) for _ in range(3)]
    reference = torch.Generator().manual_seed(5)
    shared = torch.randn((1, 3, 1, 4, 5), generator=reference) if correlation > 0 else None
    for condition_noise, initial in draws:
        expected_condition = torch.randn(shape, generator=reference) if strength > 0 else None
        own = torch.randn(shape, generator=reference) if correlation < 1 else torch.zeros(shape)
        expected = own if shared is None else correlation**0.5 * shared + (1 - correlation) ** 0.5 * own
        assert (condition_noise is None) is (expected_condition is None)
        if expected_condition is not None:
            assert torch.equal(condition_noise, expected_condition)
        assert torch.equal(initial, expected)
    assert torch.equal(noise.generator.get_state(), reference.get_state())  # nothing else was drawn


def test_stream_refuses_what_it_cannot_stream():
    pipe = _streaming_stage(2, 1)
    for bad in (0, 1.5, True, "fast"):
        with pytest.raises(ValueError, match="`chunks_per_forward` must be an int >= 1 or 'auto'"):
            next(pipe.stream([torch.zeros(1, 48, 2, 4, 5)], chunks_per_forward=bad))
    lr = torch.zeros(1, 48, 2, 4, 5)
    with pytest.raises(ValueError, match="`output_type` of a stream"):
        next(pipe.stream([lr], scale=2, output_type="pil"))
    with pytest.raises(ValueError, match="first is not one"):
        next(pipe.stream([], scale=2))
    with pytest.raises(ValueError, match=r"`lr_latents\[1\]` must have the batch and size"):
        list(pipe.stream([lr, torch.zeros(1, 48, 2, 4, 6)], scale=2, num_inference_steps=1))
    pipe.transformer.register_to_config(causal_chunk_frames=None)
    with pytest.raises(ValueError, match="block-causal transformer"):
        next(pipe.stream([lr], scale=2))


@torch.no_grad()
def test_visual_guidance_is_the_first_chunks_key_frames_for_every_chunk():
    """Joint visual guidance: with no cached chunk (m = 0) a chunk still depends on the clip's first frames, through
    their pooled tokens in the cross-attention, the same offline and streamed; without it, it does not."""
    guided = _tiny_causal("window", chunk=2, cache=0, visual_guidance_frames=2, visual_guidance_grid=(2, 3))
    plain = _tiny_causal("window", chunk=2, cache=0)
    x, condition, t, s, text = _inputs()
    changed = condition.clone()
    changed[:, :, 0] += 1  # a key frame
    for model, depends in ((guided, True), (plain, False)):
        before, after = model(x, condition, t, s, text)[0], model(x, changed, t, s, text)[0]
        assert torch.equal(after[:, :, 2:], before[:, :, 2:]) is not depends
    offline = guided(x, condition, t, s, text)[0]
    kv_cache = CausalKVCache(0)
    streamed = [
        guided(x[:, :, i : i + 2], condition[:, :, i : i + 2], t, s, text, kv_cache=kv_cache)[0] for i in (0, 2, 4)
    ]
    assert kv_cache.guidance.shape == (2, 4, 2, 2, 3)
    torch.testing.assert_close(torch.cat(streamed, 2), offline, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="at most causal_chunk_frames=2"):
        _tiny_causal("full", chunk=2, cache=1, visual_guidance_frames=3)


def test_the_trainer_trains_the_offline_block_causal_form(pairs, tmp_path):
    """One step of the trainer on a block-causal configuration; the export streams (its config is causal)."""
    from cascade_vsr.training.config import load_config
    from cascade_vsr.training.trainer import train

    from ._recipes import tiny_args

    causal = ["--causal_chunk_frames", "1", "--causal_cache_chunks", "1", "--visual_guidance_frames", "1"]
    small = ["--crop_size", "2", "4", "--num_latent_frames", "2", "--train_batch_size", "2", "--use_ema", "false"]
    summary = train(*load_config(None, tiny_args(pairs, tmp_path / "run", 1, *small, *causal)))
    exported = CascadeVSRTransformer3DModel.from_pretrained(summary["export_dir"], subfolder="transformer")
    assert (exported.config.causal_chunk_frames, exported.config.causal_cache_chunks) == (1, 1)
    assert exported.visual_guidance_embedder is not None
    resumed = tiny_args(
        pairs, tmp_path / "next", 1, *small, *causal, "--pretrained_model_name_or_path", summary["export_dir"]
    )
    with pytest.raises(ValueError, match="`visual_guidance_frames` adds weights"):
        train(*load_config(None, resumed))
