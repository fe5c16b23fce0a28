"""3D rotary position embedding (RoPE) over a (T, H, W) token grid."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn as nn
from einops import rearrange


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Split an (even) head dim between the t, h and w axes: h and w get 1/3 each, t the rest."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"attention_head_dim must be even and >= 6 for 3D RoPE, got {head_dim}")
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def check_frame_offset(frame_offset: float) -> float:
    """A finite real number of latent frames (a Python or NumPy number: a tensor would be read on the host)."""
    if not isinstance(frame_offset, numbers.Real) or isinstance(frame_offset, bool) or not math.isfinite(frame_offset):
        raise ValueError(f"`frame_offset` must be a finite real number (latent frames), got {frame_offset!r}")
    return float(frame_offset)


def _axis_cos_sin(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (float32, (len(positions), dim)) of one axis' angles position * theta^(-2i / dim), computed in
    float64; channel pairs (2i, 2i+1) share an angle."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim)
    angles = torch.outer(positions, inv_freq).repeat_interleave(2, dim=-1)
    return angles.cos().float(), angles.sin().float()


def rope_cos_sin(
    grid: Sequence[int],
    head_dim: int,
    theta: float = 10000.0,
    frame_offset: float = 0.0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the 3D RoPE angles for a (T, H, W) token grid, each of shape (T*H*W, head_dim).

    The head dim is split between the t, h and w axes (`rope_axis_dims`); channel pairs (2i, 2i+1) rotate
    together. Positions are token indices, so attention scores depend only on relative offsets: any T, H, W works
    without retraining, and `frame_offset` (streaming) is free. Every angle depends on one axis' position only, so
    the float64 angles and their cos / sin are computed per axis (T + H + W rows, with large offsets keeping their
    precision) and the float32 tables are assembled per token.
    """
    num_frames, height, width = grid
    positions = (
        torch.arange(num_frames, device=device, dtype=torch.float64) + frame_offset,
        torch.arange(height, device=device, dtype=torch.float64),
        torch.arange(width, device=device, dtype=torch.float64),
    )
    (t_cos, t_sin), (h_cos, h_sin), (w_cos, w_sin) = (
        _axis_cos_sin(pos, dim, theta) for pos, dim in zip(positions, rope_axis_dims(head_dim))
    )

    def assemble(t_table: torch.Tensor, h_table: torch.Tensor, w_table: torch.Tensor) -> torch.Tensor:
        table = torch.cat(
            [
                t_table[:, None, None, :].expand(num_frames, height, width, -1),
                h_table[None, :, None, :].expand(num_frames, height, width, -1),
                w_table[None, None, :, :].expand(num_frames, height, width, -1),
            ],
            dim=-1,
        )
        return rearrange(table, "t h w d -> (t h w) d")

    return assemble(t_cos, h_cos, w_cos), assemble(t_sin, h_sin, w_sin)


def rope_rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The unit complex numbers cos + i sin of the (N, D) tables, one per channel pair: (N, D / 2) complex64."""
    return torch.complex(cos[..., 0::2].contiguous(), sin[..., 0::2].contiguous())


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of x (B, heads, N, D) by the (N, D / 2) unit complex numbers of `rope_rotation`.

    Each pair (2i, 2i+1) is one complex number, rotated by one complex multiplication: a single vectorised kernel,
    where the real-valued form (negate, interleave, two products and a sum) makes five passes over x."""
    pairs = x.float().unflatten(-1, (-1, 2))
    if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(s % 2 for s in pairs.stride()[:-1]):
        pairs = pairs.contiguous()  # a complex view needs whole (real, imaginary) pairs
    return torch.view_as_real(torch.view_as_complex(pairs) * rotation).flatten(-2).type_as(x)


def rms_norm_rope(x: torch.Tensor, norm: nn.RMSNorm, rotation: torch.Tensor) -> torch.Tensor:
    """`apply_rope(norm(x), rotation)` of x (B, heads, N, D) with the RMSNorm written out: the normalised values
    stay float32 until they are rotated and are rounded to x's dtype once, and the mean square is one reduction
    (bfloat16 would otherwise take a cast in and out of each, six passes over x for the norm and three for RoPE).

    The float32 values are (B, heads, N, D)-contiguous whatever x's strides (the heads of a projection are
    interleaved in memory), so every pass runs over contiguous rows and the (N, D / 2) table broadcasts over the
    heads. Outside autograd the passes write into that one buffer instead of allocating a new one each."""
    if norm.eps is None:
        raise ValueError("`norm` needs an explicit eps (nn.RMSNorm(..., eps=...))")
    in_place = not torch.is_grad_enabled()
    values = x.to(torch.float32, memory_format=torch.contiguous_format, copy=in_place)
    weight = None if norm.weight is None else norm.weight.float()
    if in_place:
        norms = torch.linalg.vector_norm(values, dim=-1, keepdim=True)
        inverse_rms = norms.square_().div_(x.shape[-1]).add_(norm.eps).rsqrt_()
        normed = values.mul_(inverse_rms) if weight is None else values.mul_(inverse_rms).mul_(weight)
        rotated = torch.view_as_complex(normed.unflatten(-1, (-1, 2))).mul_(rotation)
    else:
        mean_square = torch.linalg.vector_norm(values, dim=-1, keepdim=True).square() / x.shape[-1]
        inverse_rms = torch.rsqrt(mean_square + norm.eps)
        normed = values * inverse_rms if weight is None else values * inverse_rms * weight
        rotated = torch.view_as_complex(normed.unflatten(-1, (-1, 2))) * rotation
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


class RotaryPositionEmbedding3D(nn.Module):
    """The rotation table (`rope_rotation` of `rope_cos_sin`), kept for the last grid, frame offset and device.

    The table depends on the token grid only, so the steps of a sampler at one size, and the queries and keys of
    every layer, use one. It is no parameter or buffer: the state dict has none, and a grid, offset or device of
    another call builds a new one. A table built under `torch.inference_mode()` is an inference tensor, which
    autograd may not save, so the inference-mode flag is part of the key.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        rope_axis_dims(head_dim)
        self.head_dim = head_dim
        self.theta = theta
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def forward(
        self, grid: Sequence[int], frame_offset: float = 0.0, device: torch.device | str | None = None
    ) -> torch.Tensor:
        frame_offset = check_frame_offset(frame_offset)
        device = torch.device("cpu") if device is None else torch.device(device)
        key = (tuple(grid), frame_offset, device, torch.is_inference_mode_enabled())
        if self._cache is None or self._cache[0] != key:
            tables = rope_cos_sin(grid, self.head_dim, self.theta, frame_offset, device)
            self._cache = (key, rope_rotation(*tables))
        return self._cache[1]
