"""`cascade-vsr make-pairs`: build a training-pair dataset (HR clips, degraded LR clips, optional latents).

Layout (read by the trainer; see the project's dataset format):

    ROOT/dataset.json     {"format": "cascade-vsr-pairs", "version": 1, "config": {...}}
    ROOT/manifest.jsonl   one line per completed clip, appended after all of its files are in place
    ROOT/clips/<id>/      hr.mp4, lr.mp4 (or hr/, lr/ PNG frames) and latents.safetensors

Crash safety: a clip is written into ROOT/clips/.tmp-<id>-<pid>/, renamed to ROOT/clips/<id>/ in one
`os.replace`, and only then gets its manifest line (one locked `write` in append mode). A re-run skips the ids
in the manifest, and removes leftover temporary folders and clip folders without a manifest line before
redoing those clips, so a run killed at any point and re-run gives each clip exactly once, complete.
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

HELP = "Synthesize (HR, degraded LR) training pairs from videos, with optional upstream latents."

FORMAT = "cascade-vsr-pairs"
VERSION = 1
DEGRADATIONS = ("flow", "classic1", "classic2", "model_guided", "none")  # none: the clean area-resized LR
SPACE_TO_DEPTH = "space_to_depth"  # `--upstream` value for pixel-space latents
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".ts", ".y4m")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="video files, folders (searched recursively) or glob patterns")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--num-frames", type=int, default=17, help="frames per clip (4k+1 for most VAEs)")
    parser.add_argument("--stride", type=int, default=1, help="take every stride-th source frame")
    parser.add_argument(
        "--clip-step",
        type=int,
        default=None,
        help="source frames between clip starts (default: num_frames * stride, non-overlapping)",
    )
    parser.add_argument("--max-clips-per-video", type=int, default=None)
    parser.add_argument(
        "--frame-range",
        type=int,
        nargs=2,
        metavar=("START", "END"),
        default=None,
        help="use only source frames [START, END) of every video (e.g. to hold frames out for evaluation)",
    )
    parser.add_argument("--hr-size", type=int, nargs=2, default=(1088, 1920), metavar=("H", "W"))
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
    parser.add_argument("--dis-preset", default="fast", choices=("ultrafast", "fast", "medium"))
    parser.add_argument("--alpha", type=float, nargs=2, default=(0.3, 0.4), help="model-guided noise level range")
    parser.add_argument("--sdedit-steps", type=int, default=20)
    parser.add_argument(
        "--upstream",
        default=None,
        help="a diffusers T2V pipeline folder (save_pretrained): HR/LR latents with its VAE; or `space_to_depth` "
        "for pixel-space latents (SpaceToDepthAutoencoder, no T2V model: no model_guided, no text embeddings)",
    )
    parser.add_argument("--prompt", default="", help="caption used for model-guided denoising and text embeddings")
    parser.add_argument("--text-embeds", action="store_true", help="store the upstream prompt embeddings")
    parser.add_argument("--frames-format", default="mp4", choices=("mp4", "png"))
    parser.add_argument("--crf", type=int, default=12, help="x264 CRF of the stored mp4 clips")
    parser.add_argument("--no-quality-filter", action="store_true")
    parser.add_argument(
        "--quality-score",
        default=None,
        metavar="MODULE:CALLABLE",
        help="a learned quality score (e.g. a MUSIQ wrapper): uint8 frames (N, H, W, 3) -> float",
    )
    parser.add_argument("--min-quality-score", type=float, default=40.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=0, help="worker processes (0: in this process)")
    parser.add_argument("--preview", type=int, default=0, metavar="N", help="write preview.png with N clips")


# ---------------------------------------------------------------------------------------------------- settings


@dataclass
class PairSettings:
    """Everything that defines a dataset (stored in dataset.json) plus how to run."""

    num_frames: int = 17
    stride: int = 1
    clip_step: int | None = None
    max_clips_per_video: int | None = None
    frame_range: tuple[int, int] | None = None
    hr_size: tuple[int, int] = (1088, 1920)
    lr_size: tuple[int, int] = (544, 960)
    degradations: dict = field(default_factory=lambda: {"flow": 0.5, "classic1": 0.25, "classic2": 0.25})
    classic_options: dict | None = None
    still_fraction: float = 0.0
    still_noise: float = 0.25
    dis_preset: str = "fast"
    alpha: tuple[float, float] = (0.3, 0.4)
    sdedit_steps: int = 20
    upstream: str | None = None
    latent_space: str | None = None
    prompt: str = ""
    text_embeds: bool = False
    frames_format: str = "mp4"
    crf: int = 12
    quality_filter: bool = True
    quality_score: str | None = None
    min_quality_score: float = 40.0
    seed: int = 0

    def dataset_config(self) -> dict:
        config = {key: (list(v) if isinstance(v, tuple) else v) for key, v in self.__dict__.items()}
        config["clip_step"] = self.clip_step or self.num_frames * self.stride
        return config


def parse_mix(text: str) -> dict[str, float]:
    """'flow=0.5,classic1=0.5' -> normalized weights; ValueError naming `--degradations` otherwise."""
    mix = {}
    for item in filter(None, (part.strip() for part in str(text).split(","))):
        name, _, weight = item.partition("=")
        name = name.strip()
        if name not in DEGRADATIONS:
            raise ValueError(f"`--degradations`: unknown degradation {name!r}; expected some of {DEGRADATIONS}")
        try:
            mix[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"`--degradations`: weight of {name!r} must be a number, got {weight!r}") from None
        if mix[name] < 0:
            raise ValueError(f"`--degradations`: weight of {name!r} must be >= 0, got {mix[name]}")
    total = sum(mix.values())
    if total <= 0:
        raise ValueError(f"`--degradations` must give a positive weight to one of {DEGRADATIONS}, got {text!r}")
    return {name: weight / total for name, weight in mix.items() if weight > 0}


def round16(value: float) -> int:
    return max(16, int(round(value / 16)) * 16)


def settings_from_args(args: argparse.Namespace) -> PairSettings:
    for name in ("num_frames", "stride"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be >= 1, got {getattr(args, name)}")
    if args.num_frames < 2:
        raise ValueError(
            f"`--num-frames` must be >= 2 (the flow-based degradation needs pairs), got {args.num_frames}"
        )
    hr_size = tuple(int(s) for s in args.hr_size)
    if any(s < 16 or s % 16 for s in hr_size):
        raise ValueError(f"`--hr-size` must be positive multiples of 16, got {hr_size}")
    if not 0 < args.lr_scale < 1:
        raise ValueError(f"`--lr-scale` must be in (0, 1), got {args.lr_scale}")
    if not 0 <= args.alpha[0] <= args.alpha[1] <= 1:
        raise ValueError(f"`--alpha` must be a range inside [0, 1], got {tuple(args.alpha)}")
    if args.frame_range is not None and not 0 <= args.frame_range[0] < args.frame_range[1]:
        raise ValueError(f"`--frame-range` must be START END with 0 <= START < END, got {tuple(args.frame_range)}")
    if args.classic_options is not None:
        if not isinstance(args.classic_options, dict):
            raise ValueError(f"`--classic-options` must be a JSON object, got {args.classic_options!r}")
        classic_config(args.classic_options, order=1)
    if not 0 <= args.still_fraction <= 1:
        raise ValueError(f"`--still-fraction` must lie in [0, 1], got {args.still_fraction}")
    if not 0 <= args.still_noise < float("inf"):
        raise ValueError(f"`--still-noise` must be a finite number >= 0 (grey levels), got {args.still_noise}")
    mix = parse_mix(args.degradations)
    if args.quality_score is not None:
        load_callable(args.quality_score)
    if "model_guided" in mix and args.upstream is None:
        raise ValueError("`--degradations` includes model_guided, which needs `--upstream` (a T2V pipeline folder)")
    if args.upstream == SPACE_TO_DEPTH:
        if "model_guided" in mix or args.text_embeds:
            raise ValueError(
                "`--upstream space_to_depth` has no T2V model: it cannot make model_guided pairs or text embeddings"
            )
    elif args.upstream is not None and not (Path(args.upstream) / "model_index.json").is_file():
        raise ValueError(
            f"`--upstream` {str(args.upstream)!r} is not a diffusers pipeline folder (no model_index.json) "
            f"nor {SPACE_TO_DEPTH!r}"
        )
    return PairSettings(
        num_frames=args.num_frames,
        stride=args.stride,
        clip_step=args.clip_step,
        max_clips_per_video=args.max_clips_per_video,
        frame_range=tuple(args.frame_range) if args.frame_range else None,
        hr_size=hr_size,
        lr_size=(round16(hr_size[0] * args.lr_scale), round16(hr_size[1] * args.lr_scale)),
        degradations=mix,
        classic_options=args.classic_options,
        still_fraction=args.still_fraction,
        still_noise=args.still_noise,
        dis_preset=args.dis_preset,
        alpha=tuple(args.alpha),
        sdedit_steps=args.sdedit_steps,
        upstream=(args.upstream if args.upstream in (None, SPACE_TO_DEPTH) else str(Path(args.upstream).resolve())),
        prompt=args.prompt,
        text_embeds=bool(args.text_embeds),
        frames_format=args.frames_format,
        crf=args.crf,
        quality_filter=not args.no_quality_filter,
        quality_score=args.quality_score,
        min_quality_score=args.min_quality_score,
        seed=args.seed,
    )


# ---------------------------------------------------------------------------------------------------- inputs


def find_videos(inputs: list[str]) -> list[Path]:
    """Files, folders (recursive, by video suffix) and glob patterns -> sorted unique video paths."""
    found: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.update(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
        elif path.is_file():
            found.add(path)
        else:
            matches = [Path(p) for p in glob.glob(str(item), recursive=True) if Path(p).is_file()]
            if not matches:
                raise ValueError(f"`inputs`: {item!r} is not a file, a folder or a glob that matches files")
            found.update(matches)
    if not found:
        raise ValueError(f"`inputs` {inputs!r} contain no video files")
    return sorted(p.resolve() for p in found)


def clip_id(path: Path, start: int) -> str:
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in path.stem)[:40]
    return f"{stem}-{digest}-{start:07d}"


def clip_seed(seed: int, cid: str) -> int:
    return int(hashlib.sha256(f"{seed}:{cid}".encode()).hexdigest()[:8], 16)


def plan_clips(videos: list[Path], settings: PairSettings) -> list[dict]:
    """Every clip of every video: {"id", "source", "start"}; ValueError naming an unreadable or short video."""
    from cascade_vsr.core.video import video_info

    span = (settings.num_frames - 1) * settings.stride + 1
    step = settings.clip_step or settings.num_frames * settings.stride
    clips = []
    for video in videos:
        info = video_info(video)  # ValueError naming the path when unreadable
        if info["num_frames"] < span:
            raise ValueError(
                f"`inputs`: video {str(video)!r} has {info['num_frames']} frames, fewer than one clip "
                f"({settings.num_frames} frames at stride {settings.stride} = {span})"
            )
        first, end = settings.frame_range or (0, info["num_frames"])
        end = min(end, info["num_frames"])
        if end - first < span:
            raise ValueError(
                f"`--frame-range` {settings.frame_range} of {str(video)!r} ({info['num_frames']} frames) holds "
                f"fewer frames than one clip ({span})"
            )
        starts = list(range(first, end - span + 1, step))[: settings.max_clips_per_video]
        clips.extend({"id": clip_id(video, s), "source": str(video), "start": s} for s in starts)
    return clips


# ---------------------------------------------------------------------------------------------------- dataset folder


def read_manifest(root: Path, name: str = "manifest.jsonl") -> dict[str, dict]:
    """id -> record of the completed clips (a torn last line from a killed run is ignored)."""
    records = {}
    path = root / name
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[record["id"]] = record
    return records


def append_manifest(root: Path, record: dict, name: str = "manifest.jsonl") -> None:
    """Append one line under an exclusive lock; a torn tail left by a killed writer is cut first."""
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(root / name, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            if size:
                handle.seek(size - 1)
                if handle.read(1) != b"\n":
                    handle.seek(0)
                    data = handle.read()
                    handle.truncate(data.rfind(b"\n") + 1)
            handle.seek(0, os.SEEK_END)
            handle.write(line.encode())
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare_output(root: Path, settings: PairSettings) -> None:
    """Create ROOT with dataset.json, or check that it holds this same dataset."""
    config = settings.dataset_config()
    meta = root / "dataset.json"
    if meta.is_file():
        stored = json.loads(meta.read_text())
        if stored.get("format") != FORMAT or stored.get("config") != config:
            differing = sorted(
                k
                for k in set(config) | set(stored.get("config", {}))
                if stored.get("config", {}).get(k) != config.get(k)
            )
            raise ValueError(
                f"`--output-dir` {str(root)!r} holds a different dataset (dataset.json differs in {differing}); "
                "use a new folder or the same settings"
            )
        return
    if root.exists() and any(p.name not in ("clips",) for p in root.iterdir()):
        raise ValueError(f"`--output-dir` {str(root)!r} is not empty and holds no cascade-vsr pair dataset")
    (root / "clips").mkdir(parents=True, exist_ok=True)
    atomic_write_text(meta, json.dumps({"format": FORMAT, "version": VERSION, "config": config}, indent=2))


def clean_leftovers(root: Path, ids: set[str], done: set[str]) -> None:
    """Remove temporary folders of `ids` and clip folders of `ids` that never got a manifest line."""
    clips = root / "clips"
    for path in clips.glob(".tmp-*"):
        if path.name[5:].rsplit("-", 1)[0] in ids:
            shutil.rmtree(path, ignore_errors=True)
    for cid in ids - done:
        if (clips / cid).exists():
            shutil.rmtree(clips / cid, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- one clip

_STATE: dict = {}


def _worker_state(settings: PairSettings) -> dict:
    """Degradations, quality filter and the upstream pipeline, built once per process."""
    key = json.dumps(settings.dataset_config(), sort_keys=True)
    if _STATE.get("key") != key:
        from cascade_vsr.degradations.classic import ClassicDegradation
        from cascade_vsr.degradations.flow_based import FlowBasedDegradation, FlowDegradationConfig
        from cascade_vsr.degradations.quality import QualityFilter, QualityFilterConfig

        state = {
            "key": key,
            "flow": FlowBasedDegradation(FlowDegradationConfig(dis_preset=settings.dis_preset)),
            "classic1": ClassicDegradation(classic_config(settings.classic_options, order=1)),
            "classic2": ClassicDegradation(classic_config(settings.classic_options, order=2)),
            "quality": QualityFilter(
                QualityFilterConfig(min_learned_score=settings.min_quality_score),
                learned_score=load_callable(settings.quality_score) if settings.quality_score else None,
            ),
        }
        if settings.upstream:
            from cascade_vsr.pipelines.adapters import get_adapter

            upstream = load_upstream(settings.upstream)
            state["adapter"] = get_adapter(upstream)
            state["vae"] = getattr(upstream, "vae", upstream)  # a pipeline's VAE, or the VAE itself
            if settings.upstream != SPACE_TO_DEPTH:
                from cascade_vsr.degradations.model_guided import ModelGuidedDegradation, ModelGuidedDegradationConfig

                state["model_guided"] = ModelGuidedDegradation(
                    upstream,
                    ModelGuidedDegradationConfig(
                        alpha=settings.alpha, num_inference_steps=settings.sdedit_steps, prompt=settings.prompt
                    ),
                )
        _STATE.clear()
        _STATE.update(state)
    return _STATE


def classic_config(options: dict | None, order: int):
    """ClassicDegradationConfig with `--classic-options` overrides; ValueError naming the option otherwise."""
    from cascade_vsr.degradations.classic import ClassicDegradationConfig

    options = dict(options or {})
    unknown = set(options) - set(ClassicDegradationConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"`--classic-options`: unknown ClassicDegradationConfig fields {sorted(unknown)}")
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    return ClassicDegradationConfig(**{**options, "order": order})


def load_callable(spec: str):
    """'package.module:function' -> the callable; ValueError naming `--quality-score` otherwise."""
    import importlib

    module_name, _, attribute = str(spec).partition(":")
    try:
        value = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(
            f"`--quality-score` must be MODULE:CALLABLE of an installed module, got {spec!r}: {error}"
        ) from None
    if not callable(value):
        raise ValueError(f"`--quality-score` {spec!r} is not callable")
    return value


def load_upstream(path: str):
    """A diffusers pipeline saved with save_pretrained, loaded offline (nothing is downloaded), or the
    space-to-depth autoencoder for `space_to_depth`."""
    if path == SPACE_TO_DEPTH:
        from cascade_vsr.models.space_to_depth import SpaceToDepthAutoencoder

        return SpaceToDepthAutoencoder()
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(path, local_files_only=True)


def write_frames(folder: Path, name: str, frames, settings: PairSettings) -> str:
    import cv2

    from cascade_vsr.core.video import write_video

    if settings.frames_format == "mp4":
        write_video(folder / f"{name}.mp4", frames, fps=24.0, codec="libx264", crf=settings.crf)
        return f"{name}.mp4"
    (folder / name).mkdir()
    for index, frame in enumerate(frames):
        cv2.imwrite(str(folder / name / f"{index:05d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    return name


def process_clip(task: tuple[dict, PairSettings, str]) -> dict:
    """Make one clip's files in a temporary folder and move it into place; returns its manifest record, or
    {"id", "rejected": reasons} when the quality filter drops it."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from cascade_vsr.core.video import frames_to_tensor, read_video, resize_frames

    clip, settings, root = task
    root = Path(root)
    state = _worker_state(settings)
    cid, seed = clip["id"], clip_seed(settings.seed, clip["id"])
    span = (settings.num_frames - 1) * settings.stride + 1
    source = read_video(clip["source"], clip["start"], span)[:: settings.stride]
    if len(source) < settings.num_frames:
        raise ValueError(f"`inputs`: {clip['source']!r} ended before frame {clip['start'] + span}")
    if settings.quality_filter:
        report = state["quality"](source)
        if not report.passed:
            return {"id": cid, "rejected": report.reasons}

    rng = np.random.default_rng(seed)
    names = sorted(settings.degradations)
    kind = names[rng.choice(len(names), p=[settings.degradations[n] for n in names])]
    hr = resize_frames(source, settings.hr_size, crop_to_aspect=True)
    still = None
    still_rng = np.random.default_rng([seed, 1])  # its own stream: the other clips stay as without stills
    if still_rng.random() < settings.still_fraction:
        from cascade_vsr.degradations.still import still_clip

        middle = settings.num_frames // 2
        hr = still_clip(hr[middle], settings.num_frames, settings.still_noise, still_rng)
        still = {"frame": middle, "noise_std": settings.still_noise}
    lr_clean = resize_frames(hr, settings.lr_size)
    lr_latents = None
    if kind == "model_guided":
        degradation = state["model_guided"]
        lr_latents, params = degradation.apply(lr_clean, seed)
        lr = degradation.decode(lr_latents)[: settings.num_frames]
        lr = (
            resize_frames(lr, settings.lr_size, crop_to_aspect=True)
            if lr.shape[1:3] != tuple(settings.lr_size)
            else lr
        )
        degradation_record = {"kind": "model_guided", "params": params}
    elif kind == "none":  # a clean share keeps the stage faithful on inputs that are already sharp
        lr = lr_clean
        degradation_record = {"kind": "none", "params": {}}
    else:
        lr, params = state[kind].apply(lr_clean, seed)
        degradation_record = {"kind": "flow" if kind == "flow" else "classic", "params": {"name": kind, **params}}

    tmp = root / "clips" / f".tmp-{cid}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hr_name = write_frames(tmp, "hr", hr, settings)
    lr_name = write_frames(tmp, "lr", lr, settings)
    latents_name = None
    if settings.upstream:
        adapter, vae = state["adapter"], state["vae"]
        with torch.no_grad():
            tensors = {"hr_latents": adapter.encode(vae, frames_to_tensor(hr).to(vae.dtype))[0]}
            if lr_latents is None:
                lr_latents = adapter.encode(vae, frames_to_tensor(lr).to(vae.dtype))
        tensors["lr_latents"] = lr_latents[0]
        if settings.text_embeds:
            embeds, mask = state["model_guided"].encode_prompt(settings.prompt)
            tensors["prompt_embeds"], tensors["prompt_attention_mask"] = embeds[0], mask[0]
        tensors = {
            k: v.detach().cpu().contiguous().to(torch.int64 if "mask" in k else torch.float32)
            for k, v in tensors.items()
        }
        save_file(tensors, str(tmp / "latents.safetensors"), metadata={"latent_space": adapter.name})
        latents_name = "latents.safetensors"
    final = root / "clips" / cid
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return {
        "id": cid,
        "source": clip["source"],
        "start": clip["start"],
        "num_frames": settings.num_frames,
        "stride": settings.stride,
        "hr_size": list(settings.hr_size),
        "lr_size": list(settings.lr_size),
        "degradation": json.loads(json.dumps(degradation_record, default=float)),
        "still": still,
        "seed": seed,
        "hr": f"clips/{cid}/{hr_name}",
        "lr": f"clips/{cid}/{lr_name}",
        "latents": f"clips/{cid}/{latents_name}" if latents_name else None,
        "latent_space": settings.latent_space,
    }


