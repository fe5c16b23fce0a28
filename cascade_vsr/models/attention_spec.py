"""The per-layer attention spec: which mode a self-attention layer runs, with which options, on which backend.

The transformer builds one `AttentionSpec` per layer from its config (`layer_attention_specs`) and hands it to
`attention.self_attention`. The names of the modes, their options and the backends each accepts live here.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass

ATTENTION_MODES = ("full", "sparse_topk", "window")
# Backends of the local modes: batched SDPA over gathered tiles (default, differentiable) or FlexAttention.
LOCAL_BACKENDS = ("sdpa", "flex")
DEFAULT_BACKEND = "sdpa"


@functools.cache
def diffusers_backends() -> tuple[str, ...]:
    """Names of diffusers' attention backends (`AttentionBackendName`), which plain full attention accepts."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return tuple(member.value for member in AttentionBackendName)


# ---------------------------------------------------------------------------------------------------------------
# Validation of the options
# ---------------------------------------------------------------------------------------------------------------


def check_attention_mode(mode: str, name: str = "attention_mode") -> str:
    if mode not in ATTENTION_MODES:
        raise ValueError(f"`{name}` must be one of {ATTENTION_MODES}, got {mode!r}")
    return mode


def check_window(window: Sequence[int], ndim: int, name: str = "window") -> tuple[int, ...]:
    """A window of `ndim` positive ints (a window larger than the grid is fine: it covers the whole axis)."""
    if isinstance(window, int) or len(window) != ndim or not all(isinstance(w, int) and w > 0 for w in window):
        raise ValueError(f"`{name}` must be a tuple of {ndim} positive ints, got {window!r}")
    return tuple(int(w) for w in window)


def check_temporal_unit(temporal_unit: int | None, name: str = "temporal_unit") -> int | None:
    if temporal_unit is not None and (not isinstance(temporal_unit, int) or temporal_unit <= 0):
        raise ValueError(f"`{name}` must be None or a positive int (latent frames), got {temporal_unit!r}")
    return temporal_unit


def check_topk(topk: int, name: str = "topk") -> int:
    if not isinstance(topk, int) or topk < 0:
        raise ValueError(f"`{name}` must be a non-negative int, got {topk!r}")
    return topk


