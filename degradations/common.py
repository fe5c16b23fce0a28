"""Checks and small helpers shared by the degradations."""

from __future__ import annotations

import math

import numpy as np


def check_range(value: tuple[float, float], name: str, low: float | None = None, high: float | None = None) -> None:
    """Check a (min, max) pair of finite numbers inside [low, high] (NaN compares False with everything, so it
    would pass the bound checks unnoticed)."""
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in value)
        or not all(math.isfinite(v) for v in value)
        or value[0] > value[1]
    ):
        raise ValueError(f"`{name}` must be a (min, max) pair of finite numbers with min <= max, got {value!r}")
    if (low is not None and value[0] < low) or (high is not None and value[1] > high):
        raise ValueError(f"`{name}` must lie in [{low}, {high}], got {value!r}")


def uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    """One draw from U[min, max] of a (min, max) pair; the min itself when the range is empty."""
    return float(rng.uniform(bounds[0], bounds[1])) if bounds[1] > bounds[0] else float(bounds[0])
