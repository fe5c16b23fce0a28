"""`cascade-vsr upscale INPUT [INPUT ...] --output OUT`: super-resolve the user's own video with a trained stage.

INPUT is a video file (anything PyAV reads), a folder of PNG / JPEG frames or a glob of them. OUT is a video file
(codec by extension; the input's frame rate kept and its audio copied) or a folder that receives lossless PNG frames;
several inputs go to a folder, one output per input. A block-causal stage (`causal_chunk_frames`) streams: LR frames
go in chunk by chunk and HR chunks come out, each attending to the previous chunks through a rolling KV cache
(`CascadeVSRPipeline.stream`), at constant memory; its VAE encodes and decodes chunk by chunk with the numbers of the
whole clip (`adapter.stream_encoder` / `stream_decoder`: space-to-depth, or Wan's causal VAE, whose stage folder then
holds it as vae/ and whose inputs must have 4k+1 frames). Other stages run in temporal windows that
overlap and cross-fade, so memory does not depend on the video's length either. The model folder's own sampling
settings are used unless an option overrides them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cascade_vsr.core.precision import DTYPE_NAMES, resolve_dtype

HELP = (
    "Super-resolve your own videos or frame folders with a trained stage (default: the streaming one-step demo model)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cascade_vsr import demo_model_path

    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="video files, folders of frames or globs of frames")
    parser.add_argument("--output", "-o", type=Path, required=True, help="video file or folder (a folder for several)")
    parser.add_argument(
        "--model",
        type=Path,
        default=demo_model_path(one_step=True),
        help="a stage folder (default: the one-step demo model, which streams; the multi-step one is "
        "`python -c 'import cascade_vsr; print(cascade_vsr.demo_model_path())'`)",
    )
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--scale", type=float, help="output size as a factor of the input (non-integer is fine)")
    size.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="output size in pixels")
    sampler = parser.add_argument_group("sampler (default: the model folder's settings)")
    sampler.add_argument("--num-inference-steps", type=int, default=None)
    sampler.add_argument("--noise-aug-strength", type=float, default=None)
    sampler.add_argument("--noise-frame-correlation", type=float, default=None)
    sampler.add_argument("--guidance-scale", type=float, default=None)
    sampler.add_argument("--self-ensemble", type=int, default=None, help="runs on flips / transposes, averaged (1-8)")
    sampler.add_argument("--seed", type=int, default=0)
    chunks = parser.add_argument_group("memory")
    chunks.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="stream a block-causal stage chunk by chunk (default: whenever the stage is block-causal); "
        "--no-stream runs overlapping windows",
    )
    chunks.add_argument(
        "--chunks-per-forward",
        type=chunks_per_forward_arg,
        default=None,
        help="the stage's chunks computed by one forward pass when streaming, or 'auto': the same frames, the fixed "
        "cost of a pass spread over more of them, activations that many times larger (default auto: as many as fit "
        "32k tokens, 8 at 320x192 with the demo model, 1 from about 960x540 up)",
    )
    chunks.add_argument(
        "--chunk-frames",
        type=int,
        default=None,
        help="frames super-resolved together by --no-stream (default 32; 33 for a VAE that encodes 4k+1 frames)",
    )
    chunks.add_argument("--chunk-overlap", type=int, default=4, help="frames shared (and cross-faded) by two chunks")
    chunks.add_argument("--tile", type=int, default=None, help="LR tile side in pixels for frames too large at once")
    chunks.add_argument("--tile-overlap", type=int, default=16, help="LR pixels shared by neighbouring tiles")
    parser.add_argument("--color-fix", choices=("wavelet", "adain"), default=None)
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default="auto",
        help="dtype of the stage's own modules (auto: bfloat16 where the device has bfloat16 matrix units, a CUDA "
        "GPU or a CPU with AMX; float32 elsewhere)",
    )
    video = parser.add_argument_group("video output")
    video.add_argument("--codec", default=None, help="video codec (default by extension, e.g. libx264 for .mp4)")
    video.add_argument("--crf", type=int, default=18, help="constant rate factor of x264 / x265 (0 = lossless)")
    video.add_argument("--bitrate", type=int, default=None, help="bits/s instead of --crf")
    video.add_argument("--pix-fmt", default=None, help="pixel format (default yuv420p)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--reference", default=None, help="ground truth of a single input: print the metrics table")


DEFAULT_WINDOW_FRAMES = 32


def chunks_per_forward_arg(text: str) -> int | str:
    """`--chunks-per-forward`: 'auto' or an int (its range is checked with the other options)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1 or 'auto', got {text!r}") from None


