"""`cascade-vsr calibrate-sampler`: measure the detail-aware timestep distribution of a trained model."""

from __future__ import annotations

import argparse

HELP = "Calibrate the detail-aware timestep sampler on LR latents with a trained model (JSON + PNG)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="An export folder (upsampler/ and transformer/).")
    parser.add_argument("--data", required=True, help="A pair dataset whose LR latents are used.")
    parser.add_argument("--output", required=True, help="Output JSON; the plot is written next to it as .png.")
    parser.add_argument("--num-clips", type=int, default=8)
    parser.add_argument("--num-steps", type=int, default=50)
    parser.add_argument("--noise-level", type=float, default=0.3, help="Fixed noise augmentation of the LR.")
    parser.add_argument("--cutoff", type=float, default=0.5, help="High-frequency band: max(u/H, v/W) >= cutoff.")
    parser.add_argument("--floor", type=float, default=0.05, help="Uniform mass mixed into the distribution.")
    parser.add_argument("--num-latent-frames", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")


def check_args(args: argparse.Namespace) -> None:
    """The command line's own names in the messages; `calibrate` checks the same values again."""
    for name in ("num_clips", "num_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be a positive int, got {getattr(args, name)}")
    if args.num_latent_frames is not None and args.num_latent_frames < 1:
        raise ValueError(f"`--num-latent-frames` must be positive, got {args.num_latent_frames}")
    if not 0 <= args.noise_level <= 1:
        raise ValueError(f"`--noise-level` must lie in [0, 1], got {args.noise_level}")
    if not 0 < args.cutoff < 1:
        raise ValueError(f"`--cutoff` must lie in (0, 1), got {args.cutoff}")
    if not 0 <= args.floor < 1:
        raise ValueError(f"`--floor` must lie in [0, 1), got {args.floor}")
    if args.seed < 0:
        raise ValueError(f"`--seed` must be >= 0, got {args.seed}")


def run(args: argparse.Namespace) -> int:
    from cascade_vsr.training.calibrate import calibrate

    check_args(args)

    json_path, png_path = calibrate(
        args.model,
        args.data,
        args.output,
        num_clips=args.num_clips,
        num_steps=args.num_steps,
        noise_level=args.noise_level,
        cutoff=args.cutoff,
        floor=args.floor,
        num_latent_frames=args.num_latent_frames,
        seed=args.seed,
        device=args.device,
    )
    print(f"wrote {json_path} and {png_path}")
    return 0
