"""`cascade-vsr demo` (`make demo`): the trained demo model against bicubic on held-out real video.

Loads the demo pipeline (pixel space through the lossless SpaceToDepthAutoencoder), takes clips the model
never saw (frames 100-131 of bigbuckbunny.mp4, whose frames 0-99 trained it, and carphone_pristine.mp4),
downsamples them 2x with the area filter, super-resolves them with the multi-step sampler and with bicubic,
and writes to --output-dir:

- `<clip>.mp4`: bicubic | cascade-vsr | ground truth, side by side;
- `crops.png`: the same detailed region of every clip from each method, enlarged;
- `metrics.json`: PSNR, SSIM and flow warping error (temporal consistency) per clip and method, the settings,
  the model size and the wall time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cascade_vsr import demo_model_path
from cascade_vsr.core.precision import DTYPE_NAMES, resolve_dtype

HELP = "Super-resolve held-out real clips with the demo model and bicubic; write videos, crops and metrics."

# clip name -> (sample video, first held-out frame)
CLIPS = {"bigbuckbunny": ("bigbuckbunny.mp4", 100), "carphone": ("carphone_pristine.mp4", 0)}
METHODS = ("bicubic", "cascade_vsr")
ONE_STEP = "cascade_vsr_one_step"
LABELS = {
    "bicubic": "bicubic",
    "cascade_vsr": "cascade-vsr",
    ONE_STEP: "cascade-vsr one-step",
    "ground_truth": "ground truth",
}
SCALE = 2  # LR = HR downsampled 2x
MULTIPLE = 8  # HR sizes: the LR must be a multiple of the space-to-depth factor 4
SELF_ENSEMBLE_SIZES = (1, 2, 4, 6, 8)  # the first N of the 8 flips / transposes (the pipeline's `self_ensemble`)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=Path,
        default=demo_model_path(),
        help="diffusers-format pipeline folder (default: the demo model)",
    )
    parser.add_argument(
        "--one-step-model",
        default=str(demo_model_path(one_step=True)),
        help="a one-step stage run side by side with --model, once, with its own settings (default: the one-step "
        "demo model; 'none' to leave it out)",
    )
    parser.add_argument(
        "--one-step-dtype",
        choices=DTYPE_NAMES,
        default="auto",
        help="dtype of the one-step stage (auto: as `upscale` runs it, bfloat16 on a CPU with AMX or a CUDA GPU)",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--clips", nargs="+", choices=sorted(CLIPS), default=list(CLIPS))
    parser.add_argument("--num-frames", type=int, default=32, help="frames per clip")
    parser.add_argument(
        "--hr-size",
        type=int,
        nargs=2,
        default=(192, 320),
        metavar=("H", "W"),
        help="ground-truth size for clips larger than it (centre crop to the aspect, area resize)",
    )
    parser.add_argument(
        "--num-inference-steps",
        type=int,
        default=None,
        help="Euler steps (default: the model's own, 2 for the demo model; with this small model more steps generate "
        "more detail of their own and score lower: demo/README.md has the sweep)",
    )
    parser.add_argument(
        "--noise-aug-strength",
        type=float,
        default=None,
        help="condition noise level (default: the model's own, 0 for the demo model, trained on 0-0.1: its inputs "
        "are clean)",
    )
    parser.add_argument(
        "--noise-frame-correlation",
        type=float,
        default=None,
        help="correlation of the initial noise between frames (default: the model's own, 1 for the demo model: one "
        "shared noise image, so sampled detail does not flicker)",
    )
    parser.add_argument(
        "--chunk-frames",
        type=int,
        default=None,
        help="split the clip into independent temporal chunks of this many frames, run as one batch "
        "(default: the whole clip at once)",
    )
    parser.add_argument(
        "--temporal-unit",
        type=int,
        default=0,
        help="full attention within blocks of this many frames, shifted by half a block in odd layers (SimpleGVR's "
        "interleaving temporal units): cost linear in the clip length with no chunk seams; 0 keeps the model's own "
        "setting",
    )
    parser.add_argument(
        "--temporal-window",
        type=int,
        default=0,
        help="latent frames per window of a window-attention model (0 keeps the model's own; the demo model's "
        "windows span the whole clip, as in training: shorter windows leave seams between frames that flicker)",
    )
    parser.add_argument(
        "--self-ensemble",
        type=int,
        default=None,
        choices=SELF_ENSEMBLE_SIZES,
        help="average this many runs of the stage on flips / transposes of the input, each with its own noise (EDSR's "
        "geometric self-ensemble): 2 adds the left-right flip, 4 the upside-down ones, 6 and 8 the transposes; N "
        "times the compute (default: the model's own, 8 for the demo model)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--crop-size", type=int, default=64, help="side of the zoomed crops in HR pixels")
    parser.add_argument("--zoom", type=int, default=4, help="nearest-neighbour enlargement of the crops")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The demo's settings from command-line words: its defaults for everything not given (benchmarks, tests)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Every argument, before the model loads or a frame is decoded."""
    from cascade_vsr.core.validation import check_device, check_writable_folder
    from cascade_vsr.core.video import sample_video_path, video_info

    positive = ("num_frames", "num_inference_steps", "chunk_frames", "crop_size", "zoom")
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be a positive int, got {getattr(args, name)}")
    if args.num_frames < 2:
        raise ValueError(
            f"`--num-frames` must be >= 2 (the warping error compares frame pairs), got {args.num_frames}"
        )
    if args.crop_size > min(args.hr_size):
        raise ValueError(
            f"`--crop-size` {args.crop_size} must fit the frames: at most min(--hr-size) = {min(args.hr_size)}"
        )
    if any(s < MULTIPLE or s % MULTIPLE for s in args.hr_size):
        raise ValueError(f"`--hr-size` must be multiples of {MULTIPLE} (H W), got {tuple(args.hr_size)}")
    for flag in ("temporal_unit", "temporal_window"):
        if getattr(args, flag) < 0:
            name = "--" + flag.replace("_", "-")
            raise ValueError(f"`{name}` must be >= 0 (0: the model's own setting), got {getattr(args, flag)}")
    if args.self_ensemble is not None and args.self_ensemble not in SELF_ENSEMBLE_SIZES:
        raise ValueError(f"`--self-ensemble` must be one of {SELF_ENSEMBLE_SIZES}, got {args.self_ensemble}")
    for flag in ("noise_aug_strength", "noise_frame_correlation"):
        value = getattr(args, flag)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"`--{flag.replace('_', '-')}` must lie in [0, 1], got {value}")
    for name in args.clips:
        file, start = CLIPS[name]
        available = video_info(sample_video_path(file))["num_frames"] - start
        if args.num_frames > available:
            raise ValueError(
                f"`--num-frames` {args.num_frames}: the {name} clip has {available} frames from frame {start}"
            )
    check_model_folder(args.model)
    if args.one_step_model not in (None, "none"):
        check_model_folder(Path(args.one_step_model))
    check_writable_folder(args.output_dir, "--output-dir")
    check_device(args.device)


