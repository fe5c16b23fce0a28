"""Flow-based degradation (SimpleGVR section 4.2.1): the motion artifacts of large T2V models.

T2V decoders rarely add noise or compression; they smear the previous frame's colours into moving
regions and blur along the motion. We estimate the motion with DIS optical flow, blend previous-frame
colours into elliptical patches of the moving regions, then blur moving blocks with line kernels
aligned with the local flow. Pixels of static blocks are returned bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from einops import rearrange

from cascade_vsr.core.optical_flow import DIS_PRESETS, compute_flow
from cascade_vsr.core.video import check_video
from cascade_vsr.degradations.common import check_range, uniform


@dataclass
class FlowDegradationConfig:
    """Parameters of `FlowBasedDegradation`; (min, max) pairs are sampled once per clip from the seed."""

    dis_preset: str = "fast"  # DIS optical-flow preset: ultrafast | fast | medium
    flow_scale: float = 1.0  # estimate the flow at this fraction of the resolution (faster for large frames)
    motion_threshold: float = 1.0  # px/frame; blocks and pixels moving slower stay untouched
    num_ellipses: tuple[int, int] = (2, 6)  # colour-blending ellipses per frame
    ellipse_axes: tuple[float, float] = (0.05, 0.2)  # semi-axes, as a fraction of min(H, W)
    blend_strength: tuple[float, float] = (0.3, 0.7)  # blending weight at an ellipse centre
    color_samples: int = 16  # Gaussian samples averaged into an ellipse's colour
    color_sigma: float = 0.3  # std of the colour samples, in units of the ellipse's semi-axes
    block_size: int = 16  # motion-blur block size in pixels
    num_directions: int = 8  # quantized kernel directions over [0, pi)
    kernel_lengths: tuple[int, ...] = (3, 5, 9, 15, 21)  # quantized kernel lengths (odd)
    blur_length_scale: tuple[float, float] = (0.8, 1.5)  # kernel length per px/frame of block motion
    blur_strength: tuple[float, float] = (0.6, 1.0)  # weight of the blurred frame at full motion
    full_blur_motion: float = 8.0  # px/frame at which a block reaches the full blur strength

    def __post_init__(self):
        if self.dis_preset not in DIS_PRESETS:
            raise ValueError(f"`dis_preset` must be one of {sorted(DIS_PRESETS)}, got {self.dis_preset!r}")
        if not 0 < self.flow_scale <= 1:
            raise ValueError(f"`flow_scale` must be in (0, 1], got {self.flow_scale}")
        check_range(self.num_ellipses, "num_ellipses", 0)
        check_range(self.ellipse_axes, "ellipse_axes", 0)
        check_range(self.blend_strength, "blend_strength", 0, 1)
        check_range(self.blur_length_scale, "blur_length_scale", 0)
        check_range(self.blur_strength, "blur_strength", 0, 1)
        if self.block_size < 1 or self.num_directions < 1 or self.color_samples < 1:
            raise ValueError(
                "`block_size`, `num_directions` and `color_samples` must be >= 1, got "
                f"{self.block_size}, {self.num_directions}, {self.color_samples}"
            )
        if not self.kernel_lengths or any(k < 1 or k % 2 == 0 for k in self.kernel_lengths):
            raise ValueError(f"`kernel_lengths` must be odd positive ints, got {self.kernel_lengths!r}")


def line_kernel(length: int, angle: float) -> np.ndarray:
    """A normalized anti-aliased line of `length` px through the centre of a (length, length) kernel,
    at `angle` radians in image coordinates (x right, y down)."""
    radius = (length - 1) / 2
    ys, xs = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    direction = np.array([np.cos(angle), np.sin(angle)])
    along = np.clip(xs * direction[0] + ys * direction[1], -radius, radius)
    distance = np.hypot(xs - along * direction[0], ys - along * direction[1])
    kernel = np.clip(1 - distance, 0, 1).astype(np.float32)
    return kernel / kernel.sum()


def kernel_bank(num_directions: int, lengths: tuple[int, ...]) -> list[np.ndarray]:
    """Kernels indexed by direction * len(lengths) + length index."""
    return [line_kernel(length, d * np.pi / num_directions) for d in range(num_directions) for length in lengths]


def pool(flow: np.ndarray, step: int) -> np.ndarray:
    """Mean flow of each (step x step) cell: (T, H, W, 2) -> (T, ceil(H/step), ceil(W/step), 2); one cv2 area
    resize of the frames stacked into a tall image (edge-padded to whole cells first when needed)."""
    num, height, width = flow.shape[:3]
    cells_y, cells_x = -(-height // step), -(-width // step)
    if cells_y * step != height or cells_x * step != width:
        flow = np.pad(flow, ((0, 0), (0, cells_y * step - height), (0, cells_x * step - width), (0, 0)), mode="edge")
    tall = np.ascontiguousarray(flow, dtype=np.float32).reshape(num * cells_y * step, cells_x * step, 2)
    pooled = cv2.resize(tall, (cells_x, num * cells_y), interpolation=cv2.INTER_AREA)
    return pooled.reshape(num, cells_y, cells_x, 2)


class FlowBasedDegradation:
    """Colour blending from the previous frame plus motion-adaptive block blur, driven by DIS flow.

    `FlowBasedDegradation(config)(frames, seed)` maps uint8 (T, H, W, 3) to the same shape and dtype;
    frame 0 (which has no previous frame) and static blocks are returned unchanged.
    """

    def __init__(self, config: FlowDegradationConfig | None = None):
        self.config = config or FlowDegradationConfig()
        self.kernels = kernel_bank(self.config.num_directions, self.config.kernel_lengths)

    def sample_params(self, rng: np.random.Generator) -> dict:
        c = self.config
        return {
            "blend_strength": uniform(rng, c.blend_strength),
            "blur_length_scale": uniform(rng, c.blur_length_scale),
            "blur_strength": uniform(rng, c.blur_strength),
        }

    def __call__(self, frames: np.ndarray, seed: int = 0) -> np.ndarray:
        return self.apply(frames, seed)[0]

    def apply(self, frames: np.ndarray, seed: int = 0, flow: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        """Degrade `frames`; returns (frames, params). `flow` (T-1, H, W, 2) may be passed when already computed."""
        frames = check_video(frames, "frames", min_frames=2)
        c = self.config
        rng = np.random.default_rng(seed)
        params = self.sample_params(rng)
        if flow is None:
            flow = compute_flow(frames, c.dis_preset, c.flow_scale)
        num_pairs, height, width = flow.shape[:3]
        out = frames.copy()
        field = self._colour_field(frames, flow, params, rng)
        if field is not None:
            self._blend_cells_(out[1:], *field)
        labels, intensity = self._block_blur_maps(flow, params)
        self._blur_blocks_(out[1:], labels, intensity)
        return out, params

    def _colour_field(self, frames, flow, params, rng) -> tuple[np.ndarray, np.ndarray]:
        """Distance-weighted ellipses inside the moving regions, each filled with the mean of Gaussian
        samples of the previous frame around the flow-mapped ellipse centre.

        Returns the blending weight (T-1, h, w) and colour (T-1, h, w, 3) on a grid of `step`-pixel cells (both are
        smooth; `_blend_cells_` upsamples them bilinearly), and `step`; None when nothing is blended."""
        c = self.config
        num_pairs, height, width = flow.shape[:3]
        num = int(c.num_ellipses[1])
        step = 8
        grid_h, grid_w = -(-height // step), -(-width // step)
        if num == 0 or params["blend_strength"] == 0:
            return None
        counts = rng.integers(c.num_ellipses[0], c.num_ellipses[1] + 1, size=num_pairs)
        # centres: uniformly among the moving cells of each frame (random keys, top-k per frame)
        grid_flow = pool(flow, step)  # (T-1, grid_h, grid_w, 2) mean flow of each cell
        grid_moving = np.linalg.norm(grid_flow, axis=-1) > c.motion_threshold  # static cells get no blending
        keys = np.where(grid_moving.reshape(num_pairs, -1), rng.random((num_pairs, grid_h * grid_w), np.float32), -1.0)
        index = np.argpartition(-keys, min(num, keys.shape[1]) - 1, axis=1)[:, :num]
        num = index.shape[1]
        valid = (np.take_along_axis(keys, index, 1) >= 0) & (np.arange(num)[None] < counts[:, None])
        cell_y, cell_x = np.divmod(index, grid_w)  # (T-1, K)
        centre_flow = grid_flow.reshape(num_pairs, -1, 2)[np.arange(num_pairs)[:, None], index]  # (T-1, K, 2)
        cy, cx = cell_y * step + step // 2, cell_x * step + step // 2
        angle = np.arctan2(centre_flow[..., 1], centre_flow[..., 0])  # major axis along the motion
        major = rng.uniform(*c.ellipse_axes, size=(num_pairs, num)) * min(height, width) + 1
        minor = major * rng.uniform(0.4, 1.0, size=(num_pairs, num))
        strength = params["blend_strength"] * valid

        # colours: Gaussian samples around the centre's position in the previous frame, averaged in RGB
        noise = rng.standard_normal((num_pairs, num, c.color_samples, 2)) * c.color_sigma
        cos, sin = np.cos(angle)[..., None], np.sin(angle)[..., None]
        offset_x = noise[..., 0] * major[..., None] * cos - noise[..., 1] * minor[..., None] * sin
        offset_y = noise[..., 0] * major[..., None] * sin + noise[..., 1] * minor[..., None] * cos
        sample_x = np.clip(np.rint(cx[..., None] + centre_flow[..., None, 0] + offset_x), 0, width - 1).astype(int)
        sample_y = np.clip(np.rint(cy[..., None] + centre_flow[..., None, 1] + offset_y), 0, height - 1).astype(int)
        frame_index = np.arange(num_pairs)[:, None, None]
        colour = frames[:-1][frame_index, sample_y, sample_x].astype(np.float32).mean(axis=2)  # (T-1, K, 3)

        # distance-based weights, 1 at the centre and 0 on the ellipse boundary
        f32 = np.float32
        grid_y = (np.arange(grid_h, dtype=f32) * step + (step - 1) / 2)[None, None, :, None]
        grid_x = (np.arange(grid_w, dtype=f32) * step + (step - 1) / 2)[None, None, None, :]
        dx, dy = grid_x - cx[..., None, None].astype(f32), grid_y - cy[..., None, None].astype(f32)
        cos = (np.cos(angle) / major).astype(f32)[..., None, None]
        sin = (np.sin(angle) / major).astype(f32)[..., None, None]
        ratio = (major / minor).astype(f32)[..., None, None]
        u = dx * cos + dy * sin  # along the major axis, in units of the major semi-axis
        v = (dy * cos - dx * sin) * ratio
        weight = np.clip(1 - np.sqrt(u * u + v * v), 0, 1) * strength.astype(f32)[..., None, None]
        total = (1 - np.prod(1 - weight, axis=1)) * grid_moving  # (T-1, h, w)
        field = (
            rearrange(weight, "t k h w -> t (h w) k")
            @ colour
            / np.maximum(weight.sum(axis=1), 1e-6).reshape(num_pairs, -1, 1)
        )
        return total.astype(f32), field.reshape(num_pairs, grid_h, grid_w, 3).astype(f32), step

    @staticmethod
    def _blend_cells_(frames: np.ndarray, weight: np.ndarray, colour: np.ndarray, step: int) -> None:
        """In place: frames += w * (colour - frames), with w and colour upsampled bilinearly (cv2 INTER_LINEAR
        convention, edge-clamped) from the cell grid, on the cells where w can be nonzero only.

        A pixel of a cell interpolates between that cell and its 3 x 3 neighbourhood, so one small separable
        interpolation matrix gives every active cell's (step x step) weights and colours from its neighbourhood;
        pixels are gathered and scattered by flat index. Pixels with w = 0 are never written."""
        num, height, width = frames.shape[:3]
        grid_h, grid_w = weight.shape[1:]
        windows = np.lib.stride_tricks.sliding_window_view
        # active cells: a nonzero weight in the 3 x 3 neighbourhood (one dilation of the frames stacked tall;
        # the rows it leaks across frames only add cells whose weights come out 0)
        active = cv2.dilate((weight > 0).view(np.uint8).reshape(-1, grid_w), np.ones((3, 3), np.uint8))
        t, cy, cx = np.nonzero(active.reshape(weight.shape))
        if len(t) == 0:
            return
        padded_weight = np.pad(weight, ((0, 0), (1, 1), (1, 1)), mode="edge")
        padded_colour = np.pad(colour, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        offset = (np.arange(step) + 0.5) / step - 0.5  # source position of each pixel relative to its cell
        interp = np.stack([np.maximum(-offset, 0), 1 - np.abs(offset), np.maximum(offset, 0)], axis=1)  # (step, 3)
        interp = interp.astype(np.float32)
        tile_weight = interp @ windows(padded_weight, (3, 3), axis=(1, 2))[t, cy, cx] @ interp.T  # (N, step, step)
        near_colour = windows(padded_colour, (3, 3), axis=(1, 2))[t, cy, cx]  # (N, C, 3, 3)
        tile_colour = rearrange(interp @ near_colour @ interp.T, "n c o p -> n o p c")
        rows = (cy * step)[:, None] + np.arange(step)  # (N, step)
        cols = (cx * step)[:, None] + np.arange(step)
        flat = ((t * height)[:, None] + rows)[:, :, None] * width + cols[:, None, :]
        if grid_h * step != height or grid_w * step != width:  # partial cells on the bottom / right edge
            inside = (rows < height)[:, :, None] & (cols < width)[:, None, :]
            flat, tile_weight, tile_colour = flat[inside], tile_weight[inside], tile_colour[inside]
        flat, tile_weight, tile_colour = flat.reshape(-1), tile_weight.reshape(-1, 1), tile_colour.reshape(-1, 3)
        pixels = frames.reshape(-1, 3)
        current = pixels[flat].astype(np.float32)
        # w = 0 gives back the current value exactly
        pixels[flat] = np.clip(np.rint(current + tile_weight * (tile_colour - current)), 0, 255).astype(np.uint8)

    def _block_blur_maps(self, flow, params) -> tuple[np.ndarray, np.ndarray]:
        """Kernel label (-1 = no blur) and blur intensity of each block: (T-1, blocks_y, blocks_x)."""
        c = self.config
        block_flow = pool(flow, c.block_size)
        magnitude = np.linalg.norm(block_flow, axis=-1)
        direction = np.mod(np.arctan2(block_flow[..., 1], block_flow[..., 0]), np.pi)
        direction_index = np.rint(direction / (np.pi / c.num_directions)).astype(int) % c.num_directions
        lengths = np.asarray(c.kernel_lengths)
        wanted = magnitude * params["blur_length_scale"]
        length_index = np.abs(wanted[..., None] - lengths).argmin(axis=-1)
        moving = (magnitude > c.motion_threshold) & (wanted >= 2) & (params["blur_strength"] > 0)
        labels = np.where(moving, direction_index * len(lengths) + length_index, -1)
        intensity = np.where(moving, params["blur_strength"] * np.clip(magnitude / c.full_blur_motion, 0, 1), 0)
        return labels, intensity.astype(np.float32)

    def _blur_blocks_(self, frames: np.ndarray, labels: np.ndarray, intensity: np.ndarray) -> None:
        """In place: blend each moving block with its line-kernel blur, `intensity` strong; other blocks stay
        bit-exact.

        Per kernel of the bank in use: gather its blocks with a halo of neighbouring pixels (edge-replicated at
        the frame border) from all frames into one batch of tiles, one cv2.filter2D over the tiles stacked into a
        tall image (the halo absorbs the seams between tiles) and one blend. All tiles are gathered before any is
        written back, so every block is blurred from the unblurred frame."""
        block = self.config.block_size
        num, height, width = frames.shape[:3]
        pixels = frames.reshape(-1, 3)  # flat pixel indices: one take / put per kernel instead of 3-d indexing
        inner = np.arange(block)
        results = []
        for label in np.unique(labels[labels >= 0]):
            kernel = self.kernels[label]
            radius = kernel.shape[0] // 2
            t, by, bx = np.nonzero(labels == label)
            span = np.arange(block + 2 * radius) - radius
            rows = np.clip((by * block)[:, None] + span, 0, height - 1) + (t * height)[:, None]  # edge-replicated
            cols = np.clip((bx * block)[:, None] + span, 0, width - 1)
            tiles = pixels[rows[:, :, None] * width + cols[:, None, :]]  # (N, B + 2r, B + 2r, 3)
            tall = rearrange(tiles, "n h w c -> (n h) w c")
            blurred = cv2.filter2D(tall, -1, kernel)
            crop = (slice(None), slice(radius, radius + block), slice(radius, radius + block))
            sharp = rearrange(tiles[crop], "n h w c -> (n h) w c")
            blurred = rearrange(rearrange(blurred, "(n h) w c -> n h w c", n=len(t))[crop], "n h w c -> (n h) w c")
            weight = np.repeat(intensity[t, by, bx], block)[:, None] * np.ones((1, block), np.float32)
            mixed = cv2.blendLinear(blurred, np.ascontiguousarray(sharp), weight, 1 - weight)
            results.append((t, by, bx, mixed.reshape(len(t), block, block, 3)))
        if not results:
            return
        t, by, bx, mixed = (np.concatenate(parts) for parts in zip(*results))
        rows = (t * height + by * block)[:, None] + inner  # (N, B)
        cols = (bx * block)[:, None] + inner
        flat = rows[:, :, None] * width + cols[:, None, :]
        if labels.shape[1] * block != height or labels.shape[2] * block != width:  # partial edge blocks
            inside = ((by * block)[:, None] + inner < height)[:, :, None] & (cols < width)[:, None, :]
            flat, mixed = flat[inside], mixed[inside]
        pixels[flat.reshape(-1)] = mixed.reshape(-1, 3)
