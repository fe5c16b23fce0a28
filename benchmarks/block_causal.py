"""Block-causal window attention: per-chunk SDPA calls against one masked call, streamed forwards of several chunks
against one, and the KV cache's tile layout against gathering -> benchmarks/results/block_causal.json.

Three measurements on the one-step demo model (`demo_model_path(one_step=True)`), each alternating its variants in
one process (this machine's speed drifts by 10-20% over minutes, so the ratios of back-to-back runs are what carry
over: each ratio is the median over rounds of the two variants' ratio in that round):

- `offline`: a training step (forward + backward, float32) of the offline block-causal form on a clip of
  `--frames` latent frames at 160x96 -> 320x192 (48x80 tokens). `per-chunk` attends each chunk to exactly its
  visible key frames (`visible_runs`, chunks of one shape per SDPA call); `masked` forces the former single call per window region, masked by the
  frames' visibility (it also computes the scores of the frames a chunk may not see).
- `streaming`: `CascadeVSRPipeline.stream` of bigbuckbunny at 160x96 -> 320x192 in upscale's dtype, with
  `chunks_per_forward` 1, 2, 4 and 8: seconds per frame, and whether the frames equal those of 1.
- `kv_layout`: the same stream with the window layers' KV cache in tile layout (cached keys are views) against the
  cache as it was before (tokens, every visible frame gathered into windows at every chunk).

    .venv/bin/python benchmarks/block_causal.py [--frames 9] [--rounds 6] [--dtype auto]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "block_causal.json"


def paired_ratio(new: list[float], old: list[float]) -> float:
    """The median over rounds of new / old: the two ran back to back in each round, so a round's ratio is immune to
    the machine's slower drift, and the median to a round disturbed by a burst."""
    return float(np.median(np.array(new) / np.array(old)))


def offline_step(rounds: int, frames: int) -> dict:
    """Median seconds of a forward + backward through the offline form, per-chunk calls against the masked call."""
    import torch

    import cascade_vsr.models.causal_attention as causal_attention
    from cascade_vsr import CascadeVSRTransformer3DModel
    from cascade_vsr.commands.demo import demo_model_path

    model = CascadeVSRTransformer3DModel.from_pretrained(demo_model_path(one_step=True), subfolder="transformer")
    generator = torch.Generator().manual_seed(0)
    latents, condition = (torch.randn(1, 48, frames, 48, 80, generator=generator) for _ in range(2))
    timestep, level = torch.tensor([1000.0]), torch.tensor([0.0])
    per_chunk = causal_attention.visible_runs
    variants = {"per-chunk": per_chunk, "masked": lambda visibility: None}
    seconds, outputs = {name: [] for name in variants}, {}
    try:
        for round_index in range(rounds + 1):  # the first round warms up
            for name in variants if round_index % 2 else reversed(variants):
                causal_attention.visible_runs = variants[name]
                model.zero_grad()
                start = time.perf_counter()
                output = model(latents, condition, timestep, level).sample
                output.square().mean().backward()
                if round_index:
                    seconds[name].append(time.perf_counter() - start)
                outputs[name] = output.detach()
    finally:
        causal_attention.visible_runs = per_chunk
    return {
        "frames": frames,
        "chunk_frames": model.config.causal_chunk_frames,
        "cache_chunks": model.config.causal_cache_chunks,
        "seconds": {name: float(np.median(times)) for name, times in seconds.items()},
        "seconds_per_round": seconds,
        "ratio_per_chunk_vs_masked": paired_ratio(seconds["per-chunk"], seconds["masked"]),
        "max_abs_difference": float((outputs["per-chunk"] - outputs["masked"]).abs().max()),
    }


