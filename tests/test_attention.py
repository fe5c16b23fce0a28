"""Attention modes against a naive dense reference with explicit (N x N) boolean masks.

The masks here are built token by token from coordinates, independently of the batched layouts of
cascade_vsr/models/token_layout.py that cascade_vsr/models/attention.py runs on.
"""

import itertools

import pytest
import torch

from cascade_vsr.models.attention import (
    adaptive_window_size,
    full_attention,
    select_units,
    self_attention,
    sparse_topk_attention,
    window_attention,
)
from cascade_vsr.models.attention_spec import AttentionSpec, layer_attention_specs
from cascade_vsr.models.token_layout import (
    partition_axis,
    sparse_unit_layout,
    temporal_block_ids,
    temporal_block_sizes,
    window_lengths,
    window_token_mask,
)

# ---------------------------------------------------------------------------------------------------------------
# Independent reference
# ---------------------------------------------------------------------------------------------------------------


def dense_reference(q, k, v, mask):
    """Softmax attention with an explicit mask (B|1, heads|1, N, N) of allowed (query, key) pairs."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def coords(grid):
    """(t, y, x) of every token in row-major order."""
    return list(itertools.product(*(range(g) for g in grid)))


def window_index(c, size, w, shift):
    """Window of coordinate c on an axis: windows clamp to the axis; shifted boundaries sit at w//2 + n*w."""
    w = min(w, size)
    offset = w // 2 if (shift and w < size) else 0
    return (c - offset) // w  # Python floor division: the leading partial window is -1


def block_of_frame(t, num_frames, unit, shift):
    if unit is None or unit >= num_frames:
        return 0
    return window_index(t, num_frames, unit, shift)


def window_mask(grid, window, shift):
    tokens = coords(grid)
    ids = [tuple(window_index(c, s, w, shift) for c, s, w in zip(tok, grid, window)) for tok in tokens]
    return torch.tensor([[a == b for b in ids] for a in ids])


def temporal_mask(grid, unit, shift):
    tokens = coords(grid)
    ids = [block_of_frame(tok[0], grid[0], unit, shift) for tok in tokens]
    return torch.tensor([[a == b for b in ids] for a in ids])


