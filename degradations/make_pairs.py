"""Build a training-pair dataset (`cascade-vsr make-pairs`): plan the clips, make the missing ones, preview.

The folder format and its crash safety are `cascade_vsr.pair_dataset`'s: a run killed at any point and run
again gives each clip exactly once, complete. Under `accelerate launch` (or torchrun) every process makes its
share of the clips. One run at a time per folder: a run holds the folder's lock (`pair_dataset.LOCK_FILE`) and
a second run on it is refused at once, naming the first one's pid.

Every argument is checked before the folder is touched and before the first clip is degraded: a wrong value
leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cascade_vsr.degradations.pair_planning import find_videos, plan_clips
from cascade_vsr.degradations.pair_settings import PairSettings, check_int
from cascade_vsr.degradations.pair_synthesis import ClipSynthesizer, load_upstream
from cascade_vsr.pair_dataset import REJECTED, PairDatasetWriter, clip_file, read_frames, read_manifest

# The synthesizer and writer of a worker process, built once by `_start_worker` (the pool's initializer).
_worker: tuple[ClipSynthesizer, PairDatasetWriter] | None = None
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _start_worker(settings: PairSettings, root: str, parent_pid: int) -> None:
    die_with_parent(parent_pid)  # first: building the synthesizer takes seconds
    global _worker
    _worker = (ClipSynthesizer(settings), PairDatasetWriter(root))


def die_with_parent(parent_pid: int) -> None:
    """End this process as soon as its parent `parent_pid` ends. A pool worker otherwise outlives a parent that
    was killed (SIGKILL runs no cleanup) and goes on degrading clips for a run that no longer exists.

    Linux: the kernel sends SIGKILL on the parent's death (prctl PR_SET_PDEATHSIG); elsewhere, or when prctl is
    unavailable, a daemon thread polls the parent pid every 0.2 s."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="parent-watchdog").start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.2)
    os._exit(1)


def _make_clip_in_worker(clip: dict) -> dict:
    synthesizer, writer = _worker
    return synthesizer(clip, writer)


