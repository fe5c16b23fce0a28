"""Dense optical flow between consecutive frames (OpenCV's DIS), used by the metrics and the degradations."""

from __future__ import annotations

import cv2
import numpy as np

from cascade_vsr.core.video import check_video

DIS_PRESETS = {
    "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
    "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}
# DIS refuses smaller images with a raw OpenCV error: every side >= 8 px and the longer one >= 12 px
MIN_FLOW_SIDE = 8
MIN_FLOW_LONG_SIDE = 12


def flow_size_ok(height: int, width: int) -> bool:
    """Whether DIS can estimate the flow of frames of this size."""
    return min(height, width) >= MIN_FLOW_SIDE and max(height, width) >= MIN_FLOW_LONG_SIDE


def compute_flow(frames: np.ndarray, preset: str = "fast", scale: float = 1.0) -> np.ndarray:
    """DIS flow (T-1, H, W, 2) mapping each pixel of frame t to its position in frame t-1.

    `scale` < 1 estimates the flow at that fraction of the resolution (faster for large frames) and resizes it
    back, in pixels of the full frame.
    """
    frames = check_video(frames, "frames", min_frames=2)
    if preset not in DIS_PRESETS:
        raise ValueError(f"`preset` must be one of {sorted(DIS_PRESETS)}, got {preset!r}")
    height, width = frames.shape[1:3]
    if not flow_size_ok(height, width):
        raise ValueError(
            f"`frames` of {height}x{width} px are too small for optical flow: every side must be >= {MIN_FLOW_SIDE} "
            f"px and the longer one >= {MIN_FLOW_LONG_SIDE} px"
        )
    if not 0 < scale <= 1:
        raise ValueError(f"`scale` must be in (0, 1], got {scale}")
    gray = np.stack([cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames])
    size = (max(MIN_FLOW_SIDE, round(width * scale)), max(MIN_FLOW_SIDE, round(height * scale)))
    if scale < 1 and flow_size_ok(size[1], size[0]):  # else the frames are too small to shrink: full resolution
        gray = np.stack([cv2.resize(g, size, interpolation=cv2.INTER_AREA) for g in gray])
    dis = cv2.DISOpticalFlow_create(DIS_PRESETS[preset])
    # one DIS call per frame pair: the per-frame loop is the flow itself
    flow = np.stack([dis.calc(gray[t], gray[t - 1], None) for t in range(1, len(gray))])
    if gray.shape[1:] != (height, width):
        factors = np.array([width / gray.shape[2], height / gray.shape[1]], dtype=np.float32)
        flow = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_LINEAR) for f in flow]) * factors
    return flow


def bidirectional_flow(frames: np.ndarray, preset: str = "medium") -> tuple[np.ndarray, np.ndarray]:
    """(backward, forward) flows, each (T-1, H, W, 2): `backward[t-1]` maps frame t to frame t-1 and
    `forward[t-1]` frame t-1 to frame t (the pair `metrics.consistency_mask` checks)."""
    backward = compute_flow(frames, preset=preset)
    forward = compute_flow(frames[::-1], preset=preset)[::-1].copy()
    return backward, forward
