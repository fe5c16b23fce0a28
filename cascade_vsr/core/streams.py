"""Frames in and out in chunks, so that memory does not grow with a video's length.

`VideoSource` reads a video file (anything PyAV decodes), a folder of PNG / JPEG frames or a glob of them, chunk by
chunk. `VideoSink` writes uint8 RGB chunks to a video file (codec chosen by the extension unless given; the source's
audio copied) or to a folder of lossless PNG frames. A sink writes under a temporary name and renames it into place
only when closed without error, so a failed run leaves no half-written output (and the next sink of the same path
removes what a killed one left).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

from cascade_vsr.core.video import check_video, frame_files, read_image_files, video_info

# extension -> (video codec, pixel format); anything else is an error naming the extension
CONTAINER_CODECS = {
    ".mp4": ("libx264", "yuv420p"),
    ".m4v": ("libx264", "yuv420p"),
    ".mov": ("libx264", "yuv420p"),
    ".mkv": ("libx264", "yuv420p"),
    ".webm": ("libvpx-vp9", "yuv420p"),
    ".avi": ("mpeg4", "yuv420p"),
}


class VideoSource:
    """Frames of a video file, a frame folder or a glob, read in order in chunks of uint8 (n, H, W, 3)."""

    def __init__(self, source: str | Path):
        self.source = Path(source)
        self.files = frame_files(source)
        if self.files:
            import cv2

            first = cv2.imread(str(self.files[0]), cv2.IMREAD_COLOR)
            if first is None:
                raise ValueError(f"`input`: {str(self.files[0])!r} is not a readable image")
            self.num_frames, self.height, self.width, self.fps = len(self.files), *first.shape[:2], 24.0
            self.has_audio = False
        elif self.source.is_file():
            info = video_info(self.source)  # ValueError naming the path when unreadable
            self.num_frames, self.height, self.width, self.fps = (
                info["num_frames"],
                info["height"],
                info["width"],
                info["fps"],
            )
            self.has_audio = _has_audio(self.source)
        else:
            raise ValueError(f"`input` {str(source)!r} is not a video file, a folder of PNG / JPEG frames or a glob")
        if self.num_frames < 1:
            raise ValueError(f"`input` {str(source)!r} has no frames")

    @property
    def name(self) -> str:
        return self.source.stem if self.source.is_file() else self.source.name

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        """Consecutive chunks of `size` frames (the last may be shorter)."""
        if size < 1:
            raise ValueError(f"`size` must be a positive number of frames, got {size}")
        if self.files:
            for start in range(0, len(self.files), size):
                yield read_image_files(self.files[start : start + size])
            return
        import av

        buffer = []
        with av.open(str(self.source)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):  # PyAV decodes one frame at a time
                buffer.append(frame.to_ndarray(format="rgb24"))
                if len(buffer) == size:
                    yield np.stack(buffer)
                    buffer = []
        if buffer:
            yield np.stack(buffer)


def _has_audio(path: Path) -> bool:
    import av

    with av.open(str(path)) as container:
        return bool(container.streams.audio)


def remove_stale_partials(path: Path) -> None:
    """Remove the temporary outputs of `path` left by processes that no longer run (a killed writer)."""
    for partial in path.parent.glob(f".{path.stem}.partial-*{path.suffix}"):
        pid = partial.name[len(f".{path.stem}.partial-") :].removesuffix(path.suffix)
        if not pid.isdigit() or _process_alive(int(pid)):
            continue
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class VideoSink:
    """Writes uint8 RGB chunks to `path`: a video file (by extension) or, for a path without one, a PNG folder.

    Use as a context manager: on a clean exit the temporary output is renamed to `path`; on an error it is removed.
    `audio_from` copies that file's first audio stream (packets as they are, no re-encoding).
    """

    def __init__(
        self,
        path: str | Path,
        fps: float = 24.0,
        codec: str | None = None,
        crf: int | None = 18,
        bitrate: int | None = None,
        pix_fmt: str | None = None,
        audio_from: str | Path | None = None,
        overwrite: bool = False,
    ):
        self.path = Path(path)
        self.is_video = bool(self.path.suffix)
        if self.path.exists() and not overwrite:
            raise ValueError(f"`output` {str(self.path)!r} exists; pass --overwrite to replace it")
        if self.is_video and self.path.suffix.lower() not in CONTAINER_CODECS and codec is None:
            raise ValueError(
                f"`output` {str(self.path)!r}: unknown video extension {self.path.suffix!r}; use one of "
                f"{sorted(CONTAINER_CODECS)} or a folder name (no extension) for PNG frames"
            )
        if not fps > 0:
            raise ValueError(f"`fps` must be positive, got {fps}")
        if crf is not None and not 0 <= crf <= 51:
            raise ValueError(f"`crf` must lie in [0, 51], got {crf}")
        if bitrate is not None and bitrate <= 0:
            raise ValueError(f"`bitrate` must be positive (bits/s), got {bitrate}")
        default_codec, default_pix_fmt = CONTAINER_CODECS.get(self.path.suffix.lower(), (None, "yuv420p"))
        self.codec, self.pix_fmt = codec or default_codec, pix_fmt or default_pix_fmt
        self.fps, self.crf, self.bitrate, self.audio_from = fps, crf, bitrate, audio_from
        if not self.path.parent.is_dir():
            raise ValueError(f"`output` {str(self.path)!r}: folder {str(self.path.parent)!r} does not exist")
        self.tmp = self.path.with_name(f".{self.path.stem}.partial-{os.getpid()}{self.path.suffix}")
        remove_stale_partials(self.path)
        self.frames_written = 0
        self._container = self._stream = self._audio_source = self._audio_out = None

    def __enter__(self) -> VideoSink:
        if self.is_video:
            import av

            self._container = av.open(str(self.tmp), mode="w")
        else:
            self.tmp.mkdir()
        return self

    def write(self, frames: np.ndarray) -> None:
        """Append uint8 RGB frames (n, H, W, 3)."""
        check_video(frames, "frames")
        if not self.is_video:
            import cv2

            for frame in frames:  # one PNG file per frame
                name = self.tmp / f"{self.frames_written:06d}.png"
                cv2.imwrite(str(name), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
                self.frames_written += 1
            return
        import av

        if self._stream is None:
            self._open_stream(frames.shape[1], frames.shape[2])
        pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2  # yuv420p needs even sizes
        if (pad_h or pad_w) and self.pix_fmt.startswith("yuv420"):
            frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        for frame in frames:
            for packet in self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                self._container.mux(packet)
            self.frames_written += 1

    def _open_stream(self, height: int, width: int) -> None:
        stream = self._container.add_stream(self.codec, rate=Fraction(self.fps).limit_denominator(1001))
        even = self.pix_fmt.startswith("yuv420")
        stream.width, stream.height = width + (width % 2 if even else 0), height + (height % 2 if even else 0)
        stream.pix_fmt = self.pix_fmt
        if self.bitrate is not None:
            stream.bit_rate = int(self.bitrate)
        elif self.crf is not None and self.codec in ("libx264", "libx264rgb", "libx265"):
            stream.options = {"crf": str(self.crf)}
        self._stream = stream
        if self.audio_from is not None:  # streams are all declared before the first packet is muxed
            import av

            self._audio_source = av.open(str(self.audio_from))
            if self._audio_source.streams.audio:
                self._audio_out = self._container.add_stream_from_template(self._audio_source.streams.audio[0])

    def _copy_audio(self) -> None:
        for packet in self._audio_source.demux(self._audio_source.streams.audio[0]):
            if packet.dts is None:  # the demuxer's final empty packet
                continue
            packet.stream = self._audio_out
            self._container.mux(packet)

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if self.is_video:
                if exc_type is None and self._stream is not None:
                    for packet in self._stream.encode():
                        self._container.mux(packet)
                    if self._audio_out is not None:
                        self._copy_audio()
                self._container.close()
                if self._audio_source is not None:
                    self._audio_source.close()
            if exc_type is None and self.frames_written == 0:
                raise ValueError(f"`output` {str(self.path)!r}: no frames were written")
        except BaseException:
            self._remove_tmp()
            raise
        if exc_type is not None:
            self._remove_tmp()
            return
        if self.path.is_dir():
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)

    def _remove_tmp(self) -> None:
        if self.tmp.is_dir():
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            self.tmp.unlink(missing_ok=True)