def _streaming_input(rounds: int, dtype: str):
    """The demo's one-step stage in upscale's `dtype` and bigbuckbunny at 160x96 (played back and forth to the
    length that `rounds` + 1 rounds of 16 frames need), as model-space LR latent chunks of one frame."""
    import torch
    from einops import rearrange

    from cascade_vsr.commands.demo import demo_model_path
    from cascade_vsr.commands.upscale import load_stage
    from cascade_vsr.core.precision import resolve_dtype
    from cascade_vsr.core.video import read_video, resize_frames, sample_video_path

    pipe = load_stage(demo_model_path(one_step=True), "cpu", resolve_dtype(dtype, "cpu"))
    clip = resize_frames(
        read_video(sample_video_path("bigbuckbunny.mp4")), (96, 160), mode="area", crop_to_aspect=True
    )
    frames_needed = 16 * (rounds + 1) + 8
    clip = np.concatenate([clip, clip[::-1]] * (frames_needed // (2 * len(clip)) + 1))[:frames_needed]
    video = rearrange(torch.from_numpy(clip), "t h w c -> 1 t c h w").float() / 255
    lr = pipe.adapter.encode(pipe.vae, pipe.preprocess_video(pipe.adapter, video))
    return pipe, list(lr.split(1, dim=2))


def streaming(rounds: int, dtype: str, per_forward: tuple[int, ...] = (1, 2, 4, 8)) -> dict:
    """Median seconds per streamed frame for each `chunks_per_forward`, 16 frames per variant and round."""
    import torch

    pipe, chunks = _streaming_input(rounds, dtype)
    streams = {
        k: pipe.stream(
            chunks, scale=2, output_type="np", chunks_per_forward=k, generator=torch.Generator().manual_seed(0)
        )
        for k in per_forward
    }
    frames = {k: [] for k in per_forward}
    seconds = {k: [] for k in per_forward}
    for round_index in range(rounds + 1):  # the first round warms up
        for k in per_forward if round_index % 2 else reversed(per_forward):
            start = time.perf_counter()
            for _ in range(16 // k):
                frames[k].append(next(streams[k])[0])
            if round_index:
                seconds[k].append((time.perf_counter() - start) / 16)
    reference = np.concatenate(frames[per_forward[0]])
    return {
        "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
        "seconds_per_frame": {str(k): float(np.median(v)) for k, v in seconds.items()},
        "seconds_per_frame_per_round": {str(k): v for k, v in seconds.items()},
        "ratio_vs_one": {str(k): paired_ratio(v, seconds[per_forward[0]]) for k, v in seconds.items()},
        "equal_to_one": {str(k): bool(np.array_equal(np.concatenate(frames[k]), reference)) for k in per_forward},
    }


def gathered_window_tiles(cache, layer, key, value, grid, spatial):
    """`CausalKVCache.window_tiles` as the cache worked before the tile layout: keys and values kept as tokens,
    every visible frame gathered into windows at every chunk (the offline form's copies)."""
    from cascade_vsr.models.causal_attention import _key_tiles, window_tiles

    keys, values = cache.keys_values(layer, key, value, grid[0])
    key_grid = (keys.shape[-2] // (grid[1] * grid[2]), *grid[1:])
    return [
        (_key_tiles(k), _key_tiles(v))
        for k, v in zip(window_tiles(keys, key_grid, spatial), window_tiles(values, key_grid, spatial))
    ]


def kv_layout(rounds: int, dtype: str) -> dict:
    """Median seconds per streamed frame with the tile-layout cache against the gathered one: two streams of the
    same clip in this process, 16 frames each per round, alternating."""
    import torch

    from cascade_vsr.models.causal_attention import CausalKVCache

    pipe, chunks = _streaming_input(rounds, dtype)
    tiles = CausalKVCache.window_tiles
    variants = {"tiles": tiles, "gathered": gathered_window_tiles}
    streams = {
        name: pipe.stream(chunks, scale=2, output_type="np", generator=torch.Generator().manual_seed(0))
        for name in variants
    }
    frames, seconds = {name: [] for name in variants}, {name: [] for name in variants}
    try:
        for round_index in range(rounds + 1):  # the first round warms up
            for name in variants if round_index % 2 else reversed(variants):
                CausalKVCache.window_tiles = variants[name]
                start = time.perf_counter()
                for _ in range(16):
                    frames[name].append(next(streams[name])[0])
                if round_index:
                    seconds[name].append((time.perf_counter() - start) / 16)
    finally:
        CausalKVCache.window_tiles = tiles
    return {
        "seconds_per_frame": {name: float(np.median(v)) for name, v in seconds.items()},
        "seconds_per_frame_per_round": seconds,
        "ratio_tiles_vs_gathered": paired_ratio(seconds["tiles"], seconds["gathered"]),
        "equal": bool(np.array_equal(np.concatenate(frames["tiles"]), np.concatenate(frames["gathered"]))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=9, help="latent frames of the offline clip")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds per measurement")
    parser.add_argument("--dtype", default="auto", help="the streamed stage's dtype (upscale's --dtype)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.frames < 1 or args.rounds < 1:
        parser.error(f"--frames and --rounds must be >= 1, got {args.frames} and {args.rounds}")
    import torch

    record = {
        "torch_threads": torch.get_num_threads(),
        "offline": offline_step(args.rounds, args.frames),
        "streaming": streaming(args.rounds, args.dtype),
        "kv_layout": kv_layout(args.rounds, args.dtype),
    }
    offline, stream = record["offline"], record["streaming"]
    print(f"offline step ({args.frames} frames, float32), median seconds:")
    for name, value in offline["seconds"].items():
        print(f"  {name:10s} {value:6.2f}")
    print(f"  per-chunk vs masked: {offline['ratio_per_chunk_vs_masked']:.2f}x the time")
    print(f"streaming ({stream['dtype']}), chunks per forward: ms per frame, ratio vs 1, frames equal to 1's")
    for k, value in stream["seconds_per_frame"].items():
        print(f"  {k:>2s}  {value * 1e3:6.1f}  {stream['ratio_vs_one'][k]:.3f}  {stream['equal_to_one'][k]}")
    layout = record["kv_layout"]
    print("streaming, window layers' KV cache: ms per frame")
    for name, value in layout["seconds_per_frame"].items():
        print(f"  {name:10s} {value * 1e3:6.1f}")
    print(f"  tiles vs gathered: {layout['ratio_tiles_vs_gathered']:.3f}x the time, equal frames: {layout['equal']}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