def brute_force_selection(q, k, grid, window, topk, unit=None, shift=False):
    """Per (b, head): list over units of the selected unit set, plus the unit id of every token."""
    tokens = coords(grid)
    wh, ww = min(window[0], grid[1]), min(window[1], grid[2])
    unit_keys = sorted({(t, y // wh, x // ww) for t, y, x in tokens})
    unit_of = [unit_keys.index((t, y // wh, x // ww)) for t, y, x in tokens]
    batch, heads, _, dim = q.shape
    selections = {}
    for b, h in itertools.product(range(batch), range(heads)):
        q_mean = [q[b, h, [i for i, u in enumerate(unit_of) if u == n]].mean(0) for n in range(len(unit_keys))]
        k_mean = [k[b, h, [i for i, u in enumerate(unit_of) if u == n]].mean(0) for n in range(len(unit_keys))]
        chosen = []
        for n, key in enumerate(unit_keys):
            block = block_of_frame(key[0], grid[0], unit, shift)
            others = [
                m
                for m, other in enumerate(unit_keys)
                if m != n and block_of_frame(other[0], grid[0], unit, shift) == block
            ]
            others.sort(key=lambda m: (-float(q_mean[n] @ k_mean[m]) / dim**0.5, m))
            chosen.append({n, *others[:topk]})
        selections[b, h] = chosen
    return selections, unit_of


def sparse_mask(q, k, grid, window, topk, unit=None, shift=False):
    selections, unit_of = brute_force_selection(q, k, grid, window, topk, unit, shift)
    batch, heads, n, _ = q.shape
    mask = torch.zeros(batch, heads, n, n, dtype=torch.bool)
    for (b, h), chosen in selections.items():
        for i, j in itertools.product(range(n), range(n)):
            mask[b, h, i, j] = unit_of[j] in chosen[unit_of[i]]
    return mask


def qkv(grid, batch=2, heads=2, dim=8, seed=0, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1] * grid[2]
    return [torch.randn(batch, heads, n, dim, generator=g, dtype=dtype, requires_grad=requires_grad) for _ in "qkv"]


# ---------------------------------------------------------------------------------------------------------------
# sparse_topk
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("unit,shift", [(None, False), (2, False), (2, True), (3, True)])
def test_sparse_topk_with_all_units_is_full_attention_within_scope(unit, shift):
    grid = (5, 5, 7)  # ragged 2x3 units
    q, k, v = qkv(grid)
    out = sparse_topk_attention(q, k, v, grid, window=(2, 3), topk=1000, temporal_unit=unit, shift=shift)
    expected = dense_reference(q, k, v, temporal_mask(grid, unit, shift))
    torch.testing.assert_close(out, expected)
    if unit is None:
        torch.testing.assert_close(out, full_attention(q, k, v))


@pytest.mark.parametrize("grid", [(2, 4, 6), (3, 5, 7)])
def test_sparse_topk_zero_is_local_window_attention(grid):
    q, k, v = qkv(grid)
    out = sparse_topk_attention(q, k, v, grid, window=(2, 3), topk=0)
    torch.testing.assert_close(out, dense_reference(q, k, v, window_mask(grid, (1, 2, 3), False)))
    torch.testing.assert_close(out, window_attention(q, k, v, grid, (1, 2, 3)))


@pytest.mark.parametrize(
    "grid,window,topk,unit,shift",
    [
        ((3, 5, 7), (2, 3), 1, None, False),
        ((3, 5, 7), (2, 3), 2, None, False),
        ((4, 4, 6), (3, 4), 1, 2, False),
        ((5, 3, 5), (2, 2), 3, 2, True),
        ((1, 5, 9), (12, 9), 1, None, False),  # window larger than the frame: one unit per frame
    ],
)
def test_sparse_topk_matches_brute_force_selection(grid, window, topk, unit, shift):
    q, k, v = qkv(grid, seed=1)
    out = sparse_topk_attention(q, k, v, grid, window=window, topk=topk, temporal_unit=unit, shift=shift)
    mask = sparse_mask(q, k, grid, window, topk, unit, shift)
    torch.testing.assert_close(out, dense_reference(q, k, v, mask))


def test_select_units_breaks_ties_towards_lower_index():
    candidates = ~torch.eye(5, dtype=torch.bool)
    candidates[0, 1] = False
    means = torch.ones(1, 1, 5, 4)  # every score ties
    chosen, ok = select_units(means, means, candidates, topk=2)
    assert chosen[0, 0].tolist() == [[2, 3], [0, 2], [0, 1], [0, 1], [0, 1]]
    assert ok.all()


def test_sparse_topk_padding_is_never_attended_nor_selected():
    """Values at padded positions do not exist; changing the real tokens of one unit changes only what
    selects it, and results stay finite at a grid with 1-token edge units."""
    grid = (2, 3, 4)
    q, k, v = qkv(grid, seed=2)
    out = sparse_topk_attention(q, k, v, grid, window=(2, 3), topk=1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, dense_reference(q, k, v, sparse_mask(q, k, grid, (2, 3), 1)))


def test_sparse_topk_gradients_match_dense_masked_reference():
    grid = (3, 5, 7)
    q, k, v = qkv(grid, seed=3, requires_grad=True)
    weight = torch.randn(q.shape, dtype=q.dtype)
    out = sparse_topk_attention(q, k, v, grid, window=(2, 3), topk=2, temporal_unit=2, shift=True)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    mask = sparse_mask(q.detach(), k.detach(), grid, (2, 3), 2, 2, True)
    ref_grads = torch.autograd.grad((dense_reference(q, k, v, mask) * weight).sum(), (q, k, v))
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref)


# ---------------------------------------------------------------------------------------------------------------
# temporal units
# ---------------------------------------------------------------------------------------------------------------


def test_temporal_block_ids_shift_without_wrap_around():
    assert temporal_block_ids(7, 3).tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert temporal_block_ids(7, 3, shift=True).tolist() == [0, 1, 1, 1, 2, 2, 2]
    assert temporal_block_ids(20, 5, shift=True).tolist() == [0] * 2 + [1] * 5 + [2] * 5 + [3] * 5 + [4] * 3
    assert temporal_block_ids(4, 5, shift=True).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("mode", ["full", "sparse_topk"])
@pytest.mark.parametrize("shift", [False, True])
def test_temporal_unit_at_least_t_is_no_temporal_unit(mode, shift):
    grid = (3, 4, 5)
    q, k, v = qkv(grid)
    options = dict(window=(2, 3), topk=1) if mode == "sparse_topk" else {}
    base = self_attention(q, k, v, grid, AttentionSpec(mode, shift, **options))
    for unit in (3, 4):
        spec = AttentionSpec(mode, shift, temporal_unit=unit, **options)
        torch.testing.assert_close(self_attention(q, k, v, grid, spec), base)


@pytest.mark.parametrize("mode", ["full", "sparse_topk"])
@pytest.mark.parametrize("unit", [2, 3, 4])
def test_shifted_temporal_units_never_connect_first_and_last_frame(mode, unit):
    grid = (6, 3, 4)
    q, k, v = qkv(grid)
    options = dict(window=(2, 2), topk=100) if mode == "sparse_topk" else {}
    frame = grid[1] * grid[2]
    spec = AttentionSpec(mode, True, temporal_unit=unit, **options)
    out = self_attention(q, k, v, grid, spec)
    k2, v2 = k.clone(), v.clone()
    k2[..., -frame:, :] += 5.0
    v2[..., -frame:, :] += 5.0
    changed = self_attention(q, k2, v2, grid, spec)
    torch.testing.assert_close(changed[..., :frame, :], out[..., :frame, :], rtol=0, atol=0)
    expected = dense_reference(q, k, v, temporal_mask(grid, unit, True))
    if mode == "full":
        torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------------------------------------------------------
# window attention
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "grid,window",
    [
        ((2, 4, 6), (1, 2, 3)),  # divides
        ((4, 6, 6), (2, 3, 3)),  # divides
        ((3, 5, 7), (2, 2, 3)),  # ragged on every axis
        ((1, 5, 7), (4, 9, 3)),  # larger than the grid on t and h
    ],
)
@pytest.mark.parametrize("shift", [False, True])
def test_window_attention_matches_dense_reference(grid, window, shift):
    q, k, v = qkv(grid, seed=4, requires_grad=True)
    out = window_attention(q, k, v, grid, window, shift)
    expected = dense_reference(q, k, v, window_mask(grid, window, shift))
    torch.testing.assert_close(out, expected)
    weight = torch.randn(q.shape, dtype=q.dtype)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((expected * weight).sum(), (q, k, v))
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref)


@pytest.mark.parametrize("size, window", [(48, 12), (80, 12), (7, 3), (5, 9), (1, 4), (13, 2)])
@pytest.mark.parametrize("shift", [False, True])
def test_window_lengths_count_the_tokens_of_each_window(size, window, shift):
    """Reference: label every token with its window, (index + front) // window, and count the labels."""
    part = partition_axis(size, window, shift)
    labels = (torch.arange(size) + part[1]) // part[0]
    assert window_lengths(size, part) == labels.bincount().tolist()
    assert len(window_lengths(size, part)) == part[2]


def test_adaptive_window_size_follows_seedvr2_equations():
    assert adaptive_window_size((5, 45, 80)) == (5, 15, 27)  # the training area: 3 x 3 windows
    # 1080p tokens: proxy 45.2 x 79.7 at the training area -> the same window size, more windows
    assert adaptive_window_size((5, 68, 120)) == (5, 16, 27)
    assert adaptive_window_size((40, 45, 80)) == (30, 15, 27)  # temporal cap
    assert adaptive_window_size((40, 45, 80), num_windows=(2, 3, 3), max_frames=20) == (10, 15, 27)
    assert adaptive_window_size((1, 80, 45)) == (1, 27, 15)  # portrait
    grid = (3, 9, 16)
    q, k, v = qkv(grid)
    out = self_attention(q, k, v, grid, AttentionSpec("window", True, window_reference=(9, 12)))
    window = adaptive_window_size(grid, (9, 12))
    torch.testing.assert_close(out, dense_reference(q, k, v, window_mask(grid, window, True)))


# ---------------------------------------------------------------------------------------------------------------
# Host-side layout numbers
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "grid,window,topk,unit,shift",
    [
        ((3, 5, 7), (2, 3), 1, None, False),  # ragged units
        ((4, 4, 6), (2, 3), 1, None, False),  # whole units, every unit has candidates
        ((5, 4, 6), (2, 3), 7, 2, False),  # whole units, more slots than the last block has candidates
        ((5, 4, 6), (4, 6), 1, 2, True),  # one unit per frame: the one-frame block has no candidate
        ((3, 4, 6), (4, 6), 0, None, False),  # topk 0: no slots to fill
        ((1, 4, 6), (4, 6), 3, None, False),  # a single unit
    ],
)
def test_sparse_unit_layout_numbers_match_the_tensors_they_describe(grid, window, topk, unit, shift):
    """Reference: count per unit, from token coordinates, the real tokens and the candidates (units of the same
    temporal block), as the attention would see them in its tensors."""
    layout = sparse_unit_layout(grid, window, topk, unit, shift)
    wh, ww = min(window[0], grid[1]), min(window[1], grid[2])
    units = sorted({(t, y // wh, x // ww) for t, y, x in coords(grid)})
    candidates = [
        sum(block_of_frame(o[0], grid[0], unit, shift) == block_of_frame(u[0], grid[0], unit, shift) for o in units)
        - 1
        for u in units
    ]
    real_tokens = window_token_mask(grid, layout.parts).sum(-1)
    assert layout.num_units == len(units) and layout.unit_tokens == wh * ww
    assert layout.slots == 1 + min(topk, max(candidates))
    assert layout.padded == bool((real_tokens < wh * ww).any())
    assert layout.masked == (layout.padded or min(candidates) < layout.slots - 1)
    frames = temporal_block_ids(grid[0], unit, shift)
    assert temporal_block_sizes(grid[0], unit, shift) == frames.bincount().tolist()


# ---------------------------------------------------------------------------------------------------------------
# The per-layer spec
# ---------------------------------------------------------------------------------------------------------------


def test_attention_spec_fills_the_defaults_of_its_mode_only():
    assert AttentionSpec("sparse_topk") == AttentionSpec("sparse_topk", window=(12, 9), topk=1)
    window = AttentionSpec("window", window=[2, 3, 4])
    assert window.window == (2, 3, 4) and window.window_reference == (45, 80) and window.num_windows == (1, 3, 3)
    assert window.max_frames == 30 and window.topk is None and window.temporal_unit is None
    full = AttentionSpec()
    assert (full.mode, full.shift, full.backend, full.window, full.topk) == ("full", False, "sdpa", None, None)
    hash(AttentionSpec("sparse_topk", temporal_unit=5))  # frozen: a spec is a value


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="window", temporal_unit=5), r"unknown attention options for mode 'window': \['temporal_unit'\]"),
        (dict(mode="sparse_topk", window=(3, 4, 5)), "window"),
        (dict(mode="window", window=(3, 4)), "window"),
        (dict(mode="sparse_topk", topk=-1), "topk"),
        (dict(mode="window", max_frames=0), "max_frames"),
        (dict(mode="window", num_windows=(1, 3)), "num_windows"),
        (dict(mode="full", shift=1), "shift"),
        (dict(mode="window", backend="flash"), r"'flash' cannot run mode 'window', which accepts 'sdpa', 'flex'"),
        (dict(mode="full", temporal_unit=2, backend="native"), "mode 'full' with temporal_unit=2"),
        (dict(mode="full", backend="nope"), r"'nope' cannot run mode 'full', which accepts 'sdpa', 'flash'"),
    ],
)
def test_attention_spec_refuses_what_its_mode_cannot_use(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionSpec(**kwargs)


def test_spec_backends_per_mode():
    assert AttentionSpec("window").accepted_backends == ("sdpa", "flex")
    assert AttentionSpec("full", temporal_unit=3).accepted_backends == ("sdpa", "flex")
    full = AttentionSpec("full").accepted_backends
    assert full[0] == "sdpa" and {"native", "flash", "sage", "flex"} <= set(full)
    assert AttentionSpec("sparse_topk").with_backend("flex").backend == "flex"
    with pytest.raises(ValueError, match="mode 'sparse_topk'"):
        AttentionSpec("sparse_topk").with_backend("native")


def test_layer_attention_specs_shift_odd_layers_and_scope_only_full_and_sparse_layers():
    specs = layer_attention_specs(["full", "sparse_topk", "window", "full"], 4, temporal_unit=5, window_size=(1, 2, 2))
    assert [spec.shift for spec in specs] == [False, True, False, True]
    assert [spec.temporal_unit for spec in specs] == [5, 5, None, 5]
    assert specs[2] == AttentionSpec("window", window=(1, 2, 2))
    assert layer_attention_specs("window", 2)[1] == AttentionSpec("window", shift=True)
    with pytest.raises(ValueError, match="attention_mode.*list of 3"):
        layer_attention_specs(["full"], 3)
    with pytest.raises(ValueError, match=r"attention_mode\[1\]"):
        layer_attention_specs(["full", "swin"], 2)


def test_full_attention_on_a_diffusers_backend_matches_sdpa():
    grid = (2, 3, 4)
    q, k, v = qkv(grid, dtype=torch.float32)
    native = self_attention(q, k, v, grid, AttentionSpec(backend="native"))
    torch.testing.assert_close(native, self_attention(q, k, v, grid), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(native, dense_reference(q, k, v, torch.ones(1, 1, 24, 24, dtype=torch.bool)))


# ---------------------------------------------------------------------------------------------------------------
# FlexAttention path (eager forward on CPU)
# ---------------------------------------------------------------------------------------------------------------


def test_flex_backend_agrees_with_sdpa_forward():
    grid = (3, 5, 7)
    q, k, v = qkv(grid, dtype=torch.float32)
    with torch.no_grad():
        for shift in (False, True):
            sdpa = sparse_topk_attention(q, k, v, grid, (2, 3), topk=1, temporal_unit=2, shift=shift)
            flex = sparse_topk_attention(q, k, v, grid, (2, 3), 1, 2, shift, backend="flex")
            torch.testing.assert_close(flex, sdpa, rtol=1e-4, atol=1e-5)
            sdpa = window_attention(q, k, v, grid, (2, 2, 3), shift)
            flex = window_attention(q, k, v, grid, (2, 2, 3), shift, backend="flex")
            torch.testing.assert_close(flex, sdpa, rtol=1e-4, atol=1e-5)
            spec = AttentionSpec("full", shift, temporal_unit=2)
            sdpa = self_attention(q, k, v, grid, spec)
            flex = self_attention(q, k, v, grid, spec.with_backend("flex"))
            torch.testing.assert_close(flex, sdpa, rtol=1e-4, atol=1e-5)


def test_flex_backend_refuses_backward_on_cpu():
    grid = (1, 4, 4)
    q, k, v = qkv(grid, dtype=torch.float32, requires_grad=True)
    with pytest.raises(ValueError, match="backend='sdpa'"):
        sparse_topk_attention(q, k, v, grid, (2, 2), backend="flex")


# ---------------------------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda q, k, v: sparse_topk_attention(q, k, v, (2, 3, 4), window=(0, 3)), "window"),
        (lambda q, k, v: sparse_topk_attention(q, k, v, (2, 3, 4), window=(3,)), "window"),
        (lambda q, k, v: sparse_topk_attention(q, k, v, (2, 3, 4), topk=-1), "topk"),
        (lambda q, k, v: sparse_topk_attention(q, k, v, (2, 3, 5)), "grid"),
        (lambda q, k, v: sparse_topk_attention(q, k, v, (2, 3, 4), temporal_unit=0), "temporal_unit"),
        (lambda q, k, v: sparse_topk_attention(q, k, v, (2, 3, 4), backend="xformers"), "backend"),
        (lambda q, k, v: window_attention(q, k, v, (2, 3, 4), window=(1, -2, 2)), "window"),
        (lambda q, k, v: window_attention(q, k, v, (4, 3, 3), window=(1, 2, 2)), "grid"),
        (lambda q, k, v: self_attention(q, k, v, (2, 3, 4), AttentionSpec("full", temporal_unit=-3)), "temporal_unit"),
        (lambda q, k, v: self_attention(q, k, v, (2, 3, 4), AttentionSpec("swin")), "mode"),
        (
            lambda q, k, v: self_attention(q, k, v, (2, 3, 4), AttentionSpec("full", topk=1)),
            "unknown attention options",
        ),
        (lambda q, k, v: self_attention(q, k, v, (2, 3, 5), AttentionSpec("window")), "grid"),
        (lambda q, k, v: self_attention(q, k, v, (2, 3, 4), "full"), "spec"),
        (lambda q, k, v: adaptive_window_size((2, 3, 4), reference=(0, 4)), "reference"),
        (lambda q, k, v: adaptive_window_size((2, 3, 4), max_frames=0), "max_frames"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(call, name):
    q, k, v = qkv((2, 3, 4), batch=1)
    with pytest.raises(ValueError, match=name):
        call(q, k, v)


def test_window_larger_than_grid_is_fine():
    grid = (2, 3, 4)
    q, k, v = qkv(grid)
    torch.testing.assert_close(window_attention(q, k, v, grid, (8, 8, 8), shift=True), full_attention(q, k, v))
    out = sparse_topk_attention(q, k, v, grid, window=(20, 20), topk=5)
    torch.testing.assert_close(out, full_attention(q, k, v))
