"""Seams of a streamed (block-causal) model at its chunk boundaries -> benchmarks/results/seams_<split>.json.

A frame pair (t - 1, t) is a boundary pair when frame t starts a chunk (t a multiple of `causal_chunk_frames`; the
demo's space-to-depth latents have one latent frame per frame), an interior pair otherwise. For each method the
warping error and the relative warping error (`core.metrics`, against the ground truth's DIS flow over its
forward-backward consistent pixels) are averaged over the pixels of the boundary pairs and of the interior pairs;
the ratio boundary / interior is 1 without seams. Bicubic and any other method get the same partition, which shows
how much of a ratio the content gives by itself (a scene's motion need not be uniform in time).

    .venv/bin/python benchmarks/seams.py --split validation --method streamed=outputs/x/export \
        [--method bidirectional=demo/one_step_model] [--chunk-frames 4] [--num-frames 32] [--dtype auto]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from one_step import SPLITS  # noqa: E402

from cascade_vsr.commands import demo  # noqa: E402
from cascade_vsr.core.metrics import consistency_mask, warp_residual  # noqa: E402
from cascade_vsr.core.optical_flow import bidirectional_flow  # noqa: E402
from cascade_vsr.core.precision import DTYPE_NAMES, resolve_dtype  # noqa: E402


def boundary_pairs(num_frames: int, chunk_frames: int) -> torch.Tensor:
    """Bool (T - 1,): pair t - 1 -> t (index t - 1) crosses a chunk boundary."""
    return torch.arange(1, num_frames) % chunk_frames == 0


def split_means(residual: torch.Tensor, valid: torch.Tensor, boundary: torch.Tensor) -> dict[str, float]:
    """Mean of a (T - 1, H, W) residual over the valid pixels of the boundary pairs and of the interior pairs."""
    at_boundary = valid & boundary[:, None, None]
    inside = valid & ~boundary[:, None, None]
    result = {"boundary": float(residual[at_boundary].mean()), "interior": float(residual[inside].mean())}
    result["ratio"] = result["boundary"] / result["interior"]
    return result


def seam_figures(frames: np.ndarray, ground_truth: np.ndarray, backward, mask, boundary) -> dict[str, dict]:
    video = torch.from_numpy(frames.astype(np.float64))
    error = video - torch.from_numpy(ground_truth.astype(np.float64))
    flow = torch.as_tensor(backward, dtype=torch.float64)
    return {
        "warping_error": split_means(*warp_residual(video, flow, mask), boundary),
        "relative_warping_error": split_means(*warp_residual(error, flow, mask), boundary),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=sorted(SPLITS), default="validation")
    parser.add_argument("--method", action="append", required=True, help="label=stage folder (one run, its settings)")
    parser.add_argument("--chunk-frames", type=int, default=None, help="default: the longest causal chunk")
    parser.add_argument("--num-frames", type=int, default=32)
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="the methods' dtype (upscale's)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    methods = {label: Path(path) for label, _, path in (text.partition("=") for text in args.method)}
    dtype = resolve_dtype(args.dtype, "cpu")
    pipes = {label: demo.load_pipeline(path, "cpu", dtype=dtype) for label, path in methods.items()}
    chunks = [p.transformer.config.causal_chunk_frames or 0 for p in pipes.values()]
    chunk_frames = args.chunk_frames or max(chunks) or None
    if chunk_frames is None:
        raise SystemExit("--chunk-frames: no method is block-causal, so say which chunk length to split at")
    if chunk_frames < 2:
        raise SystemExit(
            f"--chunk-frames {chunk_frames}: every frame pair would cross a boundary; split at 2 or more frames "
            "(a sliding window of 1-frame chunks has no seams of its own: compare it at another model's chunks)"
        )
    boundary = boundary_pairs(args.num_frames, chunk_frames)
    results = {}
    for name in SPLITS[args.split]:
        ground_truth, _, lr, bicubic = demo.held_out_clip(name, args.num_frames, (192, 320), SPLITS[args.split])
        backward, forward = bidirectional_flow(ground_truth, preset="medium")
        mask = consistency_mask(backward, forward)
        outputs = {"bicubic": bicubic}
        for label, pipe in pipes.items():
            outputs[label] = demo.super_resolve(pipe, lr, ground_truth.shape[1:3], self_ensemble=1, seed=0)
        results[name] = {
            label: seam_figures(frames, ground_truth, backward, mask, boundary) for label, frames in outputs.items()
        }

    header = f"{'clip':<14}{'method':<16}{'warp: boundary':>15}{'interior':>10}{'ratio':>7}"
    header += f"{'rel. warp: boundary':>21}{'interior':>10}{'ratio':>7}"
    print(f"chunk boundaries every {chunk_frames} frames; {int(boundary.sum())} boundary and "
          f"{int((~boundary).sum())} interior pairs per clip")  # fmt: skip
    print(header)
    for name, rows in results.items():
        for label, figures in rows.items():
            warp, relative = figures["warping_error"], figures["relative_warping_error"]
            print(
                f"{name:<14}{label:<16}{warp['boundary']:>15.3f}{warp['interior']:>10.3f}{warp['ratio']:>7.3f}"
                f"{relative['boundary']:>21.3f}{relative['interior']:>10.3f}{relative['ratio']:>7.3f}"
            )
    output = args.output or Path(__file__).parent / "results" / f"seams_{args.split}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "split": args.split,
        "num_frames": args.num_frames,
        "chunk_frames": chunk_frames,
        "dtype": dtype,
        "methods": {label: str(path) for label, path in methods.items()},
        "clips": results,
    }
    output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
