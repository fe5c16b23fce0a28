"""`cascade-vsr evaluate SR GT`: PSNR, SSIM and the two warping errors of super-resolved video against ground truth.

SR and GT are each a video file, a folder of PNG / JPEG frames or a glob of frames; or, to evaluate several clips at
once, two folders holding clips matched by name (videos by file stem, frame folders by folder name). Prints a table
per clip and the frame-weighted means over all clips, and writes them as JSON with `--json`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Compare super-resolved video with the ground truth: PSNR, SSIM and temporal consistency, per clip and overall."

BASELINES = ("bicubic",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sr", help="super-resolved video: a file, a folder of frames, a glob, or a folder of clips")
    parser.add_argument("gt", help="ground truth of the same frames, in the same form")
    parser.add_argument(
        "--baseline",
        choices=BASELINES,
        default=None,
        help="also score this upsampling of the LR (given with --lr, else the ground truth area-downsampled by --scale)",
    )
    parser.add_argument("--lr", default=None, help="the low-resolution input, in the same form (for --baseline)")
    parser.add_argument("--scale", type=float, default=2.0, help="LR = GT / scale when --baseline has no --lr")
    parser.add_argument("--num-frames", type=int, default=None, help="evaluate only the first N frames of each clip")
    parser.add_argument("--flow-preset", default="medium", choices=("ultrafast", "fast", "medium"))
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")


def match_clips(sr: str, gt: str) -> dict[str, tuple[Path, Path]]:
    """clip name -> (SR path, GT path). One clip when SR is a file or a frame folder; otherwise the clips of two
    folders matched by name (every SR clip needs its GT)."""
    from cascade_vsr.core.video import frame_files

    sr_path, gt_path = Path(sr), Path(gt)
    if not sr_path.is_dir() or frame_files(sr_path):
        return {sr_path.stem or sr_path.name: (sr_path, gt_path)}

    def clips(folder: Path) -> dict[str, Path]:
        entries = {}
        for entry in sorted(folder.iterdir()):
            if entry.is_dir() and frame_files(entry):
                entries[entry.name] = entry
            elif entry.is_file() and not entry.name.startswith("."):
                entries[entry.stem] = entry
        return entries

    if not gt_path.is_dir():
        raise ValueError(f"`gt` must be a folder of clips like `sr` {sr!r}, got {gt!r}")
    sr_clips, gt_clips = clips(sr_path), clips(gt_path)
    if not sr_clips:
        raise ValueError(f"`sr` {sr!r} holds no clips (videos or folders of frames)")
    missing = sorted(set(sr_clips) - set(gt_clips))
    if missing:
        raise ValueError(f"`gt` {gt!r} has no clip named {missing} (clips are matched by name)")
    return {name: (path, gt_clips[name]) for name, path in sr_clips.items()}


def check_args(args: argparse.Namespace) -> None:
    if args.num_frames is not None and args.num_frames < 2:
        raise ValueError(
            f"`--num-frames` must be >= 2 (the warping errors compare frame pairs), got {args.num_frames}"
        )
    if not args.scale >= 1:
        raise ValueError(f"`--scale` must be a number >= 1, got {args.scale}")
    if args.lr is not None and args.baseline is None:
        raise ValueError("`--lr` is only used with `--baseline`")
    if args.json is not None:
        from cascade_vsr.core.validation import check_writable_file

        check_writable_file(args.json, "--json")


def baseline_frames(gt, lr, size: tuple[int, int], scale: float):
    """Bicubic upsampling to `size` of the LR frames, or of the ground truth area-downsampled by `scale`."""
    from cascade_vsr.core.video import resize_frames

    if lr is None:
        lr = resize_frames(gt, (max(round(size[0] / scale), 1), max(round(size[1] / scale), 1)), mode="area")
    return resize_frames(lr, size, mode="bicubic")


def evaluate(
    clips: dict[str, tuple[Path, Path]],
    num_frames: int | None = None,
    baseline: str | None = None,
    lr: str | None = None,
    scale: float = 2.0,
    flow_preset: str = "medium",
) -> dict:
    """{"clips": {name: clip_metrics}, "overall": {method: frame-weighted means}, "frames": {name: count}}."""
    from cascade_vsr.core.metrics import clip_metrics
    from cascade_vsr.core.video import read_frames

    results, frame_counts = {}, {}
    for name, (sr_path, gt_path) in clips.items():  # one clip at a time: memory of one clip
        sr, gt = read_frames(sr_path, num_frames=num_frames), read_frames(gt_path, num_frames=num_frames)
        count = min(len(sr), len(gt))
        if len(sr) != len(gt) and num_frames is None:
            raise ValueError(
                f"clip {name!r}: SR has {len(sr)} frames and GT {len(gt)}; pass `--num-frames` {count} to compare "
                "the first frames of both"
            )
        if sr.shape[1:] != gt.shape[1:]:
            raise ValueError(f"clip {name!r}: SR frames {sr.shape[1:3]} and GT frames {gt.shape[1:3]} differ in size")
        if count < 2:
            raise ValueError(f"clip {name!r} needs at least 2 frames in both SR and GT, got {len(sr)} and {len(gt)}")
        sr, gt = sr[:count], gt[:count]
        outputs = {"sr": sr}
        if baseline is not None:
            low = read_frames(lr, num_frames=num_frames)[:count] if lr is not None else None
            outputs = {baseline: baseline_frames(gt, low, gt.shape[1:3], scale), "sr": sr}
        results[name] = clip_metrics(outputs, gt, flow_preset=flow_preset)
        frame_counts[name] = count
    return {"clips": results, "overall": overall_means(results, frame_counts), "frames": frame_counts}


def overall_means(results: dict, frame_counts: dict[str, int]) -> dict:
    """Per method, every figure averaged over the clips weighted by their frame counts."""
    total = sum(frame_counts.values())
    methods = [m for m, value in next(iter(results.values())).items() if isinstance(value, dict)]
    return {
        method: {
            figure: sum(results[clip][method][figure] * frame_counts[clip] for clip in results) / total
            for figure in results[next(iter(results))][method]
        }
        for method in methods
    }


def run(args: argparse.Namespace) -> int:
    import json

    from cascade_vsr.core.metrics import metrics_table

    check_args(args)
    clips = match_clips(args.sr, args.gt)
    summary = evaluate(clips, args.num_frames, args.baseline, args.lr, args.scale, args.flow_preset)
    table = {**summary["clips"], **({"overall": summary["overall"]} if len(clips) > 1 else {})}
    print(metrics_table(table, labels={"sr": "sr", "ground_truth": "ground truth"}))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        partial = args.json.with_name(f".{args.json.name}.partial")
        partial.write_text(json.dumps(summary, indent=2) + "\n")
        partial.replace(args.json)
        print(f"wrote {args.json}")
    return 0