def window_frames(args: argparse.Namespace, temporal_compression: int) -> int:
    """The windowed path's window length: `--chunk-frames`, or 32 frames rounded up to the VAE's tc*k+1 (a Wan
    latent frame is 4 frames, plus the first). Every window, the last one padded, has this length, so a VAE with
    temporal compression needs a tc*k+1 length."""
    if args.chunk_frames is None:
        return -(-(DEFAULT_WINDOW_FRAMES - 1) // temporal_compression) * temporal_compression + 1
    if (args.chunk_frames - 1) % temporal_compression:
        tc = temporal_compression
        raise ValueError(
            f"`--chunk-frames` must be {tc}k+1 (1, {tc + 1}, {2 * tc + 1}, ...) for a VAE that compresses time "
            f"{tc}x, got {args.chunk_frames}"
        )
    return args.chunk_frames


def check_args(args: argparse.Namespace) -> None:
    """Every argument, before the model loads or a frame is read."""
    from cascade_vsr.core.validation import (
        check_device,
        check_pretrained_source,
        check_writable_file,
        check_writable_folder,
    )

    for name in ("noise_aug_strength", "noise_frame_correlation"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 1:  # NaN fails too
            raise ValueError(f"`--{name.replace('_', '-')}` must lie in [0, 1], got {value}")
    if args.guidance_scale is not None and not 1 <= args.guidance_scale < float("inf"):
        raise ValueError(
            f"`--guidance-scale` must be a finite number >= 1 (1: no guidance), got {args.guidance_scale}"
        )
    if not 0 <= args.crf <= 51:
        raise ValueError(f"`--crf` must lie in 0..51 (x264 / x265), got {args.crf}")
    if args.bitrate is not None and args.bitrate <= 0:
        raise ValueError(f"`--bitrate` must be positive bits/s, got {args.bitrate}")
    if args.scale is not None and not 1 <= args.scale < float("inf"):
        raise ValueError(f"`--scale` must be a finite number >= 1, got {args.scale}")
    if args.size is not None and min(args.size) < 1:
        raise ValueError(f"`--size` must be two positive ints (H W), got {tuple(args.size)}")
    for name in ("num_inference_steps", "chunk_frames", "tile"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be a positive int, got {value}")
    if not 0 <= args.chunk_overlap < (args.chunk_frames or DEFAULT_WINDOW_FRAMES):
        raise ValueError(
            f"`--chunk-overlap` must lie in [0, --chunk-frames={args.chunk_frames or DEFAULT_WINDOW_FRAMES}), got "
            f"{args.chunk_overlap}"
        )
    if args.tile is not None and not 0 <= args.tile_overlap < args.tile:
        raise ValueError(f"`--tile-overlap` must lie in [0, --tile={args.tile}), got {args.tile_overlap}")
    if args.self_ensemble is not None and not 1 <= args.self_ensemble <= 8:
        raise ValueError(f"`--self-ensemble` must be in 1..8, got {args.self_ensemble}")
    if args.seed < 0:
        raise ValueError(f"`--seed` must be >= 0, got {args.seed}")
    check_pretrained_source(args.model, "--model")
    if not (args.model / "model_index.json").is_file():
        raise ValueError(f"`--model` {str(args.model)!r} is not a stage folder (no model_index.json)")
    if len(args.inputs) > 1 and args.output.suffix:
        raise ValueError(f"several inputs go to a folder: `--output` {str(args.output)!r} has an extension")
    if args.reference is not None and len(args.inputs) > 1:
        raise ValueError("`--reference` compares one output with its ground truth: pass a single input")
    if args.reference is not None and not Path(args.reference).exists():
        raise FileNotFoundError(f"`--reference` {args.reference!r} does not exist")
    check_encoder(args.codec, args.pix_fmt)
    if args.output.suffix:
        check_writable_file(args.output, "--output")
    else:
        check_writable_folder(args.output, "--output")
    check_device(args.device)


def check_encoder(codec: str | None, pix_fmt: str | None) -> None:
    """`--codec` must name a video encoder of this FFmpeg build and `--pix-fmt` a pixel format it knows."""
    import av

    if codec is not None:
        try:
            encoder = av.codec.Codec(codec, "w")
        except (av.error.FFmpegError, ValueError, KeyError):  # PyAV's UnknownCodecError is a ValueError
            raise ValueError(f"`--codec` {codec!r} is not an encoder of this FFmpeg build") from None
        if encoder.type != "video":
            raise ValueError(f"`--codec` {codec!r} is a {encoder.type} encoder, not a video one")
    if pix_fmt is not None:
        try:
            av.VideoFormat(pix_fmt)
        except (ValueError, av.error.FFmpegError):
            raise ValueError(f"`--pix-fmt` {pix_fmt!r} is not a pixel format FFmpeg knows") from None


def output_paths(inputs: list[str], output: Path, overwrite: bool) -> list[tuple[str, Path]]:
    """(input, output path) per input; several inputs go into the folder `output`, one output per input."""
    from cascade_vsr.core.streams import VideoSource

    sources = [VideoSource(item) for item in inputs]  # ValueError naming an unreadable input
    if len(sources) == 1:
        pairs = [(inputs[0], output)]
    else:
        if output.exists() and not output.is_dir():
            raise ValueError(f"`--output` {str(output)!r} must be a folder for several inputs")
        # a video keeps its container (a.mp4 -> OUT/a.mp4), frames give a PNG folder (frames/ -> OUT/frames)
        pairs = [
            (item, output / (source.name + (source.source.suffix if not source.files else "")))
            for item, source in zip(inputs, sources)
        ]
        names = [path.name for _, path in pairs]
        if len(set(names)) != len(names):
            raise ValueError(
                f"inputs share names {sorted(n for n in names if names.count(n) > 1)}: outputs would collide"
            )
    for _, path in pairs:
        if path.exists() and not overwrite:
            raise ValueError(f"`--output` {str(path)!r} exists; pass --overwrite to replace it")
    return pairs


def overlapping_windows(chunks, window: int, overlap: int):
    """Regroup consecutive frame chunks into windows of `window` frames, each sharing its first `overlap` frames with
    the previous window's last ones; yields (frames, is_last). The last window is shorter but holds new frames."""
    import numpy as np

    buffer = None
    for chunk in chunks:
        buffer = chunk if buffer is None else np.concatenate([buffer, chunk])
        while len(buffer) > window:  # a further frame exists: this window is not the last
            yield buffer[:window], False
            buffer = buffer[window - overlap :]
    if buffer is not None:
        yield buffer, True


def cross_fade(previous, current):
    """Blend the overlap: `previous` (k, ...) fades out while the first k frames of `current` fade in."""
    import numpy as np

    count = len(previous)
    weight = ((np.arange(count) + 1) / (count + 1)).reshape(-1, *([1] * (previous.ndim - 1)))
    blended = current.copy()
    blended[:count] = previous * (1 - weight) + current[:count] * weight
    return blended


def load_stage(model: Path, device: str, dtype: str):
    """The stage pipeline of a model folder on `device`, its own modules in `dtype`."""
    import torch

    from cascade_vsr import CascadeVSRPipeline

    pipe = CascadeVSRPipeline.from_pretrained(model, dtype=getattr(torch, dtype), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def super_resolve_window(pipe, frames, out_size: tuple[int, int], args: argparse.Namespace, length: int):
    """uint8 (n, h, w, 3) -> float64 (n, *out_size, 3) in [0, 1]. The window is padded to `length` frames by
    repeating its last frame, so every window has the same shape and draws the same noise (`--seed` each time)."""
    import numpy as np
    import torch
    from einops import rearrange

    from cascade_vsr.pipelines.tiling import tiled_super_resolve

    count = len(frames)
    if count < length:
        frames = np.concatenate([frames, np.repeat(frames[-1:], length - count, axis=0)])
    video = rearrange(torch.from_numpy(frames), "t h w c -> 1 t c h w").float() / 255
    options = {
        "num_inference_steps": args.num_inference_steps,
        "noise_aug_strength": args.noise_aug_strength,
        "noise_frame_correlation": args.noise_frame_correlation,
        "guidance_scale": args.guidance_scale,
        "self_ensemble": args.self_ensemble,
        "color_fix": args.color_fix,
    }
    options = {name: value for name, value in options.items() if value is not None}

    def run(lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        generator = torch.Generator(device=pipe.device).manual_seed(args.seed)
        return (
            pipe(
                video=lr.to(pipe.device),
                height=size[0],
                width=size[1],
                generator=generator,
                output_type="pt",
                **options,
            )
            .frames.double()
            .cpu()
        )

    if args.tile is None:
        hr = run(video, out_size)
    else:
        hr = tiled_super_resolve(run, video, out_size, args.tile, args.tile_overlap, pipe.adapter.spatial_compression)
    return rearrange(hr[0, :count], "t c h w -> t h w c").numpy()


def streams(pipe, args: argparse.Namespace) -> bool:
    """Whether this stage and these options stream (`--stream`; by default a block-causal stage does)."""
    causal = pipe.transformer.config.causal_chunk_frames is not None
    if args.stream is None:
        args.stream = causal
    if args.chunks_per_forward not in (None, "auto") and args.chunks_per_forward < 1:
        raise ValueError(f"`--chunks-per-forward` must be >= 1, got {args.chunks_per_forward}")
    if not args.stream:
        if args.chunks_per_forward is not None:
            raise ValueError("`--chunks-per-forward` applies to streaming: leave it out with --no-stream")
        return False
    if not causal:
        raise ValueError(f"`--stream` needs a block-causal stage (causal_chunk_frames); {args.model} is not one")
    if pipe.vae is None:
        raise ValueError(
            f"`--stream` encodes and decodes with the stage's VAE, but {args.model} has none (no vae/ folder); "
            "save the stage with its upstream's VAE"
        )
    try:  # both refuse a VAE whose chunks do not encode / decode apart exactly
        pipe.adapter.stream_encoder(pipe.vae)
        pipe.adapter.stream_decoder(pipe.vae)
    except ValueError:
        raise ValueError(
            f"`--stream` encodes and decodes chunk by chunk: the {pipe.adapter.name} VAE is not streamed (only "
            "space-to-depth and Wan are); pass --no-stream"
        ) from None
    refused = [name for name in ("tile", "color_fix") if getattr(args, name) is not None]
    if args.self_ensemble not in (None, 1):
        refused.append("self_ensemble")
    if refused:
        options = ", ".join("--" + name.replace("_", "-") for name in refused)
        raise ValueError(f"{options} do not stream: pass --no-stream to run overlapping windows")
    return True


def stream_super_resolve(pipe, source, out_size: tuple[int, int], args: argparse.Namespace):
    """uint8 HR frame chunks of a `VideoSource`, streamed (`CascadeVSRPipeline.stream`)."""
    import numpy as np
    import torch
    from einops import rearrange

    adapter, device = pipe.adapter, pipe.device  # `pipe.device` walks every module: once, not per chunk
    # One stream encoder per input (fresh state): pieces of frames in, the whole clip's latents out, in order.
    encoder = adapter.stream_encoder(pipe.vae)

    def lr_chunks():
        # about one chunk of latent frames per piece (a Wan latent is 4 frames, a space-to-depth one 1)
        size = pipe.transformer.config.causal_chunk_frames * adapter.temporal_compression
        for frames in source.chunks(size):
            video = rearrange(torch.from_numpy(frames), "t h w c -> 1 t c h w").float() / 255
            latents = encoder.encode(pipe.preprocess_video(adapter, video, whole_clip=False).to(device))
            if latents.shape[2]:  # Wan holds back the frames of an incomplete group of 4
                yield latents
        tail = encoder.finish()  # refuses a stream that ended inside a group (not 4k+1 frames)
        if tail.shape[2]:
            yield tail

    options = {
        "num_inference_steps": args.num_inference_steps,
        "noise_aug_strength": args.noise_aug_strength,
        "noise_frame_correlation": args.noise_frame_correlation,
        "guidance_scale": args.guidance_scale,
    }
    generator = torch.Generator(device=device).manual_seed(args.seed)
    hr_chunks = pipe.stream(
        lr_chunks(),
        height=out_size[0],
        width=out_size[1],
        generator=generator,
        output_type="np",
        chunks_per_forward=args.chunks_per_forward or "auto",
        **options,
    )
    for hr in hr_chunks:
        yield np.clip(np.rint(hr[0] * 255), 0, 255).astype(np.uint8)


def upscale_one(pipe, item: str, output: Path, args: argparse.Namespace) -> dict:
    """Super-resolve one input into `output`, streamed or window by window; returns the summary figures."""
    import numpy as np
    from tqdm.auto import tqdm

    from cascade_vsr.core.streams import VideoSink, VideoSource

    source = VideoSource(item)
    if args.size is not None:
        out_size = tuple(args.size)
    else:
        out_size = (round(source.height * args.scale), round(source.width * args.scale))
    if out_size[0] < source.height or out_size[1] < source.width:
        raise ValueError(f"`--size` {out_size} must not be smaller than the input {(source.height, source.width)}")
    streaming = streams(pipe, args)
    if streaming and (source.num_frames - 1) % pipe.adapter.temporal_compression:
        # as the windowed path's `preprocess_video`, but before a frame is read or an output is opened
        tc = pipe.adapter.temporal_compression
        raise ValueError(
            f"`input` {item!r} has {source.num_frames} frames: the {pipe.adapter.name} VAE encodes {tc}k+1 frames "
            f"(1, {tc + 1}, {2 * tc + 1}, ...); trim it to {source.num_frames - (source.num_frames - 1) % tc} frames"
        )
    if not streaming:  # windows of a long video share one shape (the last one padded); a short one runs as is
        window = window_frames(args, pipe.adapter.temporal_compression)
        step, length = window - args.chunk_overlap, min(window, source.num_frames)
    start = time.perf_counter()
    pending = None
    sink = VideoSink(
        output,
        fps=source.fps,
        codec=args.codec,
        crf=args.crf,
        bitrate=args.bitrate,
        pix_fmt=args.pix_fmt,
        audio_from=source.source if source.has_audio and output.suffix else None,
        overwrite=args.overwrite,
    )
    with sink, tqdm(total=source.num_frames, unit="frame", desc=source.name) as progress:
        if streaming:
            for hr in stream_super_resolve(pipe, source, out_size, args):
                sink.write(hr)
                progress.update(len(hr))
        else:
            for frames, last in overlapping_windows(source.chunks(step), window, args.chunk_overlap):
                hr = super_resolve_window(pipe, frames, out_size, args, length)
                if pending is not None and len(pending):
                    hr = cross_fade(pending, hr)
                keep = len(hr) if last else len(hr) - args.chunk_overlap
                sink.write(np.clip(np.rint(hr[:keep] * 255), 0, 255).astype(np.uint8))
                progress.update(keep)
                pending = None if last else hr[keep:]
    seconds = time.perf_counter() - start
    return {
        "input": item,
        "output": str(output),
        "frames": sink.frames_written,
        "seconds": seconds,
        "lr_size": (source.height, source.width),
        "hr_size": out_size,
    }


def _exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that an output being written is removed instead of left half-written."""
    import signal

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def run(args: argparse.Namespace) -> int:
    import torch

    check_args(args)
    _exit_on_sigterm()
    pairs = output_paths(args.inputs, args.output, args.overwrite)
    if len(pairs) > 1:
        args.output.mkdir(parents=True, exist_ok=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_stage(args.model, device, resolve_dtype(args.dtype, device))
    for item, output in pairs:
        summary = upscale_one(pipe, item, output, args)
        (h, w), (hh, ww) = summary["lr_size"], summary["hr_size"]
        print(
            f"{item} -> {output}: {summary['frames']} frames {w}x{h} -> {ww}x{hh} in {summary['seconds']:.1f} s "
            f"({summary['frames'] / summary['seconds']:.2f} frames/s)"
        )
    if args.reference is not None:
        from cascade_vsr.commands.evaluate import evaluate
        from cascade_vsr.core.metrics import metrics_table

        item, output = pairs[0]
        figures = evaluate({Path(item).stem: (output, Path(args.reference))}, baseline="bicubic", lr=item)
        print(metrics_table(figures["clips"], labels={"sr": "cascade-vsr", "ground_truth": "ground truth"}))
    return 0
