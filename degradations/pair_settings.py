"""The settings of a pair dataset (`PairSettings`) and their checks, usable with or without the command line.

Error messages name the `cascade-vsr make-pairs` option that sets the value.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEGRADATIONS = ("flow", "classic1", "classic2", "model_guided", "none")  # none: the clean area-resized LR
SPACE_TO_DEPTH = "space_to_depth"  # `upstream` value for pixel-space latents
FRAMES_FORMATS = ("mp4", "png")
DIS_PRESETS = ("ultrafast", "fast", "medium")
MAX_CRF = 51  # libx264's CRF range is [0, 51]


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
    sdedit_guidance_scale: float | None = None  # the upstream's CFG scale; None: its own default
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
        self.validate()

    def validate(self) -> None:
        """Check every field (ValueError naming its make-pairs option and what is expected) and normalize the
        sequences to tuples; run on creation and again by `build_dataset` before it reads any video, so that a
        wrong value never surfaces after the first clip was degraded."""
        check_int(self.num_frames, "--num-frames", 2, why="the flow-based degradation needs pairs")
        check_int(self.stride, "--stride", 1)
        if self.clip_step is not None:
            check_int(self.clip_step, "--clip-step", 1, why="omit it for num_frames * stride")
        if self.max_clips_per_video is not None:
            check_int(self.max_clips_per_video, "--max-clips-per-video", 1, why="omit it for every clip")
        check_int(self.sdedit_steps, "--sdedit-steps", 1)
        check_int(self.crf, "--crf", 0, MAX_CRF, why="libx264's range")
        check_int(self.seed, "--seed", 0)
        self.hr_size = check_size(self.hr_size, "--hr-size")
        self.lr_size = check_size(self.lr_size, "lr_size (from `--lr-scale`)")
        if any(lr > hr for lr, hr in zip(self.lr_size, self.hr_size)):
            raise ValueError(
                f"`lr_size` (from `--lr-scale`) must be multiples of 16 no larger than `--hr-size` {self.hr_size}, "
                f"got {self.lr_size}"
            )
        self.alpha = check_floats(self.alpha, "--alpha")
        if self.sdedit_guidance_scale is not None:
            (self.sdedit_guidance_scale,) = check_floats([self.sdedit_guidance_scale], "--sdedit-guidance-scale")
            if self.sdedit_guidance_scale < 1:
                raise ValueError(
                    f"`--sdedit-guidance-scale` must be >= 1 (1 disables guidance), got {self.sdedit_guidance_scale}"
                )
        if len(self.alpha) != 2 or not 0 <= self.alpha[0] <= self.alpha[1] <= 1:
            raise ValueError(f"`--alpha` must be a range inside [0, 1], got {self.alpha}")
        if self.frame_range is not None:
            if not isinstance(self.frame_range, (tuple, list)) or len(self.frame_range) != 2:
                raise ValueError(f"`--frame-range` must be START END, got {self.frame_range!r}")
            for value in self.frame_range:
                check_int(value, "--frame-range", 0)
            self.frame_range = tuple(int(v) for v in self.frame_range)
            if not 0 <= self.frame_range[0] < self.frame_range[1]:
                raise ValueError(f"`--frame-range` must be START END with 0 <= START < END, got {self.frame_range}")
        if self.classic_options is not None:
            if not isinstance(self.classic_options, dict):
                raise ValueError(f"`--classic-options` must be a JSON object, got {self.classic_options!r}")
            classic_config(self.classic_options, order=1)
        (still_fraction,) = check_floats((self.still_fraction,), "--still-fraction")
        if not 0 <= still_fraction <= 1:
            raise ValueError(f"`--still-fraction` must lie in [0, 1], got {self.still_fraction}")
        (still_noise,) = check_floats((self.still_noise,), "--still-noise")
        if still_noise < 0:
            raise ValueError(f"`--still-noise` must be a finite number >= 0 (grey levels), got {self.still_noise}")
        check_floats((self.min_quality_score,), "--min-quality-score")
        check_mix(self.degradations)
        for name in ("quality_filter", "text_embeds"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}")
        if self.dis_preset not in DIS_PRESETS:
            raise ValueError(f"`--dis-preset` must be one of {DIS_PRESETS}, got {self.dis_preset!r}")
        if self.frames_format not in FRAMES_FORMATS:
            raise ValueError(f"`--frames-format` must be one of {FRAMES_FORMATS}, got {self.frames_format!r}")
        if not isinstance(self.prompt, str):
            raise ValueError(f"`--prompt` must be text, got {type(self.prompt).__name__}")
        if self.quality_score is not None:
            load_callable(self.quality_score)
        if "model_guided" in self.degradations and self.upstream is None:
            raise ValueError(
                "`--degradations` includes model_guided, which needs `--upstream` (a T2V pipeline folder)"
            )
        if self.text_embeds and self.upstream is None:
            raise ValueError(
                "`--text-embeds` needs `--upstream` (a T2V pipeline folder): the prompt embeddings come from its "
                "text encoder and are stored with the latents"
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
        hr_size = check_size(hr_size, "--hr-size")
        (lr_scale,) = check_floats((lr_scale,), "--lr-scale")
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
        config["clip_step"] = self.step
        return config

    @property
    def step(self) -> int:
        """Source frames between clip starts (`clip_step`, num_frames * stride when None)."""
        return self.num_frames * self.stride if self.clip_step is None else self.clip_step


def check_int(value, option: str, low: int | None = None, high: int | None = None, why: str | None = None) -> None:
    """A whole number (not a bool, not a float) inside [low, high]; ValueError naming `option` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"`{option}` must be a whole number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        expected = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"`{option}` must be {expected}{f' ({why})' if why else ''}, got {value}")


def check_floats(values: Sequence, option: str) -> tuple[float, ...]:
    """Finite real numbers (NaN passes every comparison check unnoticed); ValueError naming `option` otherwise."""
    shown = values[0] if len(values) == 1 else values
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"`{option}` must be a number, got {shown!r}")
        if not math.isfinite(value):
            raise ValueError(f"`{option}` must be finite (no NaN or inf), got {shown!r}")
    return tuple(float(value) for value in values)


def check_size(size: Sequence, option: str) -> tuple[int, int]:
    """An (H, W) pair of positive multiples of 16 (the latent grids and space-to-depth need them)."""
    if isinstance(size, (str, bytes)) or not hasattr(size, "__len__") or len(size) != 2:
        raise ValueError(f"`{option}` must be two sizes H W, got {size!r}")
    for side in size:
        if isinstance(side, bool) or not isinstance(side, numbers.Integral) or side < 16 or side % 16:
            raise ValueError(f"`{option}` must be positive multiples of 16, got {tuple(size)}")
    return tuple(int(side) for side in size)


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
        if not (math.isfinite(mix[name]) and mix[name] >= 0):
            raise ValueError(f"`--degradations`: weight of {name!r} must be a finite number >= 0, got {mix[name]}")
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
    weights = list(mix.values())
    if any(isinstance(w, bool) or not isinstance(w, numbers.Real) or not w > 0 for w in weights) or not math.isclose(
        sum(weights), 1.0
    ):
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
    try:
        return ClassicDegradationConfig(**{**options, "order": order})
    except (TypeError, ValueError) as error:  # the config names the field; say which option set it
        raise ValueError(f"`--classic-options`: {error}") from None


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
