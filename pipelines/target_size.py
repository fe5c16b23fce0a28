"""The output size of a call: `height` x `width` in pixels, or the input's size times `scale` (per axis, any
factor >= 1). Pure functions, checked before any compute."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _scale_pair(scale: Any) -> tuple[float, float] | None:
    """`scale` as an (h, w) pair of numbers, or None when it is neither a number nor a pair of numbers."""
    if _is_number(scale):
        return scale, scale
    if isinstance(scale, tuple | list) and len(scale) == 2 and all(_is_number(s) for s in scale):
        return scale[0], scale[1]
    return None


def check_target_size(height: Any, width: Any, scale: Any) -> None:
    """The target size comes as `height` and `width` (ints) or as `scale` (a number >= 1 or an (h, w) pair)."""
    if scale is not None and (height is not None or width is not None):
        raise ValueError("pass either `height` and `width` or `scale`, not both")
    if scale is not None:
        scales = _scale_pair(scale)
        if scales is None or not all(1 <= s < math.inf for s in scales):  # NaN fails too
            raise ValueError(f"`scale` must be a finite number >= 1 or a (height, width) pair of them, got {scale!r}")
    elif height is None or width is None:
        raise ValueError("pass the target size as `height` and `width` (pixels) or as `scale`")
    elif not all(_is_int(s) and s > 0 for s in (height, width)):
        raise ValueError(f"`height` and `width` must be positive ints, got {(height, width)}")


def resolve_target_size(
    input_size: tuple[int, int],
    height: int | None = None,
    width: int | None = None,
    scale: float | tuple[float, float] | None = None,
) -> tuple[int, int]:
    """The output size (H, W) in pixels: `height` x `width`, or the input's (H, W) times `scale` per axis,
    rounded; never smaller than the input."""
    check_target_size(height, width, scale)
    if scale is not None:
        scales = _scale_pair(scale)
        target = (round(input_size[0] * scales[0]), round(input_size[1] * scales[1]))
    else:
        target = (int(height), int(width))
    if target[0] < input_size[0] or target[1] < input_size[1]:
        raise ValueError(
            f"the target size (height, width)={target} must not be smaller than the input {tuple(input_size)}"
        )
    return target
