"""Still shots synthesized from one frame: training clips that teach the stage to keep static detail still.

In a real static shot the frames are not identical: the source's codec and sensor change every frame by a
fraction of a grey level, partly at the finest scale and partly in low-frequency patches. The low-resolution
input carries the low-frequency part of that change, so a super-resolution model that draws its added detail
from each frame separately makes that detail follow every frame's noise: flicker that the ground truth does not
have. Still clips whose HR frames carry fresh, unpredictable per-frame noise make the regression target explicit:
keep what all frames share (the detail) and let through only the change the LR input shows.
"""

from __future__ import annotations

import numpy as np

from cascade_vsr.core.video import check_video

LOWPASS_SIGMA = 1.5  # px: the scale of the low-frequency half of the per-frame variation


def still_clip(frame: np.ndarray, num_frames: int, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """A still shot (num_frames, H, W, 3) uint8: `frame` repeated, each copy with its own zero-mean noise.

    The noise is the sum of a white part and a low-pass part (Gaussian blur of sigma 1.5 px, rescaled), each of
    std `noise_std` grey levels, then rounded to uint8 like any decoded frame. About 0.25 matches the
    frame-to-frame change in the static regions of bigbuckbunny.mp4 area-resized to 320x192.
    """
    import cv2
    from einops import rearrange

    if not isinstance(frame, np.ndarray) or frame.ndim != 3:
        got = frame.shape if isinstance(frame, np.ndarray) else type(frame).__name__
        raise ValueError(f"`frame` must be one uint8 frame of shape (H, W, 3), got {got}")
    check_video(frame[None], "frame")
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"`num_frames` must be an int >= 1, got {num_frames!r}")
    if not np.isfinite(noise_std) or noise_std < 0:
        raise ValueError(f"`noise_std` must be a finite number >= 0 (grey levels), got {noise_std!r}")

    shape = (num_frames, *frame.shape)
    white = rng.standard_normal(shape, dtype=np.float32)
    # One blur call for every frame and channel: cv2 filters each of the (t c) channels separately.
    stacked = rearrange(rng.standard_normal(shape, dtype=np.float32), "t h w c -> h w (t c)")
    blurred = cv2.GaussianBlur(stacked, (0, 0), LOWPASS_SIGMA, borderType=cv2.BORDER_REFLECT)
    low = rearrange(blurred.reshape(stacked.shape), "h w (t c) -> t h w c", t=num_frames)
    low /= max(float(low.std()), 1e-12)
    video = frame.astype(np.float32)[None] + noise_std * (white + low)
    return np.clip(np.rint(video), 0, 255).astype(np.uint8)