# ---------------------------------------------------------------------------------------------------------------
# Data: ground truth, LR, bicubic
# ---------------------------------------------------------------------------------------------------------------


def load_ground_truth(name: str, num_frames: int, hr_size: tuple[int, int], clips: dict = CLIPS):
    """Held-out HR frames (T, H, W, 3) uint8 and the clip's frame rate. Clips larger than `hr_size` are centre
    cropped to its aspect and area-resized (as make-pairs makes HR clips); every clip is then centre cropped to
    multiples of 8."""
    from cascade_vsr.core.video import read_video, resize_frames, sample_video_path, video_info

    path = sample_video_path(clips[name][0])
    frames = read_video(path, start=clips[name][1], num_frames=num_frames)
    if frames.shape[1] > hr_size[0] or frames.shape[2] > hr_size[1]:
        frames = resize_frames(frames, hr_size, crop_to_aspect=True)
    height, width = (s // MULTIPLE * MULTIPLE for s in frames.shape[1:3])
    top, left = (frames.shape[1] - height) // 2, (frames.shape[2] - width) // 2
    return frames[:, top : top + height, left : left + width].copy(), video_info(path)["fps"]


def held_out_clip(name: str, num_frames: int, hr_size: tuple[int, int], clips: dict = CLIPS):
    """(ground truth, fps, LR, bicubic) of a held-out clip (or another of `clips`: name -> (file, first frame)):
    the LR is the ground truth area-downsampled `SCALE`x, bicubic its plain upsampling back, all uint8
    (T, H, W, 3)."""
    from cascade_vsr.core.video import resize_frames

    ground_truth, fps = load_ground_truth(name, num_frames, hr_size, clips)
    size = ground_truth.shape[1:3]
    lr = resize_frames(ground_truth, (size[0] // SCALE, size[1] // SCALE), mode="area")
    return ground_truth, fps, lr, resize_frames(lr, size, mode="bicubic")


def to_chunks(frames, chunk: int):
    """uint8 (T, H, W, 3) -> float (ceil(T / chunk), chunk, 3, H, W) in [0, 1]; the last chunk is padded by
    repeating the last frame (dropped again by the caller)."""
    import numpy as np
    import torch
    from einops import rearrange

    pad = -len(frames) % chunk
    frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)]) if pad else frames
    return rearrange(torch.from_numpy(frames).float() / 255, "(n t) h w c -> n t c h w", t=chunk)


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------


