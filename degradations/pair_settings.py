"""The settings of a pair dataset (`PairSettings`) and their checks, usable with or without the command line.

Error messages name the `cascade-vsr make-pairs` option that sets the value.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEGRADATIONS = ("flow", "classic1", "classic2", "model_guided", "none")  # none: the clean area-resized LR
SPACE_TO_DEPTH = "space_to_depth"  # `upstream` value for pixel-space latents
FRAMES_FORMATS = ("mp4", "png")
DIS_PRESETS = ("ultrafast", "fast", "medium")


@dataclass
class PairSettings:
    """Everything that defines a dataset (stored in dataset.json by `dataset_config`).

    Build it from command-line style values with `PairSettings.from_options`; the fields are checked on
    creation, before any video is read.
    """

    num_frames: int = 17
    stride: int = 1
    clip_step: int | None = None  # source frames between clip starts; None: num_frames * stride
    max_clips_per_video: int | None = None
    frame_range: tuple[int, int] | None = None  # use only source frames [start, end)
    hr_size: tuple[int, int] = (1088, 1920)
    lr_size: tuple[int, int] = (544, 960)
    degradations: dict = field(default_factory=lambda: {"flow": 0.5, "classic1": 0.25, "classic2": 0.25})
    classic_options: dict | None = None  # ClassicDegradationConfig overrides
    still_fraction: float = 0.0
    still_noise: float = 0.25
    dis_preset: str = "fast"
    alpha: tuple[float, float] = (0.3, 0.4)
    sdedit_steps: int = 20
    upstream: str | None = None  # a diffusers T2V pipeline folder, SPACE_TO_DEPTH, or None (no latents)
    latent_space: str | None = None  # the upstream adapter's name, filled in by `build_dataset`
    prompt: str = ""
    text_embeds: bool = False
    frames_format: str = "mp4"
    crf: int = 12
    quality_filter: bool = True
    quality_score: str | None = None  # MODULE:CALLABLE of a learned quality score
    min_quality_score: float = 40.0
    seed: int = 0

    def __post_init__(self):
        for name in ("num_frames", "stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"`--{name.replace('_', '-')}` must be >= 1, got {getattr(self, name)}")
        if self.num_frames < 2:
            raise ValueError(
                f"`--num-frames` must be >= 2 (the flow-based degradation needs pairs), got {self.num_frames}"
            )
        self.hr_size = tuple(int(s) for s in self.hr_size)
        if any(s < 16 or s % 16 for s in self.hr_size):
            raise ValueError(f"`--hr-size` must be positive multiples of 16, got {self.hr_size}")
        self.lr_size = tuple(int(s) for s in self.lr_size)
        if any(s < 16 or s % 16 for s in self.lr_size) or any(lr > hr for lr, hr in zip(self.lr_size, self.hr_size)):
            raise ValueError(
                f"`lr_size` (from `--lr-scale`) must be multiples of 16 no larger than `--hr-size` {self.hr_size}, "
                f"got {self.lr_size}"
            )
        self.alpha = tuple(self.alpha)
        if not 0 <= self.alpha[0] <= self.alpha[1] <= 1:
            raise ValueError(f"`--alpha` must be a range inside [0, 1], got {self.alpha}")
        if self.frame_range is not None:
            self.frame_range = tuple(self.frame_range)
            if not 0 <= self.frame_range[0] < self.frame_range[1]:
                raise ValueError(f"`--frame-range` must be START END with 0 <= START < END, got {self.frame_range}")
        if self.classic_options is not None:
            if not isinstance(self.classic_options, dict):
                raise ValueError(f"`--classic-options` must be a JSON object, got {self.classic_options!r}")
            classic_config(self.classic_options, order=1)
        if not 0 <= self.still_fraction <= 1:
            raise ValueError(f"`--still-fraction` must lie in [0, 1], got {self.still_fraction}")
        if not 0 <= self.still_noise < math.inf:
            raise ValueError(f"`--still-noise` must be a finite number >= 0 (grey levels), got {self.still_noise}")
        check_mix(self.degradations)
        if self.dis_preset not in DIS_PRESETS:
            raise ValueError(f"`--dis-preset` must be one of {DIS_PRESETS}, got {self.dis_preset!r}")
        if self.frames_format not in FRAMES_FORMATS:
            raise ValueError(f"`--frames-format` must be one of {FRAMES_FORMATS}, got {self.frames_format!r}")
        if self.quality_score is not None:
            load_callable(self.quality_score)
        if "model_guided" in self.degradations and self.upstream is None:
            raise ValueError(
                "`--degradations` includes model_guided, which needs `--upstream` (a T2V pipeline folder)"
            )
        if self.upstream == SPACE_TO_DEPTH:
            if "model_guided" in self.degradations or self.text_embeds:
                raise ValueError(
                    "`--upstream space_to_depth` has no T2V model: it cannot make model_guided pairs or text embeddings"
                )
        elif self.upstream is not None and not (Path(self.upstream) / "model_index.json").is_file():
            raise ValueError(
                f"`--upstream` {str(self.upstream)!r} is not a diffusers pipeline folder (no model_index.json) "
                f"nor {SPACE_TO_DEPTH!r}"
            )

    @classmethod
    def from_options(
        cls,
        *,
        hr_size: Sequence[int] = (1088, 1920),
        lr_scale: float = 0.5,
        degradations: str | dict = "flow=0.5,classic1=0.25,classic2=0.25",
        upstream: str | Path | None = None,
        **fields,
    ) -> PairSettings:
        """Settings from make-pairs' option values: the LR size as `lr_scale` (LR side / HR side, rounded to
        multiples of 16), the mix as 'name=weight,...' text (normalized) and `upstream` as a path (resolved)."""
        hr_size = tuple(int(s) for s in hr_size)
        if not 0 < lr_scale < 1:
            raise ValueError(f"`--lr-scale` must be in (0, 1), got {lr_scale}")
        mix = parse_mix(degradations) if isinstance(degradations, str) else dict(degradations)
        if upstream is not None and str(upstream) != SPACE_TO_DEPTH:
            upstream = str(Path(upstream).resolve())
        return cls(
            hr_size=hr_size,
            lr_size=(round16(hr_size[0] * lr_scale), round16(hr_size[1] * lr_scale)),
            degradations=mix,
            upstream=None if upstream is None else str(upstream),
            **fields,
        )

    @property
    def span(self) -> int:
        """Source frames that one clip covers."""
        return (self.num_frames - 1) * self.stride + 1

    def dataset_config(self) -> dict:
        """The JSON record of these settings that dataset.json stores (tuples as lists, clip_step resolved)."""
        config = {key: (list(v) if isinstance(v, tuple) else v) for key, v in self.__dict__.items()}
        config["clip_step"] = self.clip_step or self.num_frames * self.stride
        return config


def parse_mix(text: str) -> dict[str, float]:
    """'flow=0.5,classic1=0.5' -> normalized weights; ValueError naming `--degradations` otherwise."""
    mix = {}
    for item in filter(None, (part.strip() for part in str(text).split(","))):
        name, _, weight = item.partition("=")
        name = name.strip()
        if name not in DEGRADATIONS:
            raise ValueError(f"`--degradations`: unknown degradation {name!r}; expected some of {DEGRADATIONS}")
        try:
            mix[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"`--degradations`: weight of {name!r} must be a number, got {weight!r}") from None
        if mix[name] < 0:
            raise ValueError(f"`--degradations`: weight of {name!r} must be >= 0, got {mix[name]}")
    total = sum(mix.values())
    if total <= 0:
        raise ValueError(f"`--degradations` must give a positive weight to one of {DEGRADATIONS}, got {text!r}")
    return {name: weight / total for name, weight in mix.items() if weight > 0}


def check_mix(mix: dict) -> None:
    """A degradation mix: known names with positive weights that sum to 1."""
    if not isinstance(mix, dict) or not mix:
        raise ValueError(f"`--degradations` must map some of {DEGRADATIONS} to weights, got {mix!r}")
    unknown = sorted(set(mix) - set(DEGRADATIONS))
    if unknown:
        raise ValueError(f"`--degradations`: unknown degradations {unknown}; expected some of {DEGRADATIONS}")
    if any(not weight > 0 for weight in mix.values()) or not math.isclose(sum(mix.values()), 1.0):
        raise ValueError(f"`--degradations` weights must be positive and sum to 1, got {mix}")


def round16(value: float) -> int:
    """The nearest multiple of 16, at least 16."""
    return max(16, int(round(value / 16)) * 16)


def classic_config(options: dict | None, order: int):
    """ClassicDegradationConfig with `--classic-options` overrides; ValueError naming the option otherwise."""
    from cascade_vsr.degradations.classic import ClassicDegradationConfig

    options = dict(options or {})
    unknown = set(options) - set(ClassicDegradationConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"`--classic-options`: unknown ClassicDegradationConfig fields {sorted(unknown)}")
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    return ClassicDegradationConfig(**{**options, "order": order})


def load_callable(spec: str) -> Callable:
    """'package.module:function' -> the callable; ValueError naming `--quality-score` otherwise."""
    module_name, _, attribute = str(spec).partition(":")
    try:
        value = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(
            f"`--quality-score` must be MODULE:CALLABLE of an installed module, got {spec!r}: {error}"
        ) from None
    if not callable(value):
        raise ValueError(f"`--quality-score` {spec!r} is not callable")
    return value
