"""Peak memory of `cascade-vsr upscale` on a long input against a short one -> benchmarks/results/upscale_memory.json.

Issue 15 asks that a 600-frame input at 160x96 run with a peak RSS within 15% of a 60-frame input: the reader, the
pipeline and the writer hold one chunk at a time, so memory should not depend on the video's length. Both inputs are
made from the real bigbuckbunny clip (132 frames), resized to 160x96 and played forward and backward (ping-pong, so
the motion stays continuous), and written as libx264 CRF 0 mp4. Each is super-resolved 2x (320x192) by the demo model
in its own `cascade-vsr upscale` process with the same chunk settings, once with `make demo`'s allocator settings
(glibc keeps freed memory in its heap) and once with glibc's defaults (what a user who just types the command gets):
the two differ because the peak RSS is where the heap's fragmentation settles.

Peak RSS is the kernel's high-water mark of the upscale process's resident set, `ru_maxrss` as `os.wait4` returns it
for exactly that process: it catches peaks that polling would miss. A tiny launcher process spawns and reaps it (see
`run_upscale` for why). VmRSS is also polled from /proc during the run, to show whether memory drifts from window
to window.

The sampler runs once per window (`--self-ensemble 1`) and with `--num-inference-steps 1`: the demo model's own
8-run ensemble and 2 steps are too slow for 600 frames on 2 CPU cores. The steps reuse tensors of one shape and the
ensemble's runs go one at a time (it adds a float64 sum of one window), so neither makes memory depend on length.

    .venv/bin/python benchmarks/upscale_memory.py [--frames-short 60] [--frames-long 600] [--num-inference-steps 1] [--malloc demo glibc]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from cascade_vsr.commands.demo import demo_model_path
from cascade_vsr.core.streams import VideoSink
from cascade_vsr.core.video import read_video, resize_frames, sample_video_path, video_info

MALLOC_SETTINGS = {
    # `make demo`'s (README, attention modes): glibc keeps freed buffers in its heap instead of returning them
    "demo": {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "2147483647"},
    # no MALLOC_* variables, what a user gets: the command line's own settings (`core.allocator`, the same as
    # `demo`'s since it exists; glibc's defaults before, which unmapped large buffers when freed)
    "glibc": {},
}
ACCEPTANCE = 1.15  # long peak / short peak


def ping_pong(frames: np.ndarray, count: int) -> np.ndarray:
    """`count` frames going forward then backward through `frames` (no frame repeated at the turns)."""
    period = 2 * len(frames) - 2
    index = np.arange(count) % period
    return frames[np.where(index < len(frames), index, period - index)]


def make_input(frames: np.ndarray, count: int, fps: float, folder: Path) -> Path:
    path = folder / f"input_{count}.mp4"
    with VideoSink(path, fps=fps, crf=0) as sink:
        for start in range(0, count, 64):  # written in chunks, like any producer of a long video
            sink.write(frames[start : start + 64])
    return path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# Run by a fresh interpreter that imports nothing heavy: it spawns the command (output to its stderr), prints the
# child's pid, reaps the child with wait4 and prints the child's own rusage as JSON.
LAUNCHER = """
import json, os, sys, time
start = time.perf_counter()
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, 2, 1)])
print(pid, flush=True)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
code = os.waitstatus_to_exitcode(status)
print(json.dumps(dict(code=code, wall=wall, maxrss=usage.ru_maxrss, utime=usage.ru_utime, stime=usage.ru_stime)))
"""


def read_status_kib(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of a running process in KiB, None once it has gone."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        return None


def run_upscale(command: list[str], env: dict, log: Path, interval: float) -> dict:
    """Run one upscale process; its exact peak RSS, wall time and a VmRSS trace polled every `interval` s.

    The launcher sits between this process and the upscale: on exec the kernel folds the high-water mark of the
    process image being replaced into the new program's ru_maxrss, so spawned from here (the decoded 720p clip and
    its float resize, over 2 GiB) the child's figure would be this process's peak; the launcher's is ~10 MiB.
    """
    trace, hwm = [], 0
    with log.open("w") as output:
        start = time.perf_counter()
        launcher = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, *command], env=env, stdout=subprocess.PIPE, stderr=output, text=True
        )
        pid = int(launcher.stdout.readline())
        finished = threading.Event()

        def poll() -> None:
            nonlocal hwm
            while not finished.is_set():
                status = read_status_kib(pid)
                if status is not None:
                    trace.append((time.perf_counter() - start, status[0]))
                    hwm = max(hwm, status[1])
                finished.wait(interval)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        result = json.loads(launcher.stdout.readline())
        finished.set()
        poller.join()
        launcher.wait()
    text = log.read_text()
    if result["code"] != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {result['code']}:\n{text[-3000:]}")
    summary = re.search(r": (\d+) frames .* in ([\d.]+) s", text)
    frames, loop_seconds = int(summary.group(1)), float(summary.group(2))
    return {
        "frames": frames,
        "peak_rss_mib": result["maxrss"] / 1024,  # KiB on Linux
        "polled_vmhwm_mib": hwm / 1024,  # the last VmHWM read before exit: a lower bound of the peak
        "wall_s": result["wall"],
        "upscale_s": loop_seconds,  # the command's own figure: reading, super-resolving and writing, no model load
        "frames_per_s": frames / loop_seconds,
        "user_s": result["utime"],
        "system_s": result["stime"],
        "rss_trace": trace,
    }


def trace_quarters(trace: list[tuple[float, int]]) -> list[float]:
    """Max polled VmRSS (MiB) in each quarter of the run's wall time: growth with length shows as a rising row."""
    if not trace:
        return []
    end = trace[-1][0]
    quarters = [[] for _ in range(4)]
    for seconds, rss in trace:
        quarters[min(3, int(4 * seconds / end))].append(rss)
    return [max(values) / 1024 if values else float("nan") for values in quarters]


