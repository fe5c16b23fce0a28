"""cascade_vsr.pair_dataset: one reader and one writer of the pair-dataset format, shared by make-pairs and the
trainer (torn and corrupted manifests, dataset.json checks, clip commits, leftovers)."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest

from cascade_vsr.cli import main
from cascade_vsr.core.video import sample_video_path
from cascade_vsr.degradations import make_pairs, pair_synthesis
from cascade_vsr.degradations.pair_settings import PairSettings
from cascade_vsr.pair_dataset import (
    LOCK_FILE,
    PairDatasetWriter,
    append_manifest,
    clip_file,
    read_manifest,
    read_pair_dataset,
)
from cascade_vsr.training.data import PairLatentDataset

VIDEO = str(sample_video_path("bigbuckbunny.mp4"))
# three 2-frame clips (starts 0, 2, 4) of 32x32 HR / 16x16 LR with pixel-space latents the trainer can read
ARGS = [
    VIDEO, "--num-frames", 2, "--clip-step", 2, "--frame-range", 0, 6, "--hr-size", 32, 32, "--lr-scale", 0.5,
    "--upstream", "space_to_depth", "--degradations", "none=1", "--frames-format", "png", "--no-quality-filter",
]  # fmt: skip


def make_pairs_cli(root: Path, capsys) -> dict:
    """Run `cascade-vsr make-pairs ARGS --output-dir root`; returns the counts it prints."""
    capsys.readouterr()
    main(["make-pairs", *map(str, ARGS), "--output-dir", str(root)])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine") / "pairs"
    main(["make-pairs", *map(str, ARGS), "--output-dir", str(root)])
    return root


@pytest.fixture
def dataset(pristine, tmp_path) -> Path:
    root = tmp_path / "pairs"
    shutil.copytree(pristine, root)
    return root


def manifest_lines(root: Path) -> list[str]:
    return (root / "manifest.jsonl").read_text().splitlines()


def trainer_ids(root: Path) -> list[str]:
    return [clip.id for clip in PairLatentDataset(root).clips]


def test_torn_last_line_is_the_same_missing_clip_for_make_pairs_and_the_trainer(dataset, capsys):
    """A killed writer leaves half a line without its newline: the trainer's dataset and make-pairs' resume both
    see the first two clips; the resume redoes the third, exactly as it was, and cuts the torn half."""
    lines = manifest_lines(dataset)
    ids = [json.loads(line)["id"] for line in lines]
    assert len(ids) == 3
    (dataset / "manifest.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])
    with pytest.warns(UserWarning, match="torn last line"):
        assert trainer_ids(dataset) == ids[:2]
    with pytest.warns(UserWarning, match="torn last line"):
        counts = make_pairs_cli(dataset, capsys)
    assert counts == {"planned": 3, "skipped": 2, "written": 1, "rejected": 0}
    assert manifest_lines(dataset) == lines  # the same record, bit for bit, and no torn half left
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trainer_ids(dataset) == ids


def test_corrupted_middle_line_is_an_error_for_make_pairs_and_the_trainer(dataset, capsys):
    lines = manifest_lines(dataset)
    text = "\n".join([lines[0], lines[1][:20], lines[2]]) + "\n"
    (dataset / "manifest.jsonl").write_text(text)
    message = re.escape(f"{str(dataset / 'manifest.jsonl')!r} line 2 is not valid JSON")
    with pytest.raises(ValueError, match=message):
        PairLatentDataset(dataset)
    with pytest.raises(ValueError, match=message):
        make_pairs_cli(dataset, capsys)
    assert (dataset / "manifest.jsonl").read_text() == text  # nothing was appended to the broken manifest


@pytest.mark.parametrize(
    "change, match",
    [({"format": "other-pairs"}, "of format 'other-pairs'"), ({"version": 2}, "version 2, newer than")],
)
def test_dataset_json_of_another_format_or_a_newer_version_is_refused(dataset, capsys, change, match):
    path = dataset / "dataset.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ValueError, match=rf"`data_dir`: {re.escape(repr(str(path)))} .*{match}"):
        PairLatentDataset(dataset)
    with pytest.raises(ValueError, match=rf"`--output-dir`: {re.escape(repr(str(path)))} .*{match}"):
        make_pairs_cli(dataset, capsys)


def test_a_folder_without_dataset_json_is_not_a_pair_dataset(dataset):
    (dataset / "dataset.json").unlink()
    with pytest.raises(ValueError, match=r"`data_dir` .* has no dataset.json"):
        PairLatentDataset(dataset)


def test_settings_from_python_are_those_of_the_command_line(dataset, monkeypatch, capsys):
    """build_dataset with PairSettings.from_options (no argparse) writes the dataset the CLI writes: the CLI then
    accepts the folder as its own and finds every clip done; the upstream is loaded once in the process."""
    loads = []
    real_load = pair_synthesis.load_upstream

    def counting_load(path):
        loads.append(path)
        return real_load(path)

    monkeypatch.setattr(make_pairs, "load_upstream", counting_load)
    monkeypatch.setattr(pair_synthesis, "load_upstream", counting_load)
    root = dataset.parent / "python"
    settings = PairSettings.from_options(
        num_frames=2, clip_step=2, frame_range=(0, 6), hr_size=(32, 32), lr_scale=0.5, upstream="space_to_depth",
        degradations="none=1", frames_format="png", quality_filter=False,
    )  # fmt: skip
    counts = make_pairs.build_dataset([VIDEO], root, settings)
    assert counts["written"] == 3 and loads == ["space_to_depth"]
    assert (root / "dataset.json").read_text() == (dataset / "dataset.json").read_text()
    assert manifest_lines(root) == manifest_lines(dataset)
    assert make_pairs_cli(root, capsys) == {"planned": 3, "skipped": 3, "written": 0, "rejected": 0}


# ---------------------------------------------------------------------------------------------------- unit level


def test_read_manifest_policy(tmp_path):
    path = tmp_path / "manifest.jsonl"
    assert read_manifest(tmp_path) == []  # no manifest yet
    path.write_text('{"id": "a"}\n\n{"id": "b"}')  # blank lines skip; a whole last record without newline counts
    assert [r["id"] for r in read_manifest(tmp_path)] == ["a", "b"]
    path.write_text('{"id": "a"}\n{"id": "b"\n')  # invalid although complete with its newline: not a torn line
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_manifest(tmp_path)
    path.write_text('{"id": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match="line 2 is not a clip record"):
        read_manifest(tmp_path)
    path.write_text('{"name": "a"}\n')
    with pytest.raises(ValueError, match="line 1 is not a clip record"):
        read_manifest(tmp_path)


def test_append_cuts_a_torn_tail_and_completes_a_whole_one(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b", "hr": "cl')
    append_manifest(tmp_path, {"id": "c"})
    assert path.read_text() == '{"id": "a"}\n{"id": "c"}\n'
    path.write_text('{"id": "a"}')  # a whole record whose newline never came: kept, as the reader keeps it
    append_manifest(tmp_path, {"id": "c", "b": 1})
    assert path.read_text() == '{"id": "a"}\n{"b": 1, "id": "c"}\n'
    assert [r["id"] for r in read_manifest(tmp_path)] == ["a", "c"]


def test_writer_prepare_commit_and_leftovers(tmp_path):
    root = tmp_path / "pairs"
    writer = PairDatasetWriter(root)
    writer.prepare({"num_frames": 5})
    assert json.loads((root / "dataset.json").read_text()) == {
        "format": "cascade-vsr-pairs",
        "version": 1,
        "config": {"num_frames": 5},
    }
    writer.prepare({"num_frames": 5})  # the same dataset: accepted
    # no clip made or rejected yet (a run refused before its first clip): the folder takes the new settings
    writer.prepare({"num_frames": 7})
    assert json.loads((root / "dataset.json").read_text())["config"] == {"num_frames": 7}
    writer.prepare({"num_frames": 5})
    writer.append({"id": "z", "rejected": ["too dark"]}, "rejected.jsonl")  # from now on the settings are fixed
    with pytest.raises(ValueError, match=r"`--output-dir` .* differs in \['num_frames'\]"):
        writer.prepare({"num_frames": 9})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no cascade-vsr pair dataset"):
        PairDatasetWriter(tmp_path / "other").prepare({})

    with writer.clip_folder("a") as folder:
        (folder / "hr.mp4").write_text("new")
        assert not (root / "clips" / "a").exists()  # nothing visible before the block ends
    assert (root / "clips" / "a" / "hr.mp4").read_text() == "new"
    with pytest.raises(RuntimeError), writer.clip_folder("b") as folder:
        (folder / "hr.mp4").write_text("partial")
        raise RuntimeError
    assert sorted(p.name for p in (root / "clips").iterdir()) == ["a"]  # a failed clip leaves nothing

    for name in ("b", "c", ".tmp-b-123", ".tmp-c-456"):
        (root / "clips" / name).mkdir()
    writer.clean_leftovers({"a", "b"}, done={"a"})  # this process's clips: a (done) and b (not done)
    assert sorted(p.name for p in (root / "clips").iterdir()) == [".tmp-c-456", "a", "c"]


# ---------------------------------------------------------------------------------------------------- hardening


def test_reader_refuses_a_clip_listed_twice(dataset):
    lines = manifest_lines(dataset)
    (dataset / "manifest.jsonl").write_text("\n".join([*lines, lines[1]]) + "\n")
    clip = json.loads(lines[1])["id"]
    with pytest.raises(ValueError, match=rf"`data_dir`: .*manifest.jsonl' lists clip {re.escape(repr(clip))} 2 times"):
        PairLatentDataset(dataset)
    with pytest.raises(ValueError, match="2 times"):
        read_pair_dataset(dataset)


@pytest.mark.parametrize("key", ["latents", "hr", "lr"])
@pytest.mark.parametrize("path", ["/etc/passwd", "../../outside/latents.safetensors", "clips/../../x"])
def test_manifest_paths_stay_inside_the_dataset(dataset, key, path):
    lines = manifest_lines(dataset)
    record = json.loads(lines[0])
    (dataset / "manifest.jsonl").write_text("\n".join([json.dumps({**record, key: path}), *lines[1:]]) + "\n")
    message = rf"clip {re.escape(repr(record['id']))}: '{key}' path {re.escape(repr(path))} leads outside the dataset"
    with pytest.raises(ValueError, match=message):
        PairLatentDataset(dataset)
    with pytest.raises(ValueError, match=message):
        clip_file(dataset, {**record, key: path}, key)
    assert clip_file(dataset, record, key) == dataset / record[key]


def test_truncated_latents_name_the_clip_and_the_file(dataset):
    record = json.loads(manifest_lines(dataset)[1])
    path = dataset / record["latents"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = rf"clip {re.escape(repr(record['id']))}: latents file {re.escape(repr(str(path)))} .*incomplete metadata"
    with pytest.raises(ValueError, match=message):
        PairLatentDataset(dataset)
    # a file truncated after the dataset was opened: the sample read names it too
    path.write_bytes(data)
    clips = PairLatentDataset(dataset)
    path.write_bytes(data[:10])
    with pytest.raises(ValueError, match=rf"clip {re.escape(repr(record['id']))}: latents file"):
        clips[1]


def test_one_make_pairs_run_per_folder_lock(tmp_path):
    """The lock refuses a second holder at once, naming the folder and the holder's pid, and is free again after."""
    writer = PairDatasetWriter(tmp_path / "pairs")
    with writer.lock():
        assert (tmp_path / "pairs" / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        message = rf"`--output-dir` {re.escape(repr(str(tmp_path / 'pairs')))} is in use by another make-pairs run "
        with pytest.raises(ValueError, match=message + rf"\(pid {os.getpid()} holds"):
            with PairDatasetWriter(tmp_path / "pairs").lock():
                pass
        writer.prepare({"num_frames": 5})  # the lock file does not make the folder "not empty"
    with PairDatasetWriter(tmp_path / "pairs").lock():  # released on exit
        pass
    with pytest.raises(ValueError, match=r"`--output-dir`: cannot create the folder '/proc/x'"):
        with PairDatasetWriter("/proc/x").lock():
            pass