def build_dataset(
    inputs: list[str], root: str | Path, settings: PairSettings, num_workers: int = 0, preview: int = 0
) -> dict:
    """Make every missing clip of `inputs` in `root`: this process's share when run under accelerate.

    Args:
        inputs: Video files, folders (searched recursively) or glob patterns.
        root: The dataset folder; created, or checked to hold a dataset of these same settings.
        settings: What the dataset holds and how its pairs are made.
        num_workers: Worker processes; 0 makes the clips in this process.
        preview: Write preview.png with this many clips (0: none).

    Returns:
        {"planned", "skipped", "written", "rejected"}: clip counts of this process.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    if isinstance(inputs, (str, Path)) or not all(isinstance(item, (str, Path)) for item in inputs):
        raise ValueError(f"`inputs` must be a list of paths or globs, got {inputs!r}")
    settings.validate()  # again: fields may have been changed since the settings were made
    check_int(num_workers, "--num-workers", 0)
    check_int(preview, "--preview", 0)
    writer = PairDatasetWriter(root)
    videos = find_videos(inputs)
    upstream = None
    if settings.upstream:
        from cascade_vsr.degradations.model_guided import ModelGuidedDegradation  # noqa: F401  (fails early when diffusers is broken)
        from cascade_vsr.pipelines.adapters import get_adapter

        upstream = load_upstream(settings.upstream)
        adapter = get_adapter(upstream)
        adapter.check_num_frames(settings.num_frames, "--num-frames")
        for name, size in (("--hr-size", settings.hr_size), ("--lr-scale", settings.lr_size)):
            if any(s % adapter.spatial_compression for s in size):
                raise ValueError(f"`{name}`: size {size} must be a multiple of {adapter.spatial_compression}")
        settings = dataclasses.replace(settings, latent_space=adapter.name)
    clips = plan_clips(videos, settings)  # reads the videos' headers: unreadable and short videos fail here
    config = settings.dataset_config()
    # without an accelerator, processes started by `accelerate launch` / torchrun split the work over gloo
    state = PartialState(cpu=not torch.cuda.is_available())
    with contextlib.ExitStack() as held:
        # the main process takes the folder's lock for the whole run (its share, the others', the preview) and
        # creates the dataset; the others learn whether it could
        failure = None
        if state.is_main_process:
            try:
                writer.check(config)  # before the lock file is created in a folder that is not ours
                held.enter_context(writer.lock())
                writer.prepare(config)
            except ValueError as error:
                failure = error
        if state.num_processes > 1:
            message = broadcast_object_list([None if failure is None else str(failure)])[0]
            if message is not None and failure is None:
                failure = ValueError(message)
        if failure is not None:
            raise failure
        writer.prepare(config)  # every process checks the folder
        counts = _make_clips(writer, clips, settings, state, num_workers, upstream)
        state.wait_for_everyone()
        if preview and state.is_main_process:
            write_preview(writer.root, preview, settings)
    return counts


def _make_clips(
    writer: PairDatasetWriter, clips: list[dict], settings: PairSettings, state: Any, num_workers: int, upstream: Any
) -> dict:
    """This process's share of `clips`: the missing ones made (by `num_workers` workers, or here); its counts."""
    from tqdm.auto import tqdm

    with state.split_between_processes(clips) as mine:
        mine = list(mine)
    done = {record["id"] for record in read_manifest(writer.root)}
    rejected = {record["id"] for record in read_manifest(writer.root, REJECTED)}
    writer.clean_leftovers({c["id"] for c in mine}, done)
    todo = [c for c in mine if c["id"] not in done and c["id"] not in rejected]
    counts = {"planned": len(mine), "skipped": len(mine) - len(todo), "written": 0, "rejected": 0}
    for clip in todo:
        if "rejected" in clip:  # refused when planned (a source smaller than the HR size): nothing to make
            writer.append({"id": clip["id"], "rejected": clip["rejected"]}, REJECTED)
            counts["rejected"] += 1
    todo = [c for c in todo if "rejected" not in c]
    bar = tqdm(total=len(todo), desc=f"make-pairs [{state.process_index}]", disable=not todo)
    pool = None
    results: Iterable[dict] = ()
    if todo and num_workers > 0:
        import multiprocessing

        upstream = None  # each worker loads its own
        pool = multiprocessing.get_context("spawn").Pool(
            num_workers, initializer=_start_worker, initargs=(settings, str(writer.root), os.getpid())
        )
        results = pool.imap_unordered(_make_clip_in_worker, todo)
    elif todo:
        synthesizer = ClipSynthesizer(settings, upstream)
        results = (synthesizer(clip, writer) for clip in todo)
    try:
        for record in results:
            if "rejected" in record:
                writer.append(record, REJECTED)
                counts["rejected"] += 1
            else:
                writer.append(record)
                counts["written"] += 1
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return counts


def write_preview(root: str | Path, count: int, settings: PairSettings) -> Path:
    """preview.png: one row per clip, middle frame: HR | LR (enlarged) | LR flow magnitude."""
    import cv2
    import numpy as np

    from cascade_vsr.core.optical_flow import compute_flow

    root = Path(root)
    records = sorted(read_manifest(root), key=lambda r: r["id"])[:count]
    rows = []
    for record in records:
        hr, lr = (read_frames(clip_file(root, record, key)) for key in ("hr", "lr"))
        mid = len(hr) // 2
        height, width = hr.shape[1:3]
        flow = compute_flow(lr[mid - 1 : mid + 1], settings.dis_preset)[0]
        magnitude = np.linalg.norm(flow, axis=-1)
        magnitude = (255 * magnitude / max(magnitude.max(), 1e-6)).astype(np.uint8)
        colour = cv2.cvtColor(cv2.applyColorMap(magnitude, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)
        lr_large, colour_large = (
            cv2.resize(x, (width, height), interpolation=cv2.INTER_NEAREST) for x in (lr[mid], colour)
        )
        rows.append(np.concatenate([hr[mid], lr_large, colour_large], axis=1))
    path = root / "preview.png"
    if rows:
        tmp = root / f".preview.tmp-{os.getpid()}.png"
        cv2.imwrite(str(tmp), cv2.cvtColor(np.concatenate(rows, axis=0), cv2.COLOR_RGB2BGR))
        os.replace(tmp, path)
    return path
