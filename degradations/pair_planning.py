"""Which clips a pair dataset holds: the input videos, the clips cut from them, their ids and seeds.

A clip's id depends only on its source path and start frame, and its seed only on the dataset seed and the id,
so every run (and every process of a distributed run) plans the same clips and makes each one the same way.
"""

from __future__ import annotations

import glob
import hashlib
import warnings
from pathlib import Path

from cascade_vsr.degradations.pair_settings import PairSettings

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".ts", ".y4m")


def find_videos(inputs: list[str]) -> list[Path]:
    """Files, folders (recursive, by video suffix) and glob patterns -> sorted unique video paths."""
    found: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.update(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
        elif path.is_file():
            found.add(path)
        elif not any(char in str(item) for char in "*?["):
            raise FileNotFoundError(f"`inputs`: {str(item)!r} does not exist")
        else:
            matches = [Path(p) for p in glob.glob(str(item), recursive=True) if Path(p).is_file()]
            if not matches:
                raise ValueError(f"`inputs`: {item!r} is not a file, a folder or a glob that matches files")
            found.update(matches)
    if not found:
        raise ValueError(f"`inputs` {inputs!r} contain no video files")
    return sorted(p.resolve() for p in found)


def clip_id(path: Path, start: int) -> str:
    """'<stem>-<hash of the path>-<start>': readable, unique per source file and start frame."""
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in path.stem)[:40]
    return f"{stem}-{digest}-{start:07d}"


def clip_seed(seed: int, cid: str) -> int:
    """The seed of clip `cid` in a dataset of seed `seed`."""
    return int(hashlib.sha256(f"{seed}:{cid}".encode()).hexdigest()[:8], 16)


def plan_clips(videos: list[Path], settings: PairSettings) -> list[dict]:
    """Every clip of every video: {"id", "source", "start"}; ValueError naming an unreadable or short video.

    A video smaller than `--hr-size` (height or width) would have to be upscaled into a fake HR clip: its clips
    are planned with a "rejected" reason (make-pairs records them in rejected.jsonl without making them) and a
    warning names it."""
    from cascade_vsr.core.video import video_info

    span = settings.span
    step = settings.step
    clips = []
    for video in videos:
        info = video_info(video)  # ValueError naming the path when unreadable
        if info["num_frames"] < span:
            raise ValueError(
                f"`inputs`: video {str(video)!r} has {info['num_frames']} frames, fewer than one clip "
                f"({settings.num_frames} frames at `--stride` {settings.stride} = {span})"
            )
        first, end = settings.frame_range or (0, info["num_frames"])
        end = min(end, info["num_frames"])
        if end - first < span:
            raise ValueError(
                f"`--frame-range` {settings.frame_range} of {str(video)!r} ({info['num_frames']} frames) holds "
                f"fewer frames than one clip ({span})"
            )
        starts = list(range(first, end - span + 1, step))
        if settings.max_clips_per_video is not None:
            starts = starts[: settings.max_clips_per_video]
        planned = [{"id": clip_id(video, s), "source": str(video), "start": s} for s in starts]
        size = (info["height"], info["width"])
        if size[0] < settings.hr_size[0] or size[1] < settings.hr_size[1]:
            reason = (
                f"source {size[0]}x{size[1]} is smaller than --hr-size {settings.hr_size[0]}x{settings.hr_size[1]}: "
                "it would be upscaled into a fake HR clip"
            )
            warnings.warn(f"make-pairs: skipping the {len(planned)} clips of {str(video)!r}: {reason}", stacklevel=2)
            planned = [{**clip, "rejected": [reason]} for clip in planned]
        clips.extend(planned)
    return clips
