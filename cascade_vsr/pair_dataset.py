"""The training-pair dataset format: what `cascade-vsr make-pairs` writes and the trainer reads.

Layout of a dataset folder ROOT:

    ROOT/dataset.json     {"format": "cascade-vsr-pairs", "version": 1, "config": {...}}: the settings that
                          define the dataset (make-pairs refuses to add clips made with other settings)
    ROOT/manifest.jsonl   one JSON record per completed clip, appended once all of its files are in place
    ROOT/rejected.jsonl   one record ({"id", "rejected": reasons}) per clip the quality filter dropped
    ROOT/clips/<id>/      hr.mp4 and lr.mp4 (or hr/ and lr/ folders of PNG frames), and latents.safetensors
                          (hr_latents, lr_latents, optional prompt_embeds and prompt_attention_mask)
    ROOT/.make-pairs.lock the lock a make-pairs run holds on the folder (an flock, so nothing to clean up)

Only the manifest defines the dataset: a clip folder without a manifest line does not exist. Its paths are
relative to ROOT and stay inside it: a path that is absolute or climbs out with ".." is an error naming the clip.
Each clip id appears once; a repeated id is an error.

One make-pairs run at a time: a run holds an exclusive `flock` on ROOT/.make-pairs.lock for its whole life (under
accelerate, its main process does), and a second run on the same folder is refused at once with the pid of the
first. The kernel releases the lock when the holder exits in any way, so a killed run never leaves a stale lock.

Crash safety: a clip is written into ROOT/clips/.tmp-<id>-<pid>/ and renamed to ROOT/clips/<id>/ in one
`os.replace`; only then does it get its manifest line, appended in one locked `write`. A writer killed during
that write leaves a torn last line (a prefix of a JSON object, without the final newline): readers ignore it
with a warning, and the next append cuts it. Any other line that is not a JSON record is an error.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

FORMAT = "cascade-vsr-pairs"
VERSION = 1
DATASET_FILE = "dataset.json"
MANIFEST = "manifest.jsonl"
REJECTED = "rejected.jsonl"
CLIPS = "clips"
LATENTS_FILE = "latents.safetensors"
TMP_PREFIX = ".tmp-"
LOCK_FILE = ".make-pairs.lock"


# ---------------------------------------------------------------------------------------------------- dataset.json


def read_dataset_record(root: str | Path, argument: str = "data_dir") -> dict:
    """The dataset.json record of `root`; ValueError naming `argument` and the file when it is missing, is not
    this format, or was written by a newer version of it."""
    path = Path(root) / DATASET_FILE
    if not path.is_file():
        raise ValueError(
            f"`{argument}` {str(root)!r} has no {DATASET_FILE}: not a pair dataset (cascade-vsr make-pairs)"
        )
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"`{argument}`: {str(path)!r} is not valid JSON: {error}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"`{argument}`: {str(path)!r} is of format {found!r}, not a {FORMAT!r} pair dataset")
    version = record.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"`{argument}`: {str(path)!r} has no valid format version (got {version!r})")
    if version > VERSION:
        raise ValueError(
            f"`{argument}`: {str(path)!r} is {FORMAT} version {version}, newer than this cascade-vsr reads "
            f"(up to {VERSION}): upgrade cascade-vsr"
        )
    if not isinstance(record.get("config"), dict):
        raise ValueError(f"`{argument}`: {str(path)!r} has no `config` object")
    return record


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- manifest


def read_manifest(root: str | Path, name: str = MANIFEST) -> list[dict]:
    """The records of ROOT/`name` in file order; [] when the file does not exist yet.

    A torn last line (see the module docstring) is ignored with a warning; blank lines are skipped; any other
    line that is not a JSON object with an "id" is a ValueError naming the file and the line number.
    """
    path = Path(root) / name
    if not path.is_file():
        return []
    with open(path, "rb") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH)  # never see the half of a line that a writer is appending
        try:
            data = handle.read()
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    lines = data.split(b"\n")  # the last item is empty when the file ends with a newline
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:  # invalid JSON or invalid UTF-8
            if number == len(lines):  # no newline after it: an append that a killed writer left unfinished
                warnings.warn(f"{str(path)!r}: ignoring a torn last line {line[:40]!r}", stacklevel=2)
                continue
            raise ValueError(f"{str(path)!r} line {number} is not valid JSON: {error}") from None
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            raise ValueError(f'{str(path)!r} line {number} is not a clip record (a JSON object with an "id")')
        records.append(record)
    return records


def append_manifest(root: str | Path, record: dict, name: str = MANIFEST) -> None:
    """Append one record as one line under an exclusive lock.

    A last line without its newline is completed when it is a whole record and cut when it is torn, so the file
    holds exactly the records that `read_manifest` returns, plus this one.
    """
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(Path(root) / name, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            size = handle.seek(0, os.SEEK_END)
            if size:
                handle.seek(size - 1)
                if handle.read(1) != b"\n":
                    handle.seek(0)
                    data = handle.read()
                    start = data.rfind(b"\n") + 1
                    try:
                        json.loads(data[start:])
                        handle.write(b"\n")
                    except ValueError:
                        handle.truncate(start)
            handle.seek(0, os.SEEK_END)
            handle.write(line.encode())
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------------- writer


class PairDatasetWriter:
    """Creates a pair dataset folder and commits clips into it safely (see the module docstring).

    Args:
        root: The dataset folder.
        argument: How error messages name the folder (the make-pairs option by default).
    """

    def __init__(self, root: str | Path, argument: str = "--output-dir"):
        self.root = Path(root)
        self.argument = argument

    def check(self, config: dict) -> bool:
        """Whether the folder already holds a dataset of this `config` (False when it is absent, empty, or holds a
        dataset without a single clip yet, which `prepare` re-creates with `config`); ValueError when it holds
        something else. Writes nothing: make-pairs runs it before it takes the folder's lock."""
        if (self.root / DATASET_FILE).is_file():
            stored = read_dataset_record(self.root, self.argument)["config"]
            if stored == config:
                return True
            if read_manifest(self.root) or read_manifest(self.root, REJECTED):
                differing = sorted(k for k in set(config) | set(stored) if stored.get(k) != config.get(k))
                raise ValueError(
                    f"`{self.argument}` {str(self.root)!r} holds a different dataset (dataset.json differs in "
                    f"{differing}); use a new folder or the same settings"
                )
            return False  # no clip made or rejected yet (e.g. a run refused before its first clip): start afresh
        if self.root.exists():
            if not self.root.is_dir():
                raise ValueError(f"`{self.argument}` {str(self.root)!r} is a file, not a folder")
            if any(p.name not in (CLIPS, LOCK_FILE) for p in self.root.iterdir()):
                raise ValueError(
                    f"`{self.argument}` {str(self.root)!r} is not empty and holds no cascade-vsr pair dataset"
                )
        return False

    def prepare(self, config: dict) -> None:
        """Create the folder with its dataset.json, or check that it holds a dataset of this same `config`."""
        if self.check(config):
            return
        make_folder(self.root / CLIPS, self.argument)
        record = {"format": FORMAT, "version": VERSION, "config": config}
        _atomic_write_text(self.root / DATASET_FILE, json.dumps(record, indent=2))

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's make-pairs lock (see the module docstring) inside the block, creating the folder."""
        with lock_dataset(self.root, self.argument):
            yield

    def clean_leftovers(self, ids: set[str], done: set[str]) -> None:
        """Remove the temporary folders of `ids`, and their clip folders that never got a manifest line."""
        clips = self.root / CLIPS
        for path in clips.glob(f"{TMP_PREFIX}*"):
            if path.name[len(TMP_PREFIX) :].rsplit("-", 1)[0] in ids:
                shutil.rmtree(path, ignore_errors=True)
        for clip_id in ids - done:
            if (clips / clip_id).exists():
                shutil.rmtree(clips / clip_id, ignore_errors=True)

    @contextlib.contextmanager
    def clip_folder(self, clip_id: str) -> Iterator[Path]:
        """A fresh temporary folder for the files of `clip_id`, renamed to clips/<id>/ when the block succeeds
        (replacing a leftover folder of that id) and removed when it fails."""
        tmp = self.root / CLIPS / f"{TMP_PREFIX}{clip_id}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        final = self.root / CLIPS / clip_id
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)

    def append(self, record: dict, name: str = MANIFEST) -> None:
        append_manifest(self.root, record, name)


