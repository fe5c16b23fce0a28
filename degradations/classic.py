"""Classic (Real-ESRGAN / RealBasicVSR style) degradations for video, written for temporal smoothness.

One order = blur -> resize -> noise -> JPEG; `order=2` runs it twice with independent parameters, and a real
video codec (libx264 or mpeg4 through PyAV, in memory) runs once at the end. Continuous parameters drift per
frame as a clipped random walk, so the degradation flickers like real footage rather than per frame at random.
Every stage is batched over frames except the per-image JPEG and the codec, which are sequential by nature.

A clip's degradation is a function of its frames and seed only, bit for bit, whatever the machine's load and
thread counts: the codecs encode and decode on one thread (libx264's output depends on its thread count, which
it takes from the CPUs the process may use), libx264 runs without mbtree (not reproducible) and the bilinear resize runs on one torch thread (torch's CPU kernel
rounds differently when it splits the work across threads).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from cascade_vsr.core.video import check_video, resize_video
from cascade_vsr.degradations.common import check_range, uniform

KERNEL_TYPES = ("iso", "aniso", "generalized", "plateau", "sinc")
RESIZE_MODES = ("area", "bilinear", "bicubic")
CODECS = ("libx264", "mpeg4")
MAX_CRF = 51  # libx264's CRF range is [0, 51]


@dataclass
class ClassicDegradationConfig:
    """Parameters of `ClassicDegradation`; (min, max) pairs are sampled per clip from the seed."""

    order: int = 1  # 1 or 2 rounds of blur -> resize -> noise -> JPEG
    blur_prob: float = 1.0
    kernel_types: tuple[str, ...] = KERNEL_TYPES
    kernel_probs: tuple[float, ...] = (0.4, 0.3, 0.1, 0.1, 0.1)
    kernel_size: tuple[int, int] = (7, 21)  # odd sizes in this range
    blur_sigma: tuple[float, float] = (0.2, 3.0)  # Gaussian std (px), per axis for anisotropic kernels
    generalized_beta: tuple[float, float] = (0.5, 4.0)  # shape of the generalized Gaussian
    plateau_beta: tuple[float, float] = (1.0, 2.0)  # shape of the plateau kernel
    sinc_cutoff: tuple[float, float] = (np.pi / 3, np.pi)  # cutoff frequency of the sinc (ringing) kernel
    resize_prob: float = 1.0
    resize_scale: tuple[float, float] = (0.5, 1.5)  # intermediate scale; the output returns to the input size
    resize_modes: tuple[str, ...] = RESIZE_MODES
    noise_prob: float = 1.0
    gaussian_noise_prob: float = 0.5  # else Poisson
    gaussian_sigma: tuple[float, float] = (1.0, 20.0)  # std in uint8 units
    poisson_scale: tuple[float, float] = (0.05, 2.0)
    gray_noise_prob: float = 0.4
    jpeg_prob: float = 1.0
    jpeg_quality: tuple[float, float] = (40.0, 95.0)
    video_prob: float = 1.0
    codecs: tuple[str, ...] = CODECS
    crf: tuple[float, float] = (20.0, 35.0)  # libx264
    bits_per_pixel: tuple[float, float] = (0.05, 0.4)  # mpeg4 bit rate, per pixel and frame
    fps: float = 24.0
    drift: float = 0.03  # per-frame random-walk step, as a fraction of each parameter's range

    def __post_init__(self):
        if self.order not in (1, 2):
            raise ValueError(f"`order` must be 1 or 2, got {self.order!r}")
        unknown = [k for k in self.kernel_types if k not in KERNEL_TYPES]
        if unknown or len(self.kernel_probs) != len(self.kernel_types) or not self.kernel_types:
            raise ValueError(
                f"`kernel_types` must be a non-empty subset of {KERNEL_TYPES} with one `kernel_probs` entry each, "
                f"got {self.kernel_types!r} / {self.kernel_probs!r}"
            )
        if not self.resize_modes or any(m not in RESIZE_MODES for m in self.resize_modes):
            raise ValueError(f"`resize_modes` must be a non-empty subset of {RESIZE_MODES}, got {self.resize_modes!r}")
        if not self.codecs or any(c not in CODECS for c in self.codecs):
            raise ValueError(f"`codecs` must be a non-empty subset of {CODECS}, got {self.codecs!r}")
        for name in ("blur_sigma", "resize_scale", "gaussian_sigma", "poisson_scale", "bits_per_pixel"):
            check_range(getattr(self, name), name, 0)
        check_range(self.kernel_size, "kernel_size", 1)
        if any(int(k) != k for k in self.kernel_size):
            raise ValueError(f"`kernel_size` must be a (min, max) pair of whole numbers, got {self.kernel_size!r}")
        check_range(self.crf, "crf", 0, MAX_CRF)
        check_range(self.jpeg_quality, "jpeg_quality", 1, 100)
        for name in ("generalized_beta", "plateau_beta", "sinc_cutoff"):
            check_range(getattr(self, name), name, 0)
        if any(not (math.isfinite(p) and p >= 0) for p in self.kernel_probs) or not sum(self.kernel_probs) > 0:
            raise ValueError(f"`kernel_probs` must be finite, >= 0 and not all 0, got {self.kernel_probs!r}")
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"`fps` must be a finite number > 0, got {self.fps!r}")
        if not (math.isfinite(self.drift) and self.drift >= 0):
            raise ValueError(f"`drift` must be a finite number >= 0, got {self.drift!r}")
        for name in (
            "blur_prob",
            "resize_prob",
            "noise_prob",
            "gaussian_noise_prob",
            "gray_noise_prob",
            "jpeg_prob",
            "video_prob",
        ):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"`{name}` must be a probability in [0, 1], got {getattr(self, name)}")


def random_walk(rng: np.random.Generator, start: float, bounds: tuple[float, float], steps: int, drift: float):
    """`steps` values starting at `start`, moving by N(0, drift * range) per step, clipped to `bounds`."""
    span = bounds[1] - bounds[0]
    walk = start + np.concatenate([[0.0], np.cumsum(rng.normal(0, drift * span, steps - 1))])
    return np.clip(walk, bounds[0], bounds[1])


def blur_kernels(
    kind: str, size: int, sigma_x: np.ndarray, sigma_y: np.ndarray, theta: np.ndarray, beta: float, cutoff: np.ndarray
) -> np.ndarray:
    """One normalized (size, size) kernel per frame: (T, size, size) float32, batched over the per-frame params."""
    radius = size // 2
    ys, xs = np.mgrid[-radius : radius + 1, -radius : radius + 1].astype(np.float64)
    if kind == "sinc":
        r = np.hypot(xs, ys)[None]
        wc = cutoff[:, None, None]
        safe = np.where(r == 0, 1.0, r)
        j1 = torch.special.bessel_j1(torch.from_numpy(wc * safe)).numpy()
        kernel = np.where(r == 0, wc**2 / (4 * np.pi), wc * j1 / (2 * np.pi * safe))
    else:
        if kind == "iso":
            sigma_y, theta = sigma_x, np.zeros_like(theta)
        cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
        u, v = xs * cos + ys * sin, -xs * sin + ys * cos  # rotate into the kernel's axes
        quad = (u / sigma_x[:, None, None]) ** 2 + (v / sigma_y[:, None, None]) ** 2  # x^T Sigma^-1 x
        if kind in ("iso", "aniso"):
            kernel = np.exp(-0.5 * quad)
        elif kind == "generalized":
            kernel = np.exp(-0.5 * quad**beta)
        else:  # plateau
            kernel = 1 / (1 + quad**beta)
    return (kernel / kernel.sum(axis=(1, 2), keepdims=True)).astype(np.float32)


def encode_video(frames: np.ndarray, codec: str, fps: float, crf: float, bit_rate: int) -> np.ndarray:
    """Round trip uint8 (T, H, W, 3) through a real codec in memory (yuv420p; odd sizes edge-padded).

    Encoder and decoder run on one thread with fixed options, and libx264 without its macroblock tree (whose
    output varies from run to run), so the result is the same bit for bit on every run and machine load (libx264
    and mpeg4 otherwise choose their threads, and so their output, from the usable CPUs)."""
    import av

    if codec not in CODECS:
        raise ValueError(f"`codec` must be one of {CODECS}, got {codec!r}")
    if codec == "libx264" and not 0 <= round(crf) <= MAX_CRF:
        raise ValueError(f"`crf` must lie in [0, {MAX_CRF}] (libx264), got {crf}")
    frames = check_video(frames, "frames")
    height, width = frames.shape[1:3]
    padded = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = padded.shape[2], padded.shape[1], "yuv420p"
        stream.codec_context.thread_count = 1
        if codec == "libx264":
            stream.options = {
                "crf": str(round(crf)),
                "preset": "veryfast",
                "threads": "1",
                # mbtree reads memory it never wrote: with it, the same frames encode to a few different streams
                # (measured: up to 5 in 300 runs, more under load); without threads, the stream does not depend
                # on the CPU count either
                "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0:sync-lookahead=0:mbtree=0",
            }
        else:
            stream.options = {"threads": "1"}
            stream.bit_rate = int(bit_rate)
        for frame in padded:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    buffer.seek(0)
    with av.open(buffer, mode="r") as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    if len(decoded) != len(frames):
        raise RuntimeError(f"codec {codec} returned {len(decoded)} frames for {len(frames)}")
    return decoded[:, :height, :width]


class ClassicDegradation:
    """`ClassicDegradation(order=1|2)` or `ClassicDegradation(config)`: uint8 (T, H, W, 3) -> same shape and dtype."""

    def __init__(self, config: ClassicDegradationConfig | None = None, order: int | None = None):
        config = config or ClassicDegradationConfig()
        if order is not None:
            config = ClassicDegradationConfig(**{**config.__dict__, "order": order})
        self.config = config

    def __call__(self, frames: np.ndarray, seed: int = 0) -> np.ndarray:
        return self.apply(frames, seed)[0]

    def apply(self, frames: np.ndarray, seed: int = 0) -> tuple[np.ndarray, dict]:
        """Degrade `frames`; returns (frames, params) with the clip-level parameters of every stage."""
        frames = check_video(frames, "frames")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"`seed` must be a non-negative int, got {seed!r}")
        c = self.config
        rng = np.random.default_rng(seed)
        num_frames, height, width = frames.shape[:3]
        video = rearrange(torch.from_numpy(frames).float(), "t h w c -> t c h w") / 255
        params: dict = {"order": c.order, "stages": []}
        for _ in range(c.order):
            stage: dict = {}
            if rng.random() < c.blur_prob:
                video = self._blur(video, rng, stage)
            if rng.random() < c.resize_prob:
                scale = uniform(rng, c.resize_scale)
                mode = c.resize_modes[rng.integers(len(c.resize_modes))]
                size = (max(2, round(video.shape[2] * scale)), max(2, round(video.shape[3] * scale)))
                video = resize(video, size, mode)
                stage["resize"] = {"scale": scale, "mode": mode}
            if rng.random() < c.noise_prob:
                video = self._noise(video, rng, stage)
            if rng.random() < c.jpeg_prob:
                video = self._jpeg(video, rng, stage)
            params["stages"].append(stage)
        if video.shape[-2:] != (height, width):
            mode = c.resize_modes[rng.integers(len(c.resize_modes))]
            video = resize(video, (height, width), mode)
            params["final_resize"] = mode
        out = to_uint8(video)
        if rng.random() < c.video_prob:
            codec = c.codecs[rng.integers(len(c.codecs))]
            crf, bpp = uniform(rng, c.crf), uniform(rng, c.bits_per_pixel)
            out = encode_video(out, codec, c.fps, crf, round(bpp * height * width * c.fps))
            params["video"] = {
                "codec": codec,
                **({"crf": round(crf)} if codec == "libx264" else {"bits_per_pixel": bpp}),
            }
        return out, params

    def _walk(self, rng, bounds, steps) -> np.ndarray:
        return random_walk(rng, uniform(rng, bounds), bounds, steps, self.config.drift)

    def _blur(self, video: torch.Tensor, rng, stage: dict) -> torch.Tensor:
        c = self.config
        num = video.shape[0]
        kind = c.kernel_types[rng.choice(len(c.kernel_types), p=np.asarray(c.kernel_probs) / sum(c.kernel_probs))]
        sizes = np.arange(c.kernel_size[0] | 1, c.kernel_size[1] + 1, 2)
        size = int(rng.choice(sizes)) if len(sizes) else int(c.kernel_size[0] | 1)
        sigma_x, sigma_y = self._walk(rng, c.blur_sigma, num), self._walk(rng, c.blur_sigma, num)
        theta = self._walk(rng, (0.0, np.pi), num)
        beta = uniform(rng, c.generalized_beta if kind == "generalized" else c.plateau_beta)
        cutoff = self._walk(rng, c.sinc_cutoff, num)
        kernels = torch.from_numpy(blur_kernels(kind, size, sigma_x, sigma_y, theta, beta, cutoff))
        stage["blur"] = {
            "kernel": kind,
            "size": size,
            "sigma": [float(sigma_x[0]), float(sigma_y[0])],
            "beta": beta,
            "cutoff": float(cutoff[0]),
        }
        return filter_frames(video, kernels)

    def _noise(self, video: torch.Tensor, rng, stage: dict) -> torch.Tensor:
        c = self.config
        num = video.shape[0]
        gray = rng.random() < c.gray_noise_prob
        frames = video.numpy()
        shape = (num, 1, *frames.shape[2:]) if gray else frames.shape
        if rng.random() < c.gaussian_noise_prob:
            sigma = self._walk(rng, c.gaussian_sigma, num) / 255
            noise = rng.standard_normal(shape, dtype=np.float32) * sigma.astype(np.float32)[:, None, None, None]
            stage["noise"] = {"type": "gaussian", "gray": bool(gray), "sigma": float(sigma[0] * 255)}
        else:
            scale = self._walk(rng, c.poisson_scale, num).astype(np.float32)[:, None, None, None]
            source = frames.mean(axis=1, keepdims=True) if gray else frames
            levels = 256.0
            noise = (rng.poisson(np.clip(source, 0, 1) * levels) / levels - source).astype(np.float32) * scale
            stage["noise"] = {"type": "poisson", "gray": bool(gray), "scale": float(scale[0, 0, 0, 0])}
        return torch.from_numpy(np.clip(frames + noise, 0, 1))

    def _jpeg(self, video: torch.Tensor, rng, stage: dict) -> torch.Tensor:
        quality = np.rint(self._walk(rng, self.config.jpeg_quality, video.shape[0])).astype(int)
        frames = to_uint8(video)
        # JPEG is a per-image codec: one encode/decode per frame
        decoded = np.stack(
            [
                cv2.cvtColor(
                    cv2.imdecode(
                        cv2.imencode(".jpg", cv2.cvtColor(f, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(q)])[
                            1
                        ],
                        cv2.IMREAD_COLOR,
                    ),
                    cv2.COLOR_BGR2RGB,
                )
                for f, q in zip(frames, quality)
            ]
        )
        stage["jpeg"] = {"quality": int(quality[0])}
        return rearrange(torch.from_numpy(decoded).float(), "t h w c -> t c h w") / 255


def filter_frames(video: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Filter frame t of (T, C, H, W) with the centrally symmetric kernel t of (T, k, k), reflect-padded.

    Batched through the FFT (cost independent of the kernel size, which reaches 21 x 21): with the image padded
    by 2r and the kernel at the origin, the circular convolution at index j + 2r equals the padded linear one."""
    size = kernels.shape[-1]
    radius = size // 2
    height, width = video.shape[-2:]
    mode = "reflect" if min(height, width) > radius else "replicate"
    padded = F.pad(video, (radius, radius, radius, radius), mode=mode)
    # FFT sizes rounded up to multiples of 32 (sizes with large prime factors are several times slower);
    # the extra zeros lie past every index that is read back, so nothing wraps around
    shape = tuple(-(-n // 32) * 32 for n in padded.shape[-2:])
    spectrum = torch.fft.rfft2(padded, s=shape) * torch.fft.rfft2(kernels[:, None].to(video.dtype), s=shape)
    filtered = torch.fft.irfft2(spectrum, s=shape)
    return filtered[..., 2 * radius : 2 * radius + height, 2 * radius : 2 * radius + width]


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch CPU kernels on one thread inside the block (restoring the thread count after it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def resize(video: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """`resize_video` of (T, C, H, W) in [0, 1], clamped back into [0, 1] where the filter can overshoot.

    On one torch thread: the CPU bilinear kernel's rounding depends on how it splits the work across threads
    (1 ulp, enough to flip a uint8 level), which would make a clip's degradation depend on the thread count."""
    with one_torch_thread() if video.device.type == "cpu" else contextlib.nullcontext():
        resized = resize_video(video, size, mode)
    return resized if mode == "area" else resized.clamp(0, 1)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(
        rearrange((video.clamp(0, 1) * 255).round().to(torch.uint8), "t c h w -> t h w c").numpy()
    )
