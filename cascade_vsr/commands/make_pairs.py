"""`cascade-vsr make-pairs INPUTS --output-dir DIR [...]`: build a training-pair dataset (HR clips, degraded LR
clips, optional upstream latents) with `cascade_vsr.degradations.make_pairs.build_dataset`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cascade_vsr.degradations.pair_settings import DEGRADATIONS, DIS_PRESETS, FRAMES_FORMATS, PairSettings

HELP = "Synthesize (HR, degraded LR) training pairs from videos, with optional upstream latents."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="video files, folders (searched recursively) or glob patterns")
    parser.add_argument(
        "--output-dir",
        type=Path,
        required=True,
        help="the dataset folder; one make-pairs run at a time: a second run on a folder in use is refused, naming "
        "the first one's pid (it holds DIR/.make-pairs.lock until it exits)",
    )
    parser.add_argument("--num-frames", type=int, default=17, help="frames per clip (4k+1 for most VAEs)")
    parser.add_argument("--stride", type=int, default=1, help="take every stride-th source frame (>= 1)")
    parser.add_argument(
        "--clip-step",
        type=int,
        default=None,
        help="source frames between clip starts, >= 1 (default: num_frames * stride, non-overlapping)",
    )
    parser.add_argument(
        "--max-clips-per-video", type=int, default=None, help="at most this many clips (>= 1) per video (default: all)"
    )
    parser.add_argument(
        "--frame-range",
        type=int,
        nargs=2,
        metavar=("START", "END"),
        default=None,
        help="use only source frames [START, END) of every video (e.g. to hold frames out for evaluation)",
    )
    parser.add_argument(
        "--hr-size",
        type=int,
        nargs=2,
        default=(1088, 1920),
        metavar=("H", "W"),
        help="HR clip size, positive multiples of 16; a video smaller than it (in H or W) is skipped with a warning "
        "and its clips are recorded in rejected.jsonl: never upscaled into a fake HR",
    )
    parser.add_argument(
        "--lr-scale",
        type=float,
        default=0.5,
        help="LR side / HR side (0.5 = 1/4 of the area, 0.71 = 1/2); sizes round to multiples of 16",
    )
    parser.add_argument(
        "--degradations",
        default="flow=0.5,classic1=0.25,classic2=0.25",
        help=f"mix of {', '.join(DEGRADATIONS)} as name=weight pairs",
    )
    parser.add_argument(
        "--classic-options",
        type=json.loads,
        default=None,
        help="JSON object of ClassicDegradationConfig overrides, e.g. '{\"gaussian_sigma\": [0, 3]}' for milder pairs",
    )
    parser.add_argument(
        "--still-fraction",
        type=float,
        default=0.0,
        help="share of clips made a still shot of their middle frame with per-frame noise (degradations/still.py)",
    )
    parser.add_argument(
        "--still-noise", type=float, default=0.25, help="std of each half (white, low-pass) of a still shot's noise"
    )
    parser.add_argument("--dis-preset", default="fast", choices=DIS_PRESETS)
    parser.add_argument("--alpha", type=float, nargs=2, default=(0.3, 0.4), help="model-guided noise level range")
    parser.add_argument("--sdedit-steps", type=int, default=20, help="model-guided schedule steps (>= 1)")
    parser.add_argument(
        "--sdedit-guidance-scale",
        type=float,
        default=None,
        help="the upstream's classifier-free guidance scale for model-guided denoising (default: the upstream's own)",
    )
    parser.add_argument(
        "--upstream",
        default=None,
        help="a diffusers T2V pipeline folder (save_pretrained): HR/LR latents with its VAE; or `space_to_depth` "
        "for pixel-space latents (SpaceToDepthAutoencoder, no T2V model: no model_guided, no text embeddings)",
    )
    parser.add_argument("--prompt", default="", help="caption used for model-guided denoising and text embeddings")
    parser.add_argument(
        "--text-embeds", action="store_true", help="store the upstream's prompt embeddings (needs a T2V `--upstream`)"
    )
    parser.add_argument("--frames-format", default="mp4", choices=FRAMES_FORMATS)
    parser.add_argument("--crf", type=int, default=12, help="x264 CRF of the stored mp4 clips, 0-51")
    parser.add_argument("--no-quality-filter", action="store_true")
    parser.add_argument(
        "--quality-score",
        default=None,
        metavar="MODULE:CALLABLE",
        help="a learned quality score (e.g. a MUSIQ wrapper): uint8 frames (N, H, W, 3) -> float",
    )
    parser.add_argument("--min-quality-score", type=float, default=40.0)
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (>= 0): each clip's seed derives from it")
    parser.add_argument("--num-workers", type=int, default=0, help="worker processes (0: in this process)")
    parser.add_argument("--preview", type=int, default=0, metavar="N", help="write preview.png with N clips")


def settings_from_args(args: argparse.Namespace) -> PairSettings:
    """The parsed options as PairSettings (checked; ValueError naming the option)."""
    return PairSettings.from_options(
        num_frames=args.num_frames,
        stride=args.stride,
        clip_step=args.clip_step,
        max_clips_per_video=args.max_clips_per_video,
        frame_range=args.frame_range,
        hr_size=args.hr_size,
        lr_scale=args.lr_scale,
        degradations=args.degradations,
        classic_options=args.classic_options,
        still_fraction=args.still_fraction,
        still_noise=args.still_noise,
        dis_preset=args.dis_preset,
        alpha=args.alpha,
        sdedit_steps=args.sdedit_steps,
        sdedit_guidance_scale=args.sdedit_guidance_scale,
        upstream=args.upstream,
        prompt=args.prompt,
        text_embeds=bool(args.text_embeds),
        frames_format=args.frames_format,
        crf=args.crf,
        quality_filter=not args.no_quality_filter,
        quality_score=args.quality_score,
        min_quality_score=args.min_quality_score,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    from cascade_vsr.degradations.make_pairs import build_dataset

    settings = settings_from_args(args)
    counts = build_dataset(args.inputs, args.output_dir, settings, args.num_workers, args.preview)
    # One write per line: under `accelerate launch` (unbuffered stdout) print's separate "\n" write let the
    # processes' lines interleave.
    sys.stdout.write(json.dumps(counts) + "\n")
    sys.stdout.flush()
    return 0