def check_model_folder(path: Path) -> None:
    """A stage folder with safetensors weights, or an error that says where the demo model comes from."""
    from cascade_vsr.core.validation import check_pretrained_source

    if not (path / "model_index.json").is_file():
        raise ValueError(
            f"`--model`: no demo model at {path} (model_index.json missing). The trained demo model ships with the "
            "package (demo/model/ of the repository); demo/README.md has the exact make-pairs and train commands "
            "that reproduce it. Pass another diffusers-format pipeline folder with --model PATH."
        )
    check_pretrained_source(path, "--model")


def load_pipeline(path: Path, device: str, temporal_unit: int = 0, temporal_window: int = 0, dtype: str = "float32"):
    """The demo pipeline (its folder holds the lossless pixel-space autoencoder and its sampling settings) with its
    own modules in `dtype`; a clear error when the folder is missing.

    `temporal_unit` > 0 overrides the transformer's attention scope and `temporal_window` > 0 the frames of its
    attention windows (attention modes own no parameters)."""
    import torch

    from cascade_vsr.models.transformer import CascadeVSRTransformer3DModel
    from cascade_vsr.pipelines.pipeline_cascade_vsr import CascadeVSRPipeline

    check_model_folder(path)
    overrides = {"temporal_unit": temporal_unit} if temporal_unit else {}
    if temporal_window:
        config = CascadeVSRTransformer3DModel.load_config(path, subfolder="transformer", local_files_only=True)
        if config.get("attention_mode") != "window" or config.get("window_size") is None:
            raise ValueError(
                "`--temporal-window` needs a model with window attention of a fixed window_size, got "
                f"attention_mode={config.get('attention_mode')!r}, window_size={config.get('window_size')!r}"
            )
        overrides["window_size"] = (temporal_window, *config["window_size"][1:])
    transformer = CascadeVSRTransformer3DModel.from_pretrained(
        path, subfolder="transformer", local_files_only=True, dtype=getattr(torch, dtype), **overrides
    )
    pipe = CascadeVSRPipeline.from_pretrained(
        path, transformer=transformer, local_files_only=True, dtype=getattr(torch, dtype)
    )
    return pipe.to(device)


def sampler_settings(args: argparse.Namespace) -> dict:
    """The keyword arguments of `super_resolve` that the command line sets (None: the model's own setting)."""
    names = ("num_inference_steps", "noise_aug_strength", "noise_frame_correlation", "self_ensemble", "chunk_frames")
    return {name: getattr(args, name) for name in names} | {"seed": args.seed}


