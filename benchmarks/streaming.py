"""Streaming `cascade-vsr upscale` (a block-causal stage, rolling KV cache) against the windowed path of the same
network -> benchmarks/results/streaming.json: peak memory per input length, frames per second, and where a
streamed chunk's time goes.

The network is the one-step demo model (`demo_model_path(one_step=True)`, fine-tuned causally) with its
`causal_chunk_frames` / `causal_cache_chunks` set to the options (they add no weights; the defaults are its own).
Inputs are the real bigbuckbunny clip at 160x96, played forward and backward to the length asked
(`upscale_memory.ping_pong`), super-resolved 2x (320x192) in fresh processes: the streamed path for every length,
the windowed path (`--no-stream`, 32-frame windows overlapping by 4) for the shortest one. Peak RSS is the
process's exact high-water mark (`upscale_memory.run_upscale`), with `make demo`'s allocator settings
(`--malloc demo`, freed memory kept in glibc's heap) or glibc's defaults (`--malloc glibc`).

The time split comes from torch's profiler on 32 frames streamed in this process as `upscale` streams them (its
chunks per forward), after a warm-up piece: milliseconds a frame of wall time and of self CPU time by operator family
(attention kernels, linear layers, convolutions, layout copies and dtype casts, norms, the rest), and the dispatch
and Python between them.

    .venv/bin/python benchmarks/streaming.py [--frames 64 256 1024] [--chunk-frames C] [--cache-chunks M]
        [--malloc demo|glibc] [--dtype auto|float32|bfloat16] [--baseline-model PATH] [--baseline-dtype D]
        [--baseline-code CHECKOUT] [--repeats N] [--chunks-per-forward K] [--no-profile]

The baseline row streams `--baseline-model` (default: the same model) in `--baseline-dtype` (default: `--dtype`'s),
with this checkout's code or with the code of `--baseline-code` (another checkout of the repository, e.g.
`git worktree add /tmp/base REV`): new code against old on the same model and input. At the shortest length the streamed and baseline runs alternate
`--repeats` times and each reports its median, since this machine's speed drifts by 10-20% over minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from upscale_memory import MALLOC_SETTINGS, cpu_name, make_input, ping_pong, run_upscale  # noqa: E402

from cascade_vsr.commands.demo import demo_model_path  # noqa: E402
from cascade_vsr.core.precision import DTYPE_NAMES  # noqa: E402
from cascade_vsr.core.video import read_video, resize_frames, sample_video_path, video_info  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "streaming.json"


def causal_copy(
    model: Path, folder: Path, chunk_frames: int | None, cache_chunks: int | None
) -> tuple[Path, int, int]:
    """The stage folder `model` with its transformer's causal chunk and cache set where given (None: its own), and
    the two values in effect."""
    target = folder / "causal_model"
    shutil.copytree(model, target)
    config_path = target / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    for name, value in (("causal_chunk_frames", chunk_frames), ("causal_cache_chunks", cache_chunks)):
        if value is not None:
            config[name] = value
    if config.get("causal_chunk_frames") is None:
        raise ValueError(f"{model} is not block-causal: pass --chunk-frames")
    config_path.write_text(json.dumps(config, indent=2))
    return target, config["causal_chunk_frames"], config["causal_cache_chunks"]


def command(
    video: Path, output: Path, model: Path, stream: bool, dtype: str, code: Path | None = None, extra: tuple = ()
) -> list[str]:
    """The upscale command line, with the `extra` options; with `code`, that checkout's packages are imported (on
    PYTHONPATH, see `main`), so the working directory must not come first on the path (python -P), and its
    top-level pipelines/ and degradations/ become `cascade_vsr`'s subpackages (as its install maps them), not this
    checkout's."""
    if code is None:
        start = [sys.executable, "-m", "cascade_vsr.cli"]
    else:
        start = [sys.executable, "-P", "-c", BASELINE_CLI, str(code.resolve())]
    return [
        *start, "upscale", str(video), "-o", str(output), "--scale", "2",
        "--model", str(model), "--stream" if stream else "--no-stream", "--dtype", dtype, *extra,
    ]  # fmt: skip


# `cascade-vsr` of another checkout: its root on `cascade_vsr.__path__`, so that `cascade_vsr.pipelines` and
# `cascade_vsr.degradations` are its own top-level folders, found before the editable install's mapping to this one
BASELINE_CLI = (
    "import sys, cascade_vsr; cascade_vsr.__path__.append(sys.argv.pop(1)); "
    "from cascade_vsr.cli import console_main; sys.exit(console_main())"
)


