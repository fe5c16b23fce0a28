"""Analytic matmul FLOPs of one CascadeVSRTransformer3DModel forward, per attention mode.

Convention (the one of `torch.utils.flop_counter.FlopCounterMode`): a matmul of (m x k) by (k x n) costs
2*m*k*n FLOPs; biases, norms, softmax, RoPE, activations, gathers and top-k sorting are not matmuls and are
not counted. Attention costs 4 * queries * keys * head_dim per head (scores and values).

Attention is counted as `cascade_vsr.models.attention` executes it on its default "sdpa" backend, layer by layer
from the same `AttentionSpec`s the model builds. Windows and temporal units are exact: each ragged edge window
costs its own size squared (equally shaped windows run together, unpadded). For `sparse_topk` a ragged unit is
padded to the full tile and the padding is masked, not skipped, so its FLOPs are spent: every unit attends to
`slots` units of `window` tokens (`token_layout.sparse_unit_layout`), and the top-k scoring is one (U x D) @ (D x U)
unit score matmul per head over all U units of the video (temporal units only mask it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from cascade_vsr.models.attention import adaptive_window_size
from cascade_vsr.models.attention_spec import AttentionSpec, layer_attention_specs
from cascade_vsr.models.token_layout import partition_axis, sparse_unit_layout, window_lengths


def _matmul(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def token_grid(latent_shape: Sequence[int], patch_size: Sequence[int]) -> tuple[int, int, int]:
    """(T, H, W) token grid of a (B, C, T, H, W) latent after the (padded) patch embedding."""
    return tuple(-(-size // patch) for size, patch in zip(latent_shape[2:], patch_size))


def _window_pairs(grid: Sequence[int], window: Sequence[int], shift: bool) -> int:
    """Query-key pairs of exact 3D window attention: sum over windows of size^2, a product over the axes."""
    return math.prod(
        sum(n * n for n in window_lengths(size, partition_axis(size, w, shift))) for size, w in zip(grid, window)
    )


def attention_pairs(grid: Sequence[int], spec: AttentionSpec) -> tuple[int, int]:
    """(query-key pairs computed by one head's self-attention, unit-score pairs of the top-k selection) of a layer
    of `spec` on a (T, H, W) token grid. Exact windows, padded sparse units (see the module docstring)."""
    grid = tuple(grid)
    frames, height, width = grid
    num_tokens = frames * height * width
    if spec.mode == "full":
        if spec.temporal_unit is None or spec.temporal_unit >= frames:
            return num_tokens * num_tokens, 0
        return _window_pairs(grid, (spec.temporal_unit, height, width), spec.shift), 0
    if spec.mode == "window":
        window = spec.window
        if window is None:
            window = adaptive_window_size(grid, spec.window_reference, spec.num_windows, spec.max_frames)
        return _window_pairs(grid, window, spec.shift), 0
    layout = sparse_unit_layout(grid, spec.window, spec.topk, spec.temporal_unit, spec.shift)
    tile, units = layout.unit_tokens, layout.num_units
    return units * tile * layout.slots * tile, (units * units if layout.slots > 1 else 0)


def transformer_flops(
    config: Mapping[str, Any],
    latent_shape: Sequence[int],
    text_len: int = 512,
    attention_mode: str | Sequence[str] | None = None,
) -> dict[str, int]:
    """Matmul FLOPs of one forward of a `CascadeVSRTransformer3DModel` with `config` on latents of
    `latent_shape` (B, C, T, H, W) and `text_len` text tokens (512 for Wan's T5 prompts).

    `attention_mode` overrides the config's (a mode or one per layer). Returns a dict of FLOPs:
    `embeddings` (patch, time / noise-level, text projections), `linear` (per-block q/k/v/out of both
    attentions, FFN, the output projection), `self_attention` (scores + values), `topk_scoring`,
    `cross_attention` (scores + values against the text), `attention` = self_attention + topk_scoring (the
    part that the mode changes) and `total`.
    """
    config = dict(config)
    batch, channels = latent_shape[0], latent_shape[1]
    if channels != config["latent_channels"]:
        raise ValueError(f"`latent_shape` must have {config['latent_channels']} channels, got {channels}")
    layers = config["num_layers"]
    window_size = config.get("window_size")
    specs = layer_attention_specs(
        attention_mode if attention_mode is not None else config.get("attention_mode", "full"),
        layers,
        temporal_unit=config.get("temporal_unit"),
        sparse_window=tuple(config.get("sparse_window", (12, 9))),
        sparse_topk=config.get("sparse_topk", 1),
        window_size=None if window_size is None else tuple(window_size),
        window_reference=tuple(config.get("window_reference", (45, 80))),
    )

    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    dim, ffn, text_dim = heads * head_dim, config["ffn_dim"], config["text_dim"]
    freq = config.get("freq_dim", 256)
    patch = tuple(config.get("patch_size", (1, 2, 2)))
    grid = token_grid(latent_shape, patch)
    tokens = batch * math.prod(grid)
    text = batch * text_len

    embeddings = (
        _matmul(tokens, 2 * channels * math.prod(patch), dim)  # patch embedding (a strided conv)
        + 2 * (_matmul(batch, freq, dim) + _matmul(batch, dim, dim))  # time and noise-level embedders
        + _matmul(batch, dim, 6 * dim)  # shared AdaLN modulation
        + _matmul(text, text_dim, dim)
        + _matmul(text, dim, dim)  # text projection
    )
    per_block_linear = (
        4 * _matmul(tokens, dim, dim)  # self-attention q, k, v, out
        + 2 * _matmul(tokens, dim, dim)  # cross-attention q, out
        + 2 * _matmul(text, dim, dim)  # cross-attention k, v (on the text tokens)
        + 2 * _matmul(tokens, dim, ffn)  # feed-forward up and down
    )
    linear = layers * per_block_linear + _matmul(tokens, dim, channels * math.prod(patch))
    cross_attention = layers * 4 * batch * heads * math.prod(grid) * text_len * head_dim

    self_attention = topk_scoring = 0
    for spec in specs:
        pairs, unit_pairs = attention_pairs(grid, spec)
        self_attention += 4 * batch * heads * pairs * head_dim
        topk_scoring += 2 * batch * heads * unit_pairs * head_dim

    attention = self_attention + topk_scoring
    return {
        "embeddings": embeddings,
        "linear": linear,
        "self_attention": self_attention,
        "topk_scoring": topk_scoring,
        "cross_attention": cross_attention,
        "attention": attention,
        "total": embeddings + linear + attention + cross_attention,
    }
