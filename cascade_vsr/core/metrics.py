"""Video quality metrics: PSNR, SSIM and flow warping errors (temporal consistency), per frame and per clip.

All functions take whole clips, uint8 RGB (T, H, W, 3) as numpy arrays or tensors, and compute every frame at
once; they return one value per frame (PSNR, SSIM) or per clip (warping error) so the caller chooses the mean.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

# BT.601 luma as used in super-resolution papers (MATLAB rgb2ycbcr): Y in [16, 235] for RGB in [0, 1].
LUMA_WEIGHTS = (65.481, 128.553, 24.966)
LUMA_OFFSET = 16.0


def _as_video(frames: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float64 tensor on the same scale [0, 255]."""
    video = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    if video.dtype != torch.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(
            f"`{name}` must be uint8 RGB frames of shape (T, H, W, 3), got {video.dtype} {tuple(video.shape)}"
        )
    return video.double()


def _check_pair(
    pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    pred, target = _as_video(pred, "pred"), _as_video(target, "target")
    if pred.shape != target.shape:
        raise ValueError(
            f"`pred` and `target` must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    return pred, target


def rgb_to_luma(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 RGB (T, H, W, 3) -> BT.601 luma Y (T, H, W) in [16, 235], float64."""
    return _luma(_as_video(frames, "frames"))


def _luma(video: torch.Tensor) -> torch.Tensor:
    return video @ (torch.tensor(LUMA_WEIGHTS, dtype=video.dtype) / 255) + LUMA_OFFSET


def psnr(
    pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, data_range: float = 255.0
) -> torch.Tensor:
    """Per-frame PSNR in dB (T,) on uint8 RGB; identical frames give +inf."""
    pred, target = _check_pair(pred, target)
    mse = (pred - target).square().mean(dim=(1, 2, 3))
    return 10 * torch.log10(data_range**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 1D Gaussian (size,), float64; SSIM's 2D window is its outer product."""
    if size < 1 or size % 2 == 0 or sigma <= 0:
        raise ValueError(f"`size` must be a positive odd int and `sigma` positive, got {size=}, {sigma=}")
    coords = torch.arange(size, dtype=torch.float64) - size // 2
    window = torch.exp(-coords.square() / (2 * sigma**2))
    return window / window.sum()


def _gaussian_filter(images: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """'valid' separable Gaussian filter of (N, 1, H, W)."""
    images = F.conv2d(images, window.view(1, 1, -1, 1))
    return F.conv2d(images, window.view(1, 1, 1, -1))


def ssim_map(
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    window_size: int = 11,
    sigma: float = 1.5,
    data_range: float = 255.0,
) -> torch.Tensor:
    """SSIM (Wang et al. 2004) of the luma at every valid window position: (T, H - size + 1, W - size + 1).

    Gaussian window (11, 1.5), K1 = 0.01, K2 = 0.03, no padding (the reference implementation's 'valid' filter).
    """
    pred, target = _check_pair(pred, target)
    if min(pred.shape[1:3]) < window_size:
        raise ValueError(f"frames must be at least `window_size`={window_size} pixels, got {tuple(pred.shape[1:3])}")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    x, y = (rearrange(_luma(v), "t h w -> t 1 h w") for v in (pred, target))
    window = gaussian_window(window_size, sigma)
    # one filter pass over the five statistics of every frame
    stats = _gaussian_filter(torch.cat([x, y, x * x, y * y, x * y]), window)
    mu_x, mu_y, xx, yy, xy = stats.chunk(5)
    var_x, var_y, cov = xx - mu_x.square(), yy - mu_y.square(), xy - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    denominator = (mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2)
    return (numerator / denominator)[:, 0]


def ssim(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, **kwargs) -> torch.Tensor:
    """Per-frame mean SSIM (T,) on the BT.601 luma of uint8 RGB frames."""
    return ssim_map(pred, target, **kwargs).mean(dim=(1, 2))


def _check_flow(flow: np.ndarray | torch.Tensor, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    flow = torch.as_tensor(flow, dtype=torch.float64)
    if tuple(flow.shape) != shape:
        raise ValueError(f"`{name}` must have shape {shape} (frames, H, W, (dx, dy)), got {tuple(flow.shape)}")
    return flow


def warp(frames: torch.Tensor, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample (N, C, H, W) `frames` at x + flow(x) (bilinear; flow (N, H, W, 2) in pixels, (dx, dy)).

    Returns the warped frames and a (N, H, W) mask of the pixels whose source lies inside the frame.
    """
    height, width = frames.shape[-2:]
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=flow.dtype), torch.arange(width, dtype=flow.dtype), indexing="ij"
    )
    source = torch.stack([xs, ys], dim=-1) + flow
    inside = (
        (source[..., 0] >= 0) & (source[..., 0] <= width - 1) & (source[..., 1] >= 0) & (source[..., 1] <= height - 1)
    )
    scale = torch.tensor([max(width - 1, 1), max(height - 1, 1)], dtype=flow.dtype)
    grid = (source / scale * 2 - 1).to(device=frames.device, dtype=frames.dtype)
    warped = F.grid_sample(frames, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return warped, inside.to(frames.device)


def consistency_mask(
    backward_flow: np.ndarray | torch.Tensor,
    forward_flow: np.ndarray | torch.Tensor,
    alpha: float = 0.01,
    beta: float = 0.5,
) -> torch.Tensor:
    """Pixels of frames 1..T-1 that are not occluded: (T-1, H, W) bool.

    `backward_flow[t-1]` maps frame t to frame t-1 and `forward_flow[t-1]` frame t-1 to frame t. Following a
    pixel back and then forward must return to it: |b + f(x + b)|^2 < alpha (|b|^2 + |f(x + b)|^2) + beta
    (Sundaram et al. 2010), and its source must lie inside frame t-1.
    """
    backward = torch.as_tensor(backward_flow, dtype=torch.float64)
    if backward.ndim != 4 or backward.shape[-1] != 2:
        raise ValueError(f"`backward_flow` must have shape (T-1, H, W, 2), got {tuple(backward.shape)}")
    forward = _check_flow(forward_flow, "forward_flow", tuple(backward.shape))
    forward_at_source, inside = warp(rearrange(forward, "n h w c -> n c h w"), backward)
    forward_at_source = rearrange(forward_at_source, "n c h w -> n h w c")
    round_trip = (backward + forward_at_source).square().sum(-1)
    bound = alpha * (backward.square().sum(-1) + forward_at_source.square().sum(-1)) + beta
    return inside & (round_trip < bound)


def warping_error(
    frames: np.ndarray | torch.Tensor,
    backward_flow: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None = None,
) -> float:
    """Temporal consistency of a video: mean |frame_t - warp(frame_{t-1}, flow_t)| over RGB on [0, 255].

    `backward_flow` (T-1, H, W, 2) maps each pixel of frame t (t >= 1) to its position in frame t-1; take it
    from the ground truth so that every method is judged against the same motion. Averaged over the pixels
    whose source lies inside the frame and, when given, where `mask` (T-1, H, W) is true (non-occluded).
    Lower is better; a video that follows the flow exactly scores 0. Blur lowers it too: on real clips a
    bicubic upsampling scores below the ground truth itself (see `relative_warping_error`).
    """
    video = _as_video(frames, "frames")
    return _mean_warp_residual(video, backward_flow, mask)


def relative_warping_error(
    frames: np.ndarray | torch.Tensor,
    ground_truth: np.ndarray | torch.Tensor,
    backward_flow: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None = None,
) -> float:
    """Flicker against the ground truth: the warping error of the error video `frames - ground_truth`.

    It measures the temporal change of the output that the ground truth does not have (as TecoGAN's tOF / tLP
    compare temporal statistics with the ground truth's): 0 for the ground truth, and, unlike `warping_error`, it
    does not reward blur. Same flow, mask and units as `warping_error`; lower is better.
    """
    pred, target = _check_pair(frames, ground_truth)
    return _mean_warp_residual(pred - target, backward_flow, mask, name="frames")


def warp_residual(
    video: torch.Tensor,
    backward_flow: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None = None,
    name: str = "frames",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel |v_t - warp(v_{t-1})|, averaged over channels, of float (T, H, W, C) `video`: the (T-1, H, W)
    residual and the bool mask of the pixels it is valid at (source inside the frame and `mask`). The warping
    errors are its mean over the valid pixels; breakdowns (e.g. by motion) average it over subsets."""
    if video.shape[0] < 2:
        raise ValueError(f"`{name}` must have at least 2 frames, got {video.shape[0]}")
    flow = _check_flow(backward_flow, "backward_flow", (video.shape[0] - 1, *video.shape[1:3], 2))
    video = rearrange(video, "t h w c -> t c h w")
    warped, valid = warp(video[:-1], flow)
    if mask is not None:
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(valid.shape):
            raise ValueError(
                f"`mask` must be bool of shape {tuple(valid.shape)}, got {mask.dtype} {tuple(mask.shape)}"
            )
        valid = valid & mask
    return (video[1:] - warped).abs().mean(dim=1), valid


def _mean_warp_residual(
    video: torch.Tensor,
    backward_flow: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None,
    name: str = "frames",
) -> float:
    """Mean of `warp_residual` over its valid pixels."""
    error, valid = warp_residual(video, backward_flow, mask, name)
    if not valid.any():
        raise ValueError("no valid pixel: the flow maps every pixel outside the frame or `mask` is all false")
    return float(error[valid].mean())


def clip_metrics(outputs: dict[str, np.ndarray], ground_truth: np.ndarray, flow_preset: str = "medium") -> dict:
    """Every method's figures on one clip, all uint8 (T, H, W, 3): PSNR and SSIM (means over frames), and two
    temporal figures against the ground truth's own DIS flow over the pixels whose forward-backward flow is
    consistent: the warping error (which blur lowers: the ground truth scores above bicubic) and the relative
    warping error, the flicker of the output's error. Adds the ground truth's own row and the consistent share."""
    from cascade_vsr.core.optical_flow import bidirectional_flow

    backward, forward = bidirectional_flow(ground_truth, preset=flow_preset)
    mask = consistency_mask(backward, forward)
    result = {
        name: {
            "psnr": float(psnr(frames, ground_truth).mean()),
            "ssim": float(ssim(frames, ground_truth).mean()),
            "warping_error": warping_error(frames, backward, mask),
            "relative_warping_error": relative_warping_error(frames, ground_truth, backward, mask),
        }
        for name, frames in outputs.items()
    }
    result["ground_truth"] = {
        "warping_error": warping_error(ground_truth, backward, mask),
        "relative_warping_error": 0.0,
    }
    result["consistent_flow_fraction"] = float(mask.double().mean())
    return result


def metrics_table(clips: dict[str, dict[str, dict]], labels: dict[str, str] | None = None) -> str:
    """A plain-text table of `clip_metrics` results: `clips[clip][method]` -> one row per clip and method (rows
    without PSNR, such as the ground truth's, leave those columns empty). `labels` renames methods."""
    labels = labels or {}
    names = [
        labels.get(method, method)
        for methods in clips.values()
        for method, m in methods.items()
        if isinstance(m, dict)
    ]
    width = max([12, *map(len, names)]) + 2
    rows = [f"{'clip':<14}{'method':<{width}}{'PSNR (dB)':>10}{'SSIM':>8}{'warp err':>10}{'rel. warp':>11}"]
    for clip, methods in clips.items():
        for method, m in methods.items():
            if not isinstance(m, dict):
                continue
            quality = f"{m['psnr']:10.2f}{m['ssim']:8.4f}" if "psnr" in m else f"{'':>10}{'':>8}"
            temporal = f"{m['warping_error']:10.3f}{m['relative_warping_error']:11.3f}"
            rows.append(f"{clip:<14}{labels.get(method, method):<{width}}{quality}{temporal}")
    return "\n".join(rows)