def thin(trace: list[tuple[float, int]], points: int) -> list[list[float]]:
    """At most `points` samples of (s, MiB), evenly spread over the trace, for the JSON."""
    keep = np.unique(np.linspace(0, len(trace) - 1, min(points, len(trace))).round().astype(int))
    return [[round(trace[i][0], 2), round(trace[i][1] / 1024, 1)] for i in keep]


def upscale_command(video: Path, output: Path, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cascade_vsr.cli",
        "upscale",
        str(video),
        "-o",
        str(output),
        "--scale",
        f"{args.scale:g}",
        "--model",
        str(args.model),
        "--num-inference-steps",
        str(args.num_inference_steps),
        "--self-ensemble",
        str(args.self_ensemble),
        "--chunk-frames",
        str(args.chunk_frames),
        "--chunk-overlap",
        str(args.chunk_overlap),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames-short", type=int, default=60)
    parser.add_argument("--frames-long", type=int, default=600)
    parser.add_argument("--size", type=int, nargs=2, default=(96, 160), metavar=("H", "W"), help="input size")
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--model", type=Path, default=demo_model_path())
    parser.add_argument("--num-inference-steps", type=int, default=1)
    parser.add_argument("--self-ensemble", type=int, default=1)
    parser.add_argument("--chunk-frames", type=int, default=32)
    parser.add_argument("--chunk-overlap", type=int, default=4)
    parser.add_argument(
        "--malloc",
        nargs="+",
        choices=tuple(MALLOC_SETTINGS),
        default=list(MALLOC_SETTINGS),
        help="allocator settings of the upscale processes: `make demo`'s and/or glibc's defaults (what a user gets)",
    )
    parser.add_argument("--poll-interval", type=float, default=0.1, help="seconds between VmRSS samples")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "upscale_memory.json")
    args = parser.parse_args()

    source = sample_video_path("bigbuckbunny.mp4")
    fps = video_info(source)["fps"]
    frames = resize_frames(read_video(source), tuple(args.size), crop_to_aspect=True)
    load_before = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory(prefix="upscale_memory_") as tmp:
        folder = Path(tmp)
        videos = {
            count: make_input(ping_pong(frames, count), count, fps, folder)
            for count in (args.frames_short, args.frames_long)
        }
        for malloc in args.malloc:
            env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
            env.update(MALLOC_SETTINGS[malloc])
            for count, video in videos.items():
                command = upscale_command(video, folder / f"output_{malloc}_{count}.mp4", args)
                print(f"{malloc}, {count} frames: {' '.join(command[1:])}", flush=True)
                run = run_upscale(command, env, folder / f"log_{malloc}_{count}.txt", args.poll_interval)
                runs.append({"malloc": malloc, "child_env": MALLOC_SETTINGS[malloc], **run, "command": command[1:]})
                print(f"  peak RSS {run['peak_rss_mib']:.1f} MiB, {run['wall_s']:.1f} s", flush=True)
    load_after = os.getloadavg()

    acceptance = {}
    for malloc in args.malloc:
        peaks = {run["frames"]: run["peak_rss_mib"] for run in runs if run["malloc"] == malloc}
        ratio = peaks[args.frames_long] / peaks[args.frames_short]
        acceptance[malloc] = {"ratio": ratio, "pass": ratio <= ACCEPTANCE}
    print(
        f"\n{'malloc':<8}{'input':>12}{'peak RSS MiB':>14}{'wall s':>9}{'upscale s':>11}{'frames/s':>10}   polled RSS by quarter"
    )
    for run in runs:
        quarters = " ".join(f"{value:.0f}" for value in trace_quarters(run["rss_trace"]))
        print(
            f"{run['malloc']:<8}{str(run['frames']) + ' frames':>12}{run['peak_rss_mib']:>14.1f}{run['wall_s']:>9.1f}"
            f"{run['upscale_s']:>11.1f}{run['frames_per_s']:>10.3f}   {quarters}"
        )
    for malloc, figures in acceptance.items():
        verdict = "pass" if figures["pass"] else "FAIL"
        print(
            f"{malloc}: peak RSS {args.frames_long} / {args.frames_short} frames = {figures['ratio']:.3f} "
            f"(acceptance <= {ACCEPTANCE}: {verdict})"
        )

    import torch

    result = {
        "machine": {
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_before": [round(value, 2) for value in load_before],
            "load_average_after": [round(value, 2) for value in load_after],
        },
        "settings": {
            "input": f"bigbuckbunny.mp4 resized to {args.size[1]}x{args.size[0]}, ping-pong, mp4 libx264 CRF 0",
            "frames": [args.frames_short, args.frames_long],
            "lr_size": list(args.size),
            "scale": args.scale,
            "model": str(args.model),
            "num_inference_steps": args.num_inference_steps,
            "self_ensemble": args.self_ensemble,
            "chunk_frames": args.chunk_frames,
            "chunk_overlap": args.chunk_overlap,
            "malloc": {malloc: MALLOC_SETTINGS[malloc] for malloc in args.malloc},
            "peak_rss": "ru_maxrss of os.wait4 on each upscale process, spawned by a ~10 MiB launcher",
        },
        "note": (
            "one upscale process per input and allocator setting, one after the other; timings on 2 CPU cores shared "
            "with other jobs; 1 step and 1 run per window (memory per window depends on neither)"
        ),
        "acceptance": {"max_ratio": ACCEPTANCE, **acceptance},
        "runs": [
            {
                **{key: value for key, value in run.items() if key != "rss_trace"},
                "polled_rss_quarters_mib": trace_quarters(run["rss_trace"]),
                "polled_rss_mib": thin(run["rss_trace"], 200),
            }
            for run in runs
        ],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