# ---------------------------------------------------------------------------------------------------- run


def build_dataset(
    inputs: list[str], root: Path, settings: PairSettings, num_workers: int = 0, preview: int = 0
) -> dict:
    """Make every missing clip of `inputs` in `root`; this process's share when run under accelerate."""
    import torch
    from accelerate import PartialState
    from tqdm.auto import tqdm

    root = Path(root)
    videos = find_videos(inputs)
    if settings.upstream:
        from cascade_vsr.degradations.model_guided import ModelGuidedDegradation  # noqa: F401  (fails early when diffusers is broken)
        from cascade_vsr.pipelines.adapters import get_adapter

        adapter = get_adapter(load_upstream(settings.upstream))
        adapter.check_num_frames(settings.num_frames, "--num-frames")
        for name, size in (("--hr-size", settings.hr_size), ("--lr-scale", settings.lr_size)):
            if any(s % adapter.spatial_compression for s in size):
                raise ValueError(f"`{name}`: size {size} must be a multiple of {adapter.spatial_compression}")
        settings.latent_space = adapter.name
    clips = plan_clips(videos, settings)
    # without an accelerator, processes started by `accelerate launch` / torchrun split the work over gloo
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.is_main_process:
        prepare_output(root, settings)
    state.wait_for_everyone()
    prepare_output(root, settings)  # every process checks the folder
    with state.split_between_processes(clips) as mine:
        mine = list(mine)
    done = set(read_manifest(root))
    rejected = set(read_manifest(root, "rejected.jsonl"))
    clean_leftovers(root, {c["id"] for c in mine}, done)
    todo = [c for c in mine if c["id"] not in done and c["id"] not in rejected]
    counts = {"planned": len(mine), "skipped": len(mine) - len(todo), "written": 0, "rejected": 0}
    tasks = [(clip, settings, str(root)) for clip in todo]
    bar = tqdm(total=len(tasks), desc=f"make-pairs [{state.process_index}]", disable=not tasks)
    pool = None
    if num_workers > 0 and tasks:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(num_workers)
        results = pool.imap_unordered(process_clip, tasks)
    else:
        results = map(process_clip, tasks)
    try:
        for record in results:
            if "rejected" in record:
                append_manifest(root, record, "rejected.jsonl")
                counts["rejected"] += 1
            else:
                append_manifest(root, record)
                counts["written"] += 1
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    state.wait_for_everyone()
    if preview and state.is_main_process:
        write_preview(root, preview, settings)
    return counts


