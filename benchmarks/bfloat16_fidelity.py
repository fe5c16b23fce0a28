"""How closely a bfloat16 stage reproduces its own float32 output -> benchmarks/results/bfloat16_fidelity.json.

The one-step demo model (or `--model`) super-resolves the validation clip (frames 200-231 of bikes.mp4) and frames
0-31 of bigbuckbunny.mp4 (training frames of the demo models: no held-out clip is read) three ways, as `make demo`
runs a stage (`demo.super_resolve`, one run):

- `float32`: the stage in float32, the reference;
- `bfloat16`: the stage as `upscale --dtype bfloat16` loads it, the clip kept in float32 up to the transformer's
  first layer (the space-to-depth VAE reports float32, the upsampler's base resize is float32, the patch embedding
  is kept in float32);
- `bfloat16, clip rounded`: the same, with the clip rounded to bfloat16 where a bfloat16 stage rounded it before:
  the LR latents and the upsampler's output, the patch embedding's input, and the HR latents before decoding.

For each: PSNR of its frames against the float32 stage's frames (how far bfloat16 moves the output), and PSNR, SSIM
and the relative warping error against the ground truth (`core.metrics`).

    .venv/bin/python benchmarks/bfloat16_fidelity.py [--model demo/one_step_model] [--output PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import numpy as np
import torch

from cascade_vsr.commands import demo
from cascade_vsr.core.metrics import clip_metrics

CLIPS = {
    "bikes 200-231 (validation)": ("bikes.mp4", 200),
    "bigbuckbunny 0-31 (training frames)": ("bigbuckbunny.mp4", 0),
}
RESULTS = Path(__file__).parent / "results" / "bfloat16_fidelity.json"


def clip_psnr(frames: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of uint8 frames against others, from the MSE over the whole clip (+inf where equal): unlike the mean
    of `core.metrics.psnr`'s per-frame values, it stays finite when some frames of the two outputs are identical."""
    mse = np.mean((frames.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def super_resolve(stage, lr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return demo.super_resolve(stage, lr, size, num_inference_steps=1, self_ensemble=1, seed=0)


def _rounded(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(x.dtype)


@contextlib.contextmanager
def clip_rounded(pipe):
    """Round the clip to bfloat16 at the points where a bfloat16 stage used to: the upsampler's input and output,
    the patch embedding's input and the latents handed to the VAE's decode."""
    upsampler, embedding, vae = pipe.upsampler, pipe.transformer.patch_embedding, pipe.vae
    handles = [
        upsampler.register_forward_pre_hook(
            lambda module, args, kwargs: ((_rounded(args[0]),), kwargs), with_kwargs=True
        ),
        upsampler.register_forward_hook(
            lambda module, args, kwargs, out: (_rounded(out[0]),) if isinstance(out, tuple) else None, with_kwargs=True
        ),
        embedding.register_forward_pre_hook(lambda module, args: (_rounded(args[0]),)),
    ]
    decode = vae.decode
    vae.decode = lambda z, *args, **kwargs: decode(_rounded(z), *args, **kwargs)
    try:
        yield
    finally:
        vae.decode = decode
        for handle in handles:
            handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=demo.demo_model_path(one_step=True))
    parser.add_argument("--num-frames", type=int, default=32)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    reference_pipe = demo.load_pipeline(args.model, "cpu", dtype="float32")
    pipe = demo.load_pipeline(args.model, "cpu", dtype="bfloat16")
    results = {}
    for name in CLIPS:
        ground_truth, _, lr, bicubic = demo.held_out_clip(name, args.num_frames, (192, 320), CLIPS)

        size = ground_truth.shape[1:3]
        outputs = {"float32": super_resolve(reference_pipe, lr, size), "bfloat16": super_resolve(pipe, lr, size)}
        with clip_rounded(pipe):
            outputs["bfloat16, clip rounded"] = super_resolve(pipe, lr, size)
        metrics = clip_metrics({"bicubic": bicubic, **outputs}, ground_truth)
        for label, frames in outputs.items():
            metrics[label]["psnr_against_float32"] = (
                None if label == "float32" else clip_psnr(frames, outputs["float32"])
            )
        results[name] = metrics

    print(f"{'clip':38s}{'method':26s}{'PSNR vs fp32':>13s}{'PSNR':>8s}{'SSIM':>8s}{'rel. warp':>11s}")
    for name, rows in results.items():
        for label in ("bicubic", "float32", "bfloat16", "bfloat16, clip rounded"):
            row = rows[label]
            against = row.get("psnr_against_float32")
            against = "" if against is None else f"{against:.2f}"
            print(
                f"{name:38s}{label:26s}{against:>13s}{row['psnr']:8.3f}{row['ssim']:8.4f}"
                f"{row['relative_warping_error']:11.4f}"
            )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    record = {"model": str(args.model), "clips": {k: list(v) for k, v in CLIPS.items()}, "results": results}
    args.output.write_text(json.dumps(record, indent=2, default=float) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
