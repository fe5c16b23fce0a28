"""Where the demo model's flicker comes from -> benchmarks/results/demo_temporal.json.

Breaks the relative warping error of `make demo` (bicubic vs cascade-vsr, same frames, LR, sampler and ground
truth flow) down by how far the ground truth moves between frames, and adds two what-if rows that bound what
steadier static detail alone could give:

- "bicubic's flicker where static": cascade-vsr's figure with its static bin (< 0.25 px) replaced by bicubic's;
- "detail held where still": cascade-vsr's added detail (output - bicubic) replaced by its mean over the clip at
  the pixels that the LR input's own flow calls still (< 0.25 px) in every frame pair.

    .venv/bin/python benchmarks/demo_temporal.py [--model demo/model] [--num-frames 32]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from cascade_vsr.commands import demo
from cascade_vsr.core.metrics import consistency_mask, warp_residual
from cascade_vsr.core.optical_flow import bidirectional_flow, compute_flow

MOTION_BINS = ((0.0, 0.25), (0.25, 1.0), (1.0, 3.0), (3.0, float("inf")))  # ground-truth motion, HR pixels
STILL = 0.25  # px


def error_residual(frames: np.ndarray, ground_truth: np.ndarray, backward, mask) -> tuple[torch.Tensor, torch.Tensor]:
    error = torch.from_numpy(frames.astype(np.float64) - ground_truth.astype(np.float64))
    return warp_residual(error, torch.as_tensor(backward, dtype=torch.float64), mask)


def detail_held_where_still(output: np.ndarray, bicubic: np.ndarray, lr: np.ndarray) -> tuple[np.ndarray, float]:
    """`output` with its detail over bicubic replaced by the clip mean where the LR flow is still in every pair,
    and the share of those pixels."""
    lr_backward = torch.from_numpy(compute_flow(lr, preset="medium"))
    lr_motion = rearrange(lr_backward.norm(dim=-1), "t h w -> t 1 h w")
    motion = rearrange(F.interpolate(lr_motion, size=output.shape[1:3], mode="bilinear"), "t 1 h w -> t h w")
    motion = motion * demo.SCALE  # LR pixels -> HR pixels
    still = (motion < STILL).all(dim=0)[None, :, :, None].numpy()
    detail = output.astype(np.float64) - bicubic.astype(np.float64)
    held = np.where(still, detail.mean(axis=0, keepdims=True), detail)
    return np.clip(np.rint(bicubic + held), 0, 255).astype(np.uint8), float(still.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=demo.demo_model_path())
    parser.add_argument("--num-frames", type=int, default=32)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/demo_temporal.json"))
    options = parser.parse_args()

    # single runs: the sweep / breakdown is of one sampler run (make demo averages 8, `--self-ensemble`)
    args = demo.parse_args(
        ["--model", str(options.model), "--num-frames", str(options.num_frames), "--self-ensemble", "1"]
    )
    pipe = demo.load_pipeline(args.model, "cpu")
    pipe.set_progress_bar_config(disable=True)

    results = {}
    for clip in demo.CLIPS:
        ground_truth, _, lr, bicubic = demo.held_out_clip(clip, args.num_frames, tuple(args.hr_size))
        size = ground_truth.shape[1:3]
        output = demo.super_resolve(pipe, lr, size, **demo.sampler_settings(args), desc=clip)
        held, still_share = detail_held_where_still(output, bicubic, lr)

        backward, forward = bidirectional_flow(ground_truth)
        mask = consistency_mask(backward, forward)
        motion = torch.from_numpy(backward).double().norm(dim=-1)
        residuals = {
            name: error_residual(frames, ground_truth, backward, mask)
            for name, frames in (("bicubic", bicubic), ("cascade_vsr", output), ("detail held where still", held))
        }
        valid = residuals["bicubic"][1]
        bins = []
        for low, high in MOTION_BINS:
            selected = valid & (motion >= low) & (motion < high)
            row = {"motion_px": [low, high], "share": float(selected.sum() / valid.sum())}
            for name in ("bicubic", "cascade_vsr"):
                error = residuals[name][0]
                row[name] = float(error[selected].mean())
                row[f"{name}_contribution"] = float(error[selected].sum() / valid.sum())
            bins.append(row)
        totals = {name: float(error[valid].mean()) for name, (error, _) in residuals.items()}
        static = bins[0]
        totals["bicubic's flicker where static"] = (
            totals["cascade_vsr"] - static["cascade_vsr_contribution"] + static["bicubic_contribution"]
        )
        results[clip] = {"bins": bins, "relative_warping_error": totals, "lr_still_share": still_share}

    for clip, result in results.items():
        print(f"\n{clip}: relative warping error by ground-truth motion")
        print(f"{'motion (px)':<14}{'share':>8}{'bicubic':>10}{'cascade-vsr':>13}")
        for row in result["bins"]:
            low, high = row["motion_px"]
            print(f"{f'[{low:g}, {high:g})':<14}{row['share']:8.3f}{row['bicubic']:10.3f}{row['cascade_vsr']:13.3f}")
        for name, value in result["relative_warping_error"].items():
            print(f"  {name:<34}{value:.3f}")
        print(f"  (pixels still through the clip by the LR flow: {result['lr_still_share']:.3f})")
    options.output.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        "model": str(options.model),
        "num_frames": args.num_frames,
        "num_inference_steps": args.num_inference_steps,
        "noise_frame_correlation": args.noise_frame_correlation,
        "seed": args.seed,
    }
    options.output.write_text(json.dumps({"settings": settings, "clips": results}, indent=2))
    print(f"wrote {options.output}")


if __name__ == "__main__":
    main()