def super_resolve(
    pipe,
    lr,
    size: tuple[int, int],
    *,
    num_inference_steps: int | None = None,
    noise_aug_strength: float | None = None,
    noise_frame_correlation: float | None = None,
    self_ensemble: int | None = None,
    chunk_frames: int | None = None,
    seed: int = 0,
    desc: str = "",
):
    """uint8 LR (T, h, w, 3) -> uint8 (T, *size, 3): the whole clip, or all its temporal chunks, in one batched
    pipeline call seeded `seed`. `self_ensemble` N > 1 averages N runs on flips / transposes of the input (the
    pipeline's option: run k is seeded seed + k). Settings left None are the model's own."""
    import numpy as np
    import torch

    pipe.set_progress_bar_config(desc=desc, leave=True)
    chunks = to_chunks(lr, min(chunk_frames or len(lr), len(lr)))
    frames = pipe(
        video=chunks.to(pipe.device),
        height=size[0],
        width=size[1],
        num_inference_steps=num_inference_steps,
        noise_aug_strength=noise_aug_strength,
        noise_frame_correlation=noise_frame_correlation,
        self_ensemble=self_ensemble,
        generator=torch.Generator(device=pipe.device).manual_seed(seed),
        output_type="np",
    ).frames  # (chunks, chunk, H, W, 3) in [0, 1]
    frames = frames.reshape(-1, *frames.shape[2:])[: len(lr)]
    return np.clip(np.rint(frames.astype(np.float64) * 255), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Pictures: side-by-side video, zoomed crops
# ---------------------------------------------------------------------------------------------------------------


def label_strip(labels: list[str], panel_width: int, height: int = 22):
    """A dark (height, len(labels) * panel_width, 3) strip with one label centred over each panel (drawn once,
    then stacked onto every frame)."""
    import cv2
    import numpy as np

    strip = np.full((height, panel_width * len(labels), 3), 32, dtype=np.uint8)
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.45
    for index, label in enumerate(labels):
        (text_w, text_h), _ = cv2.getTextSize(label, font, scale, 1)
        origin = (index * panel_width + max((panel_width - text_w) // 2, 2), (height + text_h) // 2)
        cv2.putText(strip, label, origin, font, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return strip


def side_by_side(panels: list, labels: list[str]):
    """(T, H, W, 3) panels -> (T, strip + H, n W, 3): the panels next to each other under their labels."""
    import numpy as np

    video = np.concatenate(panels, axis=2)
    strip = label_strip(labels, panels[0].shape[2])
    return np.concatenate([np.broadcast_to(strip, (len(video), *strip.shape)), video], axis=1)


def detailed_region(frame, size: int) -> tuple[int, int]:
    """Top-left corner of the `size` square with the most gradient energy in a uint8 (H, W, 3) frame (windows on a
    stride of size / 4, all scored by one pooling)."""
    import torch.nn.functional as F

    from cascade_vsr.core.metrics import rgb_to_luma

    luma = rgb_to_luma(frame[None])[0].float()
    energy = (luma[1:, :-1] - luma[:-1, :-1]).square() + (luma[:-1, 1:] - luma[:-1, :-1]).square()
    stride = max(size // 4, 1)
    scores = F.avg_pool2d(energy[None, None], kernel_size=size - 1, stride=stride)[0, 0]
    row, col = divmod(int(scores.argmax()), scores.shape[1])
    return row * stride, col * stride


def crop_sheet(pictures: dict, metrics: dict, size: int, zoom: int, methods: tuple[str, ...] = METHODS):
    """One row per clip: the same region of the middle frame from bicubic / cascade-vsr / ground truth, enlarged
    `zoom`x with nearest neighbour, each under a label with its clip PSNR. `pictures[clip][method]` are uint8
    (T, H, W, 3) videos, `metrics[clip][method]` their metrics."""
    import numpy as np

    rows = []
    for name, frames in pictures.items():  # a handful of clips: one row of pictures each
        middle = len(frames["ground_truth"]) // 2
        side = min(size, *frames["ground_truth"].shape[1:3])
        top, left = detailed_region(frames["ground_truth"][middle], side)
        panels, labels = [], []
        for method in (*methods, "ground_truth"):
            crop = frames[method][middle, top : top + side, left : left + side]
            panels.append(crop.repeat(zoom, axis=0).repeat(zoom, axis=1)[None])
            psnr = metrics[name][method].get("psnr")
            labels.append(f"{name}: {LABELS[method]}" + (f" {psnr:.2f} dB" if psnr is not None else ""))
        rows.append(side_by_side(panels, labels)[0])
    width = max(row.shape[1] for row in rows)
    rows = [np.pad(row, ((0, 4), (0, width - row.shape[1]), (0, 0))) for row in rows]
    return np.concatenate(rows)


# ---------------------------------------------------------------------------------------------------------------
# Main job
# ---------------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    import json
    import time

    import cv2
    import torch

    from cascade_vsr.core.metrics import clip_metrics, metrics_table
    from cascade_vsr.core.video import write_video

    check_args(args)
    start_time = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(args.model, device, args.temporal_unit, args.temporal_window)
    parameters = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("upsampler", "transformer")
    }
    print(f"demo model {args.model}: {sum(parameters.values()):,} parameters {parameters}, on {device}")
    one_step_dtype = resolve_dtype(args.one_step_dtype, device)
    one_step = None
    if args.one_step_model not in (None, "none"):
        one_step = load_pipeline(Path(args.one_step_model), device, dtype=one_step_dtype)
    methods = (*METHODS, ONE_STEP) if one_step is not None else METHODS
    args.output_dir.mkdir(parents=True, exist_ok=True)

    clips, pictures = {}, {}
    for name in args.clips:  # two held-out clips, each processed whole
        ground_truth, fps, lr, bicubic = held_out_clip(name, args.num_frames, tuple(args.hr_size))
        hr_size = ground_truth.shape[1:3]
        clip_start = time.perf_counter()
        frames = {
            "bicubic": bicubic,
            "cascade_vsr": super_resolve(
                pipe, lr, hr_size, **sampler_settings(args), desc=f"{name} {lr.shape[2]}x{lr.shape[1]} -> 2x"
            ),
        }
        sr_seconds = time.perf_counter() - clip_start
        if one_step is not None:  # with its own settings: one step, one run
            one_step_start = time.perf_counter()
            frames[ONE_STEP] = super_resolve(one_step, lr, hr_size, seed=args.seed, desc=f"{name} one-step")
            one_step_seconds = time.perf_counter() - one_step_start
        frames["ground_truth"] = ground_truth
        metrics = clip_metrics({method: frames[method] for method in methods}, ground_truth)
        order = (*methods, "ground_truth")
        partial = args.output_dir / f"{name}.partial.mp4"  # renamed into place once complete
        write_video(partial, side_by_side([frames[m] for m in order], [LABELS[m] for m in order]), fps=fps)
        partial.replace(args.output_dir / f"{name}.mp4")
        source, first = CLIPS[name]
        clips[name] = {
            "source": source,
            "frames": [first, first + len(ground_truth)],
            "hr_size": list(hr_size),
            "lr_size": list(lr.shape[1:3]),
            "cascade_vsr_seconds": round(sr_seconds, 2),
            "metrics": metrics,
        }
        if one_step is not None:
            clips[name]["cascade_vsr_one_step_seconds"] = round(one_step_seconds, 2)
        pictures[name] = frames

    explicit = {name: value for name, value in sampler_settings(args).items() if name not in ("chunk_frames", "seed")}
    sampling = pipe.sampling_settings(**explicit)
    sheet = crop_sheet(
        pictures, {name: clip["metrics"] for name, clip in clips.items()}, args.crop_size, args.zoom, methods
    )
    cv2.imwrite(str(args.output_dir / "crops.png"), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    summary = {
        "settings": {
            "model": str(args.model),
            "scale": SCALE,
            "lr_downsampling": "area",
            "num_frames": args.num_frames,
            "hr_size": list(args.hr_size),
            **sampling,
            "chunk_frames": args.chunk_frames,
            "temporal_unit": pipe.transformer.config.temporal_unit,
            "window_size": pipe.transformer.config.window_size,
            "attention_mode": pipe.transformer.config.attention_mode,
            "seed": args.seed,
            "device": device,
            "metrics": "PSNR on uint8 RGB and SSIM (Gaussian 11 / 1.5) on BT.601 luma, means over frames; warping "
            "error: mean |frame_t - frame_{t-1} warped by the ground truth's DIS flow| on [0, 255] over "
            "forward-backward consistent pixels (lower is better; blur lowers it); relative warping error: the same "
            "on the error video frames - ground truth (flicker that the ground truth does not have; 0 for it)",
        },
        "model": {
            "parameters": {**parameters, "total": sum(parameters.values())},
            "latent_space": pipe.transformer.config.latent_space,
        },
        "clips": clips,
        "one_step_model": None
        if one_step is None
        else {"path": str(args.one_step_model), "sampling": one_step.sampling_settings(), "dtype": one_step_dtype},
        "wall_time_seconds": round(time.perf_counter() - start_time, 2),
    }
    partial = args.output_dir / "metrics.partial.json"
    partial.write_text(json.dumps(summary, indent=2) + "\n")
    partial.replace(args.output_dir / "metrics.json")
    print(metrics_table({name: clip["metrics"] for name, clip in clips.items()}, labels=LABELS))
    print(
        f"wrote {args.output_dir}/ ({', '.join(f'{n}.mp4' for n in clips)}, crops.png, metrics.json) in "
        f"{summary['wall_time_seconds']:.1f} s"
    )
    return 0
