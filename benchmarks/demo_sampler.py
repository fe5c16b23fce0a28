"""Sampler settings of the demo model on the held-out clips -> benchmarks/results/demo_sampler.json.

For each (Euler steps, noise correlation between frames, temporal attention window) setting: PSNR, SSIM, warping
error and relative warping error against bicubic and the ground truth, on the same frames, LR and metrics as
`make demo` (clean condition, seed 0). Shows why the demo samples with 2 steps and shared noise, and why its
attention windows span the whole clip.

    .venv/bin/python benchmarks/demo_sampler.py [--model demo/model] [--num-frames 32]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cascade_vsr.commands import demo
from cascade_vsr.core.metrics import clip_metrics

# (steps, noise_frame_correlation, latent frames per attention window; 0: the model's own, the whole clip)
SETTINGS = [(1, 0.0, 0), (2, 0.0, 0), (2, 1.0, 0), (2, 1.0, 5), (4, 1.0, 0), (8, 0.0, 0), (8, 1.0, 0)]
COLUMNS = ("psnr", "ssim", "warping_error", "relative_warping_error")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=demo.demo_model_path())
    parser.add_argument("--num-frames", type=int, default=32)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/demo_sampler.json"))
    options = parser.parse_args()

    # single runs: the sweep / breakdown is of one sampler run (make demo averages 8, `--self-ensemble`)
    args = demo.parse_args(
        ["--model", str(options.model), "--num-frames", str(options.num_frames), "--self-ensemble", "1"]
    )
    pipes = {
        window: demo.load_pipeline(args.model, "cpu", temporal_window=window) for window in {s[2] for s in SETTINGS}
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)

    results = {}
    for clip in demo.CLIPS:
        ground_truth, _, lr, bicubic = demo.held_out_clip(clip, args.num_frames, tuple(args.hr_size))
        size = ground_truth.shape[1:3]
        outputs = {"bicubic": bicubic}
        for steps, correlation, window in SETTINGS:
            sampler = demo.sampler_settings(args) | dict(
                num_inference_steps=steps, noise_frame_correlation=correlation
            )
            name = f"{steps} steps, correlation {correlation:g}" + (f", window {window}" if window else "")
            outputs[name] = demo.super_resolve(pipes[window], lr, size, **sampler, desc=clip)
        results[clip] = clip_metrics(outputs, ground_truth)

    print(f"{'clip':<14}{'method':<38}{'PSNR':>8}{'SSIM':>8}{'warp':>8}{'rel. warp':>11}")
    for clip, metrics in results.items():
        for method in (*[m for m in metrics if m not in ("ground_truth", "consistent_flow_fraction")], "ground_truth"):
            m = metrics[method]
            quality = f"{m['psnr']:8.2f}{m['ssim']:8.4f}" if "psnr" in m else f"{'':>16}"
            print(f"{clip:<14}{method:<38}{quality}{m['warping_error']:8.3f}{m['relative_warping_error']:11.3f}")
    options.output.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        "model": str(options.model),
        "num_frames": args.num_frames,
        "hr_size": list(args.hr_size),
        "noise_aug_strength": args.noise_aug_strength,
        "seed": args.seed,
    }
    options.output.write_text(json.dumps({"settings": settings, "clips": results}, indent=2))
    print(f"wrote {options.output}")


if __name__ == "__main__":
    main()
