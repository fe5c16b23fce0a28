"""Every code block of the README runs as written (in a scratch folder holding the files the blocks name).

Python blocks run in this interpreter, bash blocks through bash with the package's `cascade-vsr` on PATH, in the
order of the README (the training block trains on the pairs the make-pairs block wrote). The one block not run here
is the set-up block (`make test`, `make demo`): it is CI itself. `text` blocks are figures (the folder tree), not
code.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from cascade_vsr.core.streams import VideoSink
from cascade_vsr.core.video import read_video, resize_frames, sample_video_path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def readme_blocks() -> list[tuple[str, str]]:
    return [(language, code) for language, code in BLOCK.findall((ROOT / "README.md").read_text())]


def prepare_files(folder: Path) -> None:
    """The user files the README's blocks name: an LR clip, its ground truth and a folder of frames."""
    frames = read_video(sample_video_path("bigbuckbunny.mp4"), start=100, num_frames=4)
    ground_truth = resize_frames(frames, (96, 160), crop_to_aspect=True)
    with VideoSink(folder / "ground_truth.mp4", crf=0) as sink:
        sink.write(ground_truth)
    with VideoSink(folder / "clip.mp4", crf=0) as sink:
        sink.write(resize_frames(ground_truth, (48, 80), mode="area"))
    with VideoSink(folder / "frames") as sink:
        sink.write(ground_truth[:2])
    (folder / "configs").symlink_to(ROOT / "configs")


def test_every_block_is_python_or_bash_and_only_the_setup_block_is_skipped():
    blocks = readme_blocks()
    assert all(language in ("python", "bash", "text") for language, _ in blocks), [lang for lang, _ in blocks]
    assert [code for _, code in blocks if "make test" in code] == [blocks[0][1]]


def test_readme_blocks_run_as_written(tmp_path, monkeypatch):
    prepare_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for number, (language, code) in enumerate(readme_blocks()):
        if "make test" in code or language == "text":
            continue
        if language == "python":
            exec(compile(code, f"README.md block {number}", "exec"), {"__name__": f"readme_{number}"})
        else:
            result = subprocess.run(["bash", "-e", "-c", code], env=env, capture_output=True, text=True)
            assert result.returncode == 0, f"README block {number} failed:\n{code}\n{result.stderr[-3000:]}"
    # what the blocks promise to write
    assert read_video(tmp_path / "clip_2x.mp4").shape == (4, 96, 160, 3)
    assert len(list((tmp_path / "frames_2x").glob("*.png"))) == 2
    assert (tmp_path / "pairs" / "preview.png").is_file() and (tmp_path / "outputs/tiny/export/vae").is_dir()
    assert np.isfinite(read_video(tmp_path / "clip_tiny_2x.mp4")).all()