def make_folder(path: Path, argument: str) -> None:
    """mkdir -p, with a ValueError naming `argument` when the folder cannot be created (read-only place, /proc,
    a file in the way)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"`{argument}`: cannot create the folder {str(path)!r}: {error.strerror or error}") from None


@contextlib.contextmanager
def lock_dataset(root: str | Path, argument: str = "--output-dir") -> Iterator[None]:
    """Hold an exclusive flock on ROOT/.make-pairs.lock inside the block (the folder is created when missing);
    ValueError naming `argument`, the folder and the holder's pid when another process holds it."""
    root = Path(root)
    make_folder(root, argument)
    path = root / LOCK_FILE
    try:
        handle = open(path, "a+")
    except OSError as error:
        raise ValueError(
            f"`{argument}`: cannot write the lock file {str(path)!r}: {error.strerror or error}"
        ) from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise ValueError(
                f"`{argument}` {str(root)!r} is in use by another make-pairs run (pid {holder} holds {LOCK_FILE}): "
                "wait for it to finish, or use another folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


def clip_path(clip_id: str, name: str) -> str:
    """The path of a clip's file `name` relative to the dataset folder, as the manifest records it."""
    return f"{CLIPS}/{clip_id}/{name}"


# ---------------------------------------------------------------------------------------------------- clip files


def write_frames(folder: Path, name: str, frames: np.ndarray, frames_format: str = "mp4", crf: int = 12) -> str:
    """Store uint8 frames (T, H, W, 3) as `name`.mp4 (x264 at `crf`) or as a folder `name`/ of PNG frames;
    returns the file or folder name."""
    import cv2

    from cascade_vsr.core.video import write_video

    if frames_format == "mp4":
        write_video(folder / f"{name}.mp4", frames, fps=24.0, codec="libx264", crf=crf)
        return f"{name}.mp4"
    if frames_format != "png":
        raise ValueError(f"`frames_format` must be 'mp4' or 'png', got {frames_format!r}")
    (folder / name).mkdir()
    for index, frame in enumerate(frames):
        cv2.imwrite(str(folder / name / f"{index:05d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    return name


def clip_file(root: str | Path, record: dict, key: str) -> Path:
    """ROOT / the path that clip `record` stores under `key` ("hr", "lr", "latents"), which must be relative and
    stay inside ROOT; ValueError naming the clip and the path otherwise.

    The check is on the path text (no absolute path, no ".."), so a manifest can never point outside its dataset;
    symbolic links inside the dataset are followed (a dataset may keep its clips on another disk)."""
    value = record.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"clip {record.get('id')!r}: {key!r} must be a path inside the dataset folder, got {value!r}")
    path = Path(value)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(
            f"clip {record.get('id')!r}: {key!r} path {value!r} leads outside the dataset folder {str(root)!r} "
            "(manifest paths are relative to it, without '..')"
        )
    return Path(root) / path


@contextlib.contextmanager
def open_latents(path: str | Path, clip_id: str) -> Iterator:
    """`safe_open` of a clip's latents file, whose errors (a truncated file: "incomplete metadata") name the clip
    and the file."""
    from safetensors import SafetensorError, safe_open

    def failed(error: Exception) -> ValueError:
        return ValueError(
            f"clip {clip_id!r}: latents file {str(path)!r} is not a readable safetensors file ({error}); remove the "
            "clip's manifest line and run make-pairs again to remake it"
        )

    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as error:
        raise failed(error) from None
    with handle as tensors:
        try:
            yield tensors
        except SafetensorError as error:
            raise failed(error) from None


def read_frames(path: str | Path) -> np.ndarray:
    """uint8 (T, H, W, 3) from a clip's mp4 or PNG folder (what `write_frames` stored)."""
    import cv2

    from cascade_vsr.core.video import read_video

    path = Path(path)
    if path.is_dir():
        return np.stack([cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted(path.glob("*.png"))])
    return read_video(path)


def write_latents(folder: Path, tensors: dict, latent_space: str) -> str:
    """Store a clip's latent tensors (float32, masks int64) with their latent space; returns the file name."""
    from safetensors.torch import save_file

    save_file(tensors, str(folder / LATENTS_FILE), metadata={"latent_space": latent_space})
    return LATENTS_FILE


# ---------------------------------------------------------------------------------------------------- reader


def read_pair_dataset(root: str | Path, argument: str = "data_dir") -> list[dict]:
    """The clip records of a complete pair dataset, in manifest order, after checking its dataset.json;
    ValueError naming `argument` when `root` is not a pair dataset this version reads, lists no clip, lists a clip
    twice, or points outside itself (see `clip_file`)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"`{argument}` {str(root)!r} does not exist or is not a directory")
    if not (root / MANIFEST).is_file():
        raise ValueError(f"`{argument}` {str(root)!r} has no {MANIFEST}: not a pair dataset (cascade-vsr make-pairs)")
    read_dataset_record(root, argument)
    records = read_manifest(root)
    if not records:
        raise ValueError(f"`{argument}` {str(root)!r} is empty: {MANIFEST} lists no clip")
    seen: set[str] = set()
    for record in records:
        if record["id"] in seen:
            count = sum(r["id"] == record["id"] for r in records)
            raise ValueError(
                f"`{argument}`: {str(root / MANIFEST)!r} lists clip {record['id']!r} {count} times (written by two "
                "make-pairs runs at once?); keep one of its lines"
            )
        seen.add(record["id"])
        for key in ("hr", "lr", "latents"):
            if record.get(key) is not None:
                clip_file(root, record, key)
    return records
