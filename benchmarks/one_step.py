"""One-step models against the multi-step teacher and bicubic -> benchmarks/results/one_step_<split>.json.

Each method super-resolves the same LR clips (the ground truth area-downsampled 2x, as in `make demo`); the table
has PSNR, SSIM, both warping errors, a sharpness figure (the high-frequency energy of the output relative to the
ground truth's: 1 is as sharp, below 1 is blurrier) and the network evaluations and seconds per clip.

Splits: `validation` (frames 200-231 of bikes.mp4, which no demo model trains on: for choosing settings) and
`held-out` (`make demo`'s clips: reported, never tuned on). `--hr-size` sets the ground truth's size (clips larger
than it are centre cropped to its aspect and area-resized, as make-pairs makes HR clips): 192x320 by default, as the
demo; the validation clip at 256x448 is bikes only 1.06x below its source, softer per pixel.

    .venv/bin/python benchmarks/one_step.py --split validation \
        --method teacher=demo/model:2:1 --method teacher-x8=demo/model:2:8 --method apt=outputs/demo-apt/export:1:1 \
        --method one-step-bf16=demo/one_step_model:1:1:bfloat16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cascade_vsr.commands import demo
from cascade_vsr.core.metrics import clip_metrics, metrics_table
from cascade_vsr.core.precision import resolve_dtype

SPLITS = {
    "validation": {"bikes": ("bikes.mp4", 200)},
    "held-out": demo.CLIPS,
}
LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def high_frequency_energy(frames: np.ndarray) -> float:
    """Mean squared Laplacian of the luma of uint8 (T, H, W, 3) frames."""
    luma = torch.from_numpy(frames).double() @ torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
    return float(F.conv2d(luma[:, None], LAPLACIAN.double()[None, None]).square().mean())


def parse_method(text: str) -> tuple[str, Path, int, int, str]:
    """`label=path:steps:self_ensemble[:dtype]` (dtype as upscale's --dtype, float32 by default)."""
    label, _, spec = text.partition("=")
    fields = spec.split(":")
    if len(fields) == 3:
        fields.append("float32")
    if len(fields) != 4:
        raise ValueError(f"`--method` must be label=path:steps:self_ensemble[:dtype], got {text!r}")
    path, steps, runs, dtype = fields
    return label, Path(path), int(steps), int(runs), resolve_dtype(dtype, "cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=sorted(SPLITS), default="validation")
    parser.add_argument("--method", action="append", required=True, help="label=path:steps:self_ensemble")
    parser.add_argument("--num-frames", type=int, default=32)
    parser.add_argument("--hr-size", type=int, nargs=2, default=(192, 320), metavar=("H", "W"))
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    methods = [parse_method(text) for text in args.method]
    clips = SPLITS[args.split]
    pipes = {(path, dtype): demo.load_pipeline(path, "cpu", dtype=dtype) for _, path, _, _, dtype in methods}
    results, timing = {}, {}
    for name in clips:
        ground_truth, _, lr, bicubic = demo.held_out_clip(name, args.num_frames, tuple(args.hr_size), clips)
        outputs = {"bicubic": bicubic}
        timing[name] = {"bicubic": {"seconds": 0.0, "network_evaluations": 0}}
        for label, path, steps, runs, dtype in methods:
            started = time.perf_counter()
            outputs[label] = demo.super_resolve(
                pipes[path, dtype], lr, ground_truth.shape[1:3], num_inference_steps=steps, self_ensemble=runs, seed=0
            )
            timing[name][label] = {"seconds": time.perf_counter() - started, "network_evaluations": steps * runs}
        results[name] = clip_metrics(outputs, ground_truth)
        reference = high_frequency_energy(ground_truth)
        for label, frames in outputs.items():
            results[name][label] |= timing[name][label]
            results[name][label]["sharpness"] = high_frequency_energy(frames) / reference
    labels = {"bicubic": "bicubic"} | {label: label for label, *_ in methods}
    print(metrics_table(results, labels))
    print()
    header = f"{'clip':<14}{'method':<22}{'sharpness':>10}{'NFE':>6}{'s/clip':>9}"
    print(header)
    for name, rows in results.items():
        for label in labels:
            row = rows[label]
            print(
                f"{name:<14}{label:<22}{row['sharpness']:>10.3f}{row['network_evaluations']:>6}{row['seconds']:>9.1f}"
            )
    output = args.output or Path(__file__).parent / "results" / f"one_step_{args.split}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    record = {"split": args.split, "clips": {k: list(v) for k, v in clips.items()}, "num_frames": args.num_frames}
    record["hr_size"] = list(args.hr_size)
    record["methods"] = [
        dict(zip(("label", "path", "steps", "self_ensemble", "dtype"), (m[0], str(m[1]), *m[2:]))) for m in methods
    ]
    output.write_text(json.dumps(record | {"results": results}, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