PROFILED_FRAMES = 32


def profile_stream(
    model: Path, frames: np.ndarray, chunk_frames: int, dtype: str, chunks_per_forward: int | str
) -> dict[str, float]:
    """Milliseconds per frame of streaming `PROFILED_FRAMES` frames with `chunks_per_forward` as `upscale` does (after
    a warm-up piece), in upscale's `dtype`, from torch's profiler: the wall time, and the self CPU time by operator
    family. Dispatch and Python between the operators is the wall time less their sum."""
    import time

    import torch
    from einops import rearrange
    from torch.profiler import ProfilerActivity, profile

    from cascade_vsr.commands.upscale import load_stage
    from cascade_vsr.core.precision import resolve_dtype

    pipe = load_stage(model, "cpu", resolve_dtype(dtype, "cpu"))
    video = rearrange(torch.from_numpy(frames), "t h w c -> 1 t c h w").float() / 255
    lr = pipe.adapter.encode(pipe.vae, pipe.preprocess_video(pipe.adapter, video))
    chunks = [lr[:, :, i : i + chunk_frames] for i in range(0, lr.shape[2], chunk_frames)]
    stream = pipe.stream(
        chunks,
        scale=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        chunks_per_forward=chunks_per_forward,
    )
    next(stream)  # warm-up: the first piece also waits for the upsampler's temporal radius of later frames
    profiled = 0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        while profiled < PROFILED_FRAMES:
            profiled += next(stream).shape[1]
        wall = time.perf_counter() - started
    families = dict.fromkeys(
        ("attention", "linear", "convolutions", "copies and casts", "norms", "other operators"), 0.0
    )
    for event in prof.key_averages():
        name = event.key.lower()
        seconds = event.self_cpu_time_total / 1e6
        if "attention" in name or "softmax" in name or "sdpa" in name:
            families["attention"] += seconds
        elif name in (
            "aten::addmm",
            "aten::mm",
            "aten::bmm",
            "aten::linear",
            "aten::matmul",
            "mkldnn::_linear_pointwise",
        ):
            families["linear"] += seconds
        elif "conv" in name:
            families["convolutions"] += seconds
        elif name in ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::_to_copy"):
            families["copies and casts"] += seconds
        elif "norm" in name:
            families["norms"] += seconds
        else:
            families["other operators"] += seconds
    families["dispatch and Python"] = max(0.0, wall - sum(families.values()))
    families["wall"] = wall
    return {name: 1000 * seconds / profiled for name, seconds in families.items()}


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (path, input length) in order of appearance: the median frames/s and the largest peak RSS of its
    runs."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["path"], row["input_frames"]), []).append(row)
    return [
        {
            "path": path,
            "input_frames": count,
            "runs": len(runs),
            "frames_per_s": float(np.median([r["frames_per_s"] for r in runs])),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        }
        for (path, count), runs in groups.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--size", type=int, nargs=2, default=(96, 160), metavar=("H", "W"))
    parser.add_argument(
        "--chunk-frames", type=int, default=None, help="latent frames per causal chunk (default: the model's)"
    )
    parser.add_argument("--cache-chunks", type=int, default=None, help="cached chunks (default: the model's)")
    parser.add_argument("--model", type=Path, default=demo_model_path(one_step=True))
    parser.add_argument("--malloc", choices=sorted(MALLOC_SETTINGS), default="demo", help="glibc allocator settings")
    parser.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default="auto",
        help="the stage's dtype (upscale's --dtype)",
    )
    parser.add_argument(
        "--baseline-model", type=Path, default=None, help="a stage folder streamed at the shortest length as well"
    )
    parser.add_argument(
        "--baseline-dtype", choices=DTYPE_NAMES, default=None, help="the baseline's dtype (default: --dtype's)"
    )
    parser.add_argument(
        "--baseline-code", type=Path, default=None, help="a checkout whose code runs the baseline (default: this one)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs at the shortest length (median)")
    parser.add_argument(
        "--chunks-per-forward", type=int, default=None, help="upscale's --chunks-per-forward for the streamed runs"
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the profile of one chunk")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.baseline_dtype = args.baseline_dtype or args.dtype
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.baseline_code is not None:
        if not (args.baseline_code / "cascade_vsr" / "__init__.py").is_file():
            parser.error(f"--baseline-code {args.baseline_code} is not a checkout of this repository")
        if args.baseline_model is None:
            args.baseline_model = args.model
    import torch

    source = sample_video_path("bigbuckbunny.mp4")
    clip = resize_frames(read_video(source), tuple(args.size), mode="area", crop_to_aspect=True)
    env = {**os.environ, **MALLOC_SETTINGS[args.malloc]}
    baseline_env = env
    if args.baseline_code is not None:  # its packages first on the path
        baseline_env = {
            **env,
            "PYTHONPATH": os.pathsep.join(p for p in [str(args.baseline_code.resolve()), env.get("PYTHONPATH")] if p),
        }
    streamed_flags = () if args.chunks_per_forward is None else ("--chunks-per-forward", str(args.chunks_per_forward))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model, chunk_frames, cache_chunks = causal_copy(args.model, folder, args.chunk_frames, args.cache_chunks)
        baseline = None
        if args.baseline_model is not None:
            baseline = folder / "baseline_model"
            shutil.copytree(args.baseline_model, baseline)
        lengths = sorted(args.frames)
        for count in lengths:
            video = make_input(ping_pong(clip, count), count, video_info(source)["fps"], folder)
            runs = [("streamed", model, True, args.dtype, None, streamed_flags)]
            if count == lengths[0]:
                if baseline is not None:
                    runs.append(("baseline", baseline, True, args.baseline_dtype, args.baseline_code, ()))
                runs = runs * args.repeats + [("windowed", model, False, args.dtype, None, ())]
            for run, (label, stage, stream, dtype, code, extra) in enumerate(runs):
                name = f"{label}_{count}_{run}"
                result = run_upscale(command(video, folder / f"{name}.mp4", stage, stream, dtype, code, extra),
                                     env if code is None else baseline_env, folder / f"{name}.log", 0.2)  # fmt: skip
                result.pop("rss_trace")
                rows.append({"path": label, "input_frames": count, **result})
                print(f"{label:>9} {count:>5} frames: peak RSS {result['peak_rss_mib']:.0f} MiB, "
                      f"{result['frames_per_s']:.2f} frames/s", flush=True)  # fmt: skip
        split = None
        if not args.no_profile:
            split = profile_stream(
                model, ping_pong(clip, 64), chunk_frames, args.dtype, args.chunks_per_forward or "auto"
            )

    summary = summarize(rows)
    streamed = [r for r in summary if r["path"] == "streamed"]
    ratio = max(r["peak_rss_mib"] for r in streamed) / streamed[0]["peak_rss_mib"]
    print()
    print(f"{'path':<10}{'frames':>8}{'runs':>6}{'peak RSS MiB':>14}{'frames/s':>10}")
    for row in summary:
        print(f"{row['path']:<10}{row['input_frames']:>8}{row['runs']:>6}{row['peak_rss_mib']:>14.0f}"
              f"{row['frames_per_s']:>10.2f}")  # fmt: skip
    print(f"peak RSS, largest vs {streamed[0]['input_frames']} frames (streamed): {ratio:.3f}")
    baseline_rows = [r for r in summary if r["path"] == "baseline"]
    speedup = None
    if baseline_rows:
        speedup = streamed[0]["frames_per_s"] / baseline_rows[0]["frames_per_s"]
        code = "this code" if args.baseline_code is None else f"the code of {args.baseline_code}"
        print(f"frames/s, streamed vs baseline ({args.baseline_model}, {args.baseline_dtype}, {code}): {speedup:.2f}x")
    if split is not None:
        parts = ", ".join(f"{name} {ms:.1f}" for name, ms in split.items() if name != "wall")
        print(f"streamed, ms a frame (torch's profiler, {PROFILED_FRAMES} frames): {split['wall']:.1f} wall = {parts}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "model": str(args.model),
                "malloc": args.malloc,
                "dtype": args.dtype,
                "causal_chunk_frames": chunk_frames,
                "causal_cache_chunks": cache_chunks,
                "chunks_per_forward": args.chunks_per_forward or "auto",
                "size": list(args.size),
                "cpu": cpu_name(),
                "torch_threads": torch.get_num_threads(),
                "rows": rows,
                "summary": summary,
                "peak_rss_ratio_largest_vs_shortest": ratio,
                "baseline_model": None if args.baseline_model is None else str(args.baseline_model),
                "baseline_dtype": args.baseline_dtype,
                "baseline_code": None if args.baseline_code is None else str(args.baseline_code),
                "frames_per_s_ratio_vs_baseline": speedup,
                "profile_ms_per_frame": split,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
