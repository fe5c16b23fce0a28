"""Checks and small helpers shared by the degradations."""

from __future__ import annotations

from dataclasses import asdict, fields, is_dataclass

import numpy as np


def check_video(frames: np.ndarray, name: str = "frames", min_frames: int = 1) -> np.ndarray:
    """Check a uint8 RGB video of shape (T, H, W, 3); ValueError naming `name` otherwise."""
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"`{name}` must be a numpy array of shape (T, H, W, 3), got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise ValueError(f"`{name}` must have dtype uint8 (RGB video), got {frames.dtype}")
    if frames.ndim != 4:
        raise ValueError(f"`{name}` must have shape (T, H, W, 3) (4 dims), got {frames.shape}")
    if frames.shape[-1] != 3:
        raise ValueError(f"`{name}` must have 3 channels (RGB) on the last dim, got shape {frames.shape}")
    if min(frames.shape) == 0:
        raise ValueError(f"`{name}` must not be empty, got shape {frames.shape}")
    if frames.shape[0] < min_frames:
        raise ValueError(f"`{name}` must have at least {min_frames} frames (T), got T={frames.shape[0]}")
    return frames


def check_range(value: tuple[float, float], name: str, low: float | None = None, high: float | None = None) -> None:
    """Check a (min, max) pair inside [low, high]."""
    if not isinstance(value, (tuple, list)) or len(value) != 2 or value[0] > value[1]:
        raise ValueError(f"`{name}` must be a (min, max) pair with min <= max, got {value!r}")
    if (low is not None and value[0] < low) or (high is not None and value[1] > high):
        raise ValueError(f"`{name}` must lie in [{low}, {high}], got {value!r}")


def config_to_dict(config) -> dict:
    """A JSON-friendly dict of a dataclass config (tuples become lists)."""
    assert is_dataclass(config)
    return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(config).items()}


def config_from_dict(cls, values: dict):
    """Build dataclass `cls` from a dict, refusing unknown keys with a ValueError that names them."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} parameter(s) {unknown}; expected some of {sorted(names)}")
    converted = {key: tuple(value) if isinstance(value, list) else value for key, value in values.items()}
    return cls(**converted)


def uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1])) if bounds[1] > bounds[0] else float(bounds[0])