def _check_positive_int(value: int, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------------------------

# The options of each mode (fields of `AttentionSpec`); the others must stay None.
_OPTIONS = ("temporal_unit", "window", "topk", "window_reference", "num_windows", "max_frames")
MODE_OPTIONS = {
    "full": ("temporal_unit",),
    "sparse_topk": ("window", "topk", "temporal_unit"),
    "window": ("window", "window_reference", "num_windows", "max_frames"),
}
_OPTION_DEFAULTS = {
    "sparse_topk": {"window": (12, 9), "topk": 1},
    "window": {"window_reference": (45, 80), "num_windows": (1, 3, 3), "max_frames": 30},
}


@dataclass(frozen=True)
class AttentionSpec:
    """How one layer computes self-attention: its mode, the mode's layout options and the kernel backend.

    A spec owns no parameters, so a checkpoint runs with any spec. The transformer builds one per layer from its
    config (`layer_attention_specs`); `set_attention_backend` replaces them by copies with another backend.

    Options a mode does not use must stay None; the ones it uses default to the papers' values:

    - full: `temporal_unit` (scope in latent frames; None: all frames).
    - sparse_topk: `window=(12, 9)` ((h, w) tokens of a unit), `topk=1`, `temporal_unit`.
    - window: `window` ((t, h, w) tokens; None: `adaptive_window_size(grid, window_reference, num_windows,
      max_frames)`), `window_reference=(45, 80)`, `num_windows=(1, 3, 3)`, `max_frames=30`.

    `shift` (odd layers) moves window and temporal-unit boundaries by half a window, without wrap-around.
    `backend`: one of `accepted_backends`.
    """

    mode: str = "full"
    shift: bool = False
    temporal_unit: int | None = None
    window: tuple[int, ...] | None = None
    topk: int | None = None
    window_reference: tuple[int, int] | None = None
    num_windows: tuple[int, int, int] | None = None
    max_frames: int | None = None
    backend: str = DEFAULT_BACKEND

    def __post_init__(self) -> None:
        check_attention_mode(self.mode, "mode")
        if not isinstance(self.shift, bool):
            raise ValueError(f"`shift` must be a bool, got {self.shift!r}")
        options = MODE_OPTIONS[self.mode]
        unknown = [name for name in _OPTIONS if name not in options and getattr(self, name) is not None]
        if unknown:
            raise ValueError(f"unknown attention options for mode {self.mode!r}: {unknown} (it takes {list(options)})")
        for name, default in _OPTION_DEFAULTS.get(self.mode, {}).items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        check_temporal_unit(self.temporal_unit)
        if self.window is not None:
            object.__setattr__(self, "window", check_window(self.window, 2 if self.mode == "sparse_topk" else 3))
        if self.mode == "sparse_topk":
            check_topk(self.topk)
        if self.mode == "window":
            object.__setattr__(self, "window_reference", check_window(self.window_reference, 2, "window_reference"))
            object.__setattr__(self, "num_windows", check_window(self.num_windows, 3, "num_windows"))
            _check_positive_int(self.max_frames, "max_frames")
        if self.backend not in self.accepted_backends:
            raise ValueError(
                f"`backend` {self.backend!r} cannot run {self.label}, which accepts {_names(self.accepted_backends)}"
            )

    @property
    def is_local(self) -> bool:
        """Whether the layer attends within windows or units (the local backends) rather than to all tokens."""
        return self.mode != "full" or self.temporal_unit is not None

    @property
    def accepted_backends(self) -> tuple[str, ...]:
        """The local modes take "sdpa" or "flex"; plain full attention "sdpa" (torch's SDPA) or a diffusers backend."""
        return LOCAL_BACKENDS if self.is_local else (DEFAULT_BACKEND, *diffusers_backends())

    @property
    def label(self) -> str:
        """The mode as error messages name it."""
        if self.mode == "full" and self.temporal_unit is not None:
            return f"mode 'full' with temporal_unit={self.temporal_unit}"
        return f"mode {self.mode!r}"

    def with_backend(self, backend: str) -> AttentionSpec:
        """This spec on another backend (a ValueError if its mode cannot use it)."""
        return dataclasses.replace(self, backend=backend)


def _names(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f" and {len(names) - limit} more diffusers backends" if len(names) > limit else "")


def layer_attention_specs(
    attention_mode: str | Sequence[str],
    num_layers: int,
    temporal_unit: int | None = None,
    sparse_window: Sequence[int] = (12, 9),
    sparse_topk: int = 1,
    window_size: Sequence[int] | None = None,
    window_reference: Sequence[int] = (45, 80),
) -> tuple[AttentionSpec, ...]:
    """The self-attention spec of every layer from the transformer's config fields.

    `attention_mode` is one mode or one per layer; odd layers shift. `temporal_unit` scopes the `full` and
    `sparse_topk` layers; `window` layers ignore it (their 3D window bounds time).
    """
    modes = [attention_mode] * num_layers if isinstance(attention_mode, str) else list(attention_mode)
    if len(modes) != num_layers:
        raise ValueError(f"`attention_mode` must be a string or a list of {num_layers} strings, got {len(modes)}")
    specs = []
    for i, mode in enumerate(modes):
        check_attention_mode(mode, f"attention_mode[{i}]")
        shift = bool(i % 2)
        if mode == "full":
            specs.append(AttentionSpec(mode, shift, temporal_unit=temporal_unit))
        elif mode == "sparse_topk":
            specs.append(
                AttentionSpec(mode, shift, temporal_unit=temporal_unit, window=tuple(sparse_window), topk=sparse_topk)
            )
        else:
            window = None if window_size is None else tuple(window_size)
            specs.append(AttentionSpec(mode, shift, window=window, window_reference=tuple(window_reference)))
    return tuple(specs)
