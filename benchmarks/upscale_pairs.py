"""Two `cascade-vsr upscale` option sets on the same input, run alternately in one process ->
benchmarks/results/upscale_pairs.json: frames per second of each run and the median of the paired ratios.

This machine's speed drifts by 10-30% over minutes, more than most changes move it, and separate processes also
differ in what they load and warm up. Here both option sets share one process (imports, allocator, oneDNN's
kernels) and run back to back, `--rounds` times with the order flipped every round, after one warm-up run each; the
ratio of each round's two runs carries over, and their median ignores a round disturbed by a burst. The frames per
second are `upscale`'s own (from its first frame read to its last frame written: decoding, the stage, encoding).

The input is the real bigbuckbunny clip at 160x96 (`--size`), played forward and backward to `--frames`
(`upscale_memory.ping_pong`), super-resolved 2x with the one-step demo model in upscale's default dtype.

    .venv/bin/python benchmarks/upscale_pairs.py --a "--chunks-per-forward 1" --b "--chunks-per-forward auto" \
        [--frames 64] [--rounds 6] [--size 96 160] [--output PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from upscale_memory import cpu_name, make_input, ping_pong  # noqa: E402

from cascade_vsr.cli import main as cli_main  # noqa: E402
from cascade_vsr.core.allocator import keep_freed_memory  # noqa: E402
from cascade_vsr.core.video import read_video, resize_frames, sample_video_path, video_info  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "upscale_pairs.json"


def upscale_fps(video: Path, output: Path, options: list[str]) -> float:
    """Run `upscale` in this process; its frames per second (from its summary line)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli_main(["upscale", str(video), "--output", str(output), "--scale", "2", "--overwrite", *options])
    summary = re.search(r"\(([\d.]+) frames/s\)", printed.getvalue())
    if code != 0 or summary is None:
        raise RuntimeError(f"upscale {' '.join(options)} failed:\n{printed.getvalue()[-2000:]}")
    return float(summary.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, help="upscale options of the first set (the baseline), one string")
    parser.add_argument("--b", required=True, help="upscale options of the second set, one string")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--size", type=int, nargs=2, default=(96, 160), metavar=("H", "W"))
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.rounds < 1 or args.frames < 1:
        parser.error("--rounds and --frames must be >= 1")
    options = {"a": shlex.split(args.a), "b": shlex.split(args.b)}
    keep_freed_memory()  # as the `cascade-vsr` command does

    source = sample_video_path("bigbuckbunny.mp4")
    clip = resize_frames(read_video(source), tuple(args.size), mode="area", crop_to_aspect=True)
    fps = {"a": [], "b": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        video = make_input(ping_pong(clip, args.frames), args.frames, video_info(source)["fps"], folder)
        for name in ("a", "b"):  # warm-up: first calls build oneDNN's kernels and the allocator's pools
            upscale_fps(video, folder / "out.mp4", options[name])
        for round_index in range(args.rounds):
            for name in ("a", "b") if round_index % 2 == 0 else ("b", "a"):
                fps[name].append(upscale_fps(video, folder / "out.mp4", options[name]))
            print(f"round {round_index}: a {fps['a'][-1]:.2f}, b {fps['b'][-1]:.2f} frames/s", flush=True)

    ratios = np.array(fps["b"]) / np.array(fps["a"])
    print(f"\n{'set':4s} {'options':40s} {'median frames/s':>16s}")
    for name in ("a", "b"):
        print(f"{name:4s} {' '.join(options[name]):40s} {np.median(fps[name]):16.2f}")
    print(
        f"b / a frames/s: median of {args.rounds} paired ratios {np.median(ratios):.3f} "
        f"(range {ratios.min():.3f}-{ratios.max():.3f}; b faster in {int((ratios > 1).sum())} of {args.rounds} rounds)"
    )
    result = {
        "machine": cpu_name(),
        "input": {"clip": Path(source).name, "size": list(args.size), "frames": args.frames, "scale": 2},
        "options": {name: options[name] for name in ("a", "b")},
        "frames_per_s": fps,
        "median_frames_per_s": {name: float(np.median(fps[name])) for name in ("a", "b")},
        "paired_ratio_b_over_a": {
            "median": float(np.median(ratios)),
            "min": float(ratios.min()),
            "max": float(ratios.max()),
            "rounds_b_faster": int((ratios > 1).sum()),
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
