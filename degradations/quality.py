"""Clip quality filters (SimpleGVR section 5.1.1): drop too dark or too bright clips and clips without detail.

A learned score (e.g. MUSIQ, which the paper thresholds at 40) plugs in as any callable from uint8 frames
(N, H, W, 3) to a float; nothing here depends on a particular metric package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

from cascade_vsr.core.video import check_video


@dataclass
class QualityFilterConfig:
    min_brightness: float = 20.0  # mean luma (0..255) below this: too dark
    max_brightness: float = 235.0  # mean luma above this: too bright
    min_laplacian_variance: float = 30.0
    num_sampled_frames: int = 10  # frames sampled uniformly for the detail and learned scores
    min_learned_score: float = 40.0


@dataclass
class QualityReport:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    brightness: float = 0.0
    laplacian_variance: float = 0.0
    learned_score: float | None = None


def sample_frame_indices(num_frames: int, num_samples: int) -> np.ndarray:
    return np.unique(np.linspace(0, num_frames - 1, num=min(num_samples, num_frames)).round().astype(int))


def laplacian_variance(frames: np.ndarray) -> float:
    """Mean over frames of the variance of the Laplacian of the luma: a sharpness / detail measure."""
    gray = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames])
    tall = gray.reshape(-1, gray.shape[-1])  # one Laplacian call over all frames stacked
    lap = cv2.Laplacian(tall, cv2.CV_64F).reshape(gray.shape)[:, 1:-1]  # drop rows touching other frames
    return float(lap.reshape(len(frames), -1).var(axis=1).mean())


class QualityFilter:
    """`QualityFilter(config, learned_score=None)(frames) -> QualityReport`."""

    def __init__(
        self,
        config: QualityFilterConfig | None = None,
        learned_score: Callable[[np.ndarray], float] | None = None,
    ):
        if learned_score is not None and not callable(learned_score):
            raise ValueError(f"`learned_score` must be a callable frames -> float, got {type(learned_score).__name__}")
        self.config = config or QualityFilterConfig()
        self.learned_score = learned_score

    def __call__(self, frames: np.ndarray) -> QualityReport:
        frames = check_video(frames, "frames")
        c = self.config
        sampled = frames[sample_frame_indices(len(frames), c.num_sampled_frames)]
        luma = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in sampled])
        report = QualityReport(
            passed=True, brightness=float(luma.mean()), laplacian_variance=laplacian_variance(sampled)
        )
        if report.brightness < c.min_brightness:
            report.reasons.append(f"too dark (mean luma {report.brightness:.1f} < {c.min_brightness})")
        if report.brightness > c.max_brightness:
            report.reasons.append(f"too bright (mean luma {report.brightness:.1f} > {c.max_brightness})")
        if report.laplacian_variance < c.min_laplacian_variance:
            report.reasons.append(
                f"too little detail (Laplacian variance {report.laplacian_variance:.1f} < {c.min_laplacian_variance})"
            )
        if self.learned_score is not None:
            report.learned_score = float(self.learned_score(sampled))
            if report.learned_score < c.min_learned_score:
                report.reasons.append(f"learned score {report.learned_score:.1f} < {c.min_learned_score}")
        report.passed = not report.reasons
        return report