def write_preview(root: Path, count: int, settings: PairSettings) -> Path:
    """preview.png: one row per clip, middle frame: HR | LR (enlarged) | LR flow magnitude."""
    import cv2
    import numpy as np

    from cascade_vsr.core.optical_flow import compute_flow

    records = sorted(read_manifest(root).values(), key=lambda r: r["id"])[:count]
    rows = []
    for record in records:
        hr, lr = (load_frames(root / record[key]) for key in ("hr", "lr"))
        mid = len(hr) // 2
        height, width = hr.shape[1:3]
        flow = compute_flow(lr[mid - 1 : mid + 1], settings.dis_preset)[0]
        magnitude = np.linalg.norm(flow, axis=-1)
        magnitude = (255 * magnitude / max(magnitude.max(), 1e-6)).astype(np.uint8)
        colour = cv2.cvtColor(cv2.applyColorMap(magnitude, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)
        lr_large, colour_large = (
            cv2.resize(x, (width, height), interpolation=cv2.INTER_NEAREST) for x in (lr[mid], colour)
        )
        rows.append(np.concatenate([hr[mid], lr_large, colour_large], axis=1))
    path = root / "preview.png"
    if rows:
        tmp = root / f".preview.tmp-{os.getpid()}.png"
        cv2.imwrite(str(tmp), cv2.cvtColor(np.concatenate(rows, axis=0), cv2.COLOR_RGB2BGR))
        os.replace(tmp, path)
    return path


def load_frames(path: Path):
    """uint8 (T, H, W, 3) from a clip's mp4 or PNG folder."""
    import cv2
    import numpy as np

    from cascade_vsr.core.video import read_video

    path = Path(path)
    if path.is_dir():
        return np.stack([cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted(path.glob("*.png"))])
    return read_video(path)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if args.num_workers < 0:
        raise ValueError(f"`--num-workers` must be >= 0, got {args.num_workers}")
    counts = build_dataset(args.inputs, args.output_dir, settings, args.num_workers, args.preview)
    # One write per line: under `accelerate launch` (unbuffered stdout) print's separate "\n" write let the
    # processes' lines interleave.
    sys.stdout.write(json.dumps(counts) + "\n")
    sys.stdout.flush()
    return 0
