"""Build pair datasets in the exact `cascade-vsr make-pairs` format from the real bigbuckbunny clip.

No trained VAE exists offline, so the "latents" are a lossless space-to-depth of the pixels
(pixel_unshuffle by 4: 3 channels -> 48, H/4 x W/4), in [-1, 1]. LR is the HR frames 2x downsampled (area).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import save_file

from cascade_vsr.core.video import read_video, sample_video_path, write_video

SPACE_TO_DEPTH = 4
LATENT_CHANNELS = 3 * SPACE_TO_DEPTH**2


def frames_to_latents(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> (48, T, H/4, W/4) float32 in [-1, 1]."""
    pixels = torch.from_numpy(frames).float().div(127.5).sub(1)
    latents = F.pixel_unshuffle(rearrange(pixels, "t h w c -> t c h w"), SPACE_TO_DEPTH)
    return rearrange(latents, "t c h w -> c t h w").contiguous()


def latents_to_frames(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of frames_to_latents, as float pixels (T, 3, H, W) in [-1, 1]."""
    return F.pixel_shuffle(rearrange(latents, "c t h w -> t c h w"), SPACE_TO_DEPTH)


def resize(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.stack([cv2.resize(frame, (size[1], size[0]), interpolation=cv2.INTER_AREA) for frame in frames])


def write_dataset_json(root: Path, config: dict | None = None, version: int = 1) -> None:
    """The dataset.json that marks `root` as a pair dataset (the record make-pairs writes)."""
    root.mkdir(parents=True, exist_ok=True)
    record = {"format": "cascade-vsr-pairs", "version": version, "config": config or {}}
    (root / "dataset.json").write_text(json.dumps(record))


def build_pairs(
    root: str | Path,
    num_clips: int = 2,
    num_frames: int = 4,
    hr_size: tuple[int, int] = (64, 112),
    lr_size: tuple[int, int] | None = None,
    text_dim: int | None = None,
    first_frame: int = 0,
    frame_step: int = 24,
    write_videos: bool = False,
) -> Path:
    """Write `num_clips` HR/LR pairs of `num_frames` frames each (clip k starts at first_frame + k*frame_step)."""
    root = Path(root)
    lr_size = lr_size or (hr_size[0] // 2, hr_size[1] // 2)
    video = sample_video_path("bigbuckbunny.mp4")
    all_frames = read_video(video, first_frame, (num_clips - 1) * frame_step + num_frames)
    config = {"hr_size": list(hr_size), "lr_size": list(lr_size), "num_frames": num_frames, "latent_space": None}
    write_dataset_json(root, config)
    generator = torch.Generator().manual_seed(0)
    with (root / "manifest.jsonl").open("w") as manifest:
        for k in range(num_clips):
            clip_id = f"bbb-{k:03d}"
            folder = root / "clips" / clip_id
            folder.mkdir(parents=True, exist_ok=True)
            frames = all_frames[k * frame_step : k * frame_step + num_frames]
            hr, lr = resize(frames, hr_size), resize(frames, lr_size)
            tensors = {"hr_latents": frames_to_latents(hr), "lr_latents": frames_to_latents(lr)}
            if text_dim is not None:
                length = 3 + k
                tensors["prompt_embeds"] = torch.randn(length, text_dim, generator=generator)
                tensors["prompt_attention_mask"] = torch.ones(length, dtype=torch.int64)
            save_file(tensors, str(folder / "latents.safetensors"), metadata={"latent_space": "space_to_depth4"})
            if write_videos:
                write_video(folder / "hr.mp4", hr)
                write_video(folder / "lr.mp4", lr)
            entry = {
                "id": clip_id,
                "source": str(video),
                "start": first_frame + k * frame_step,
                "num_frames": num_frames,
                "stride": 1,
                "hr_size": list(hr_size),
                "lr_size": list(lr_size),
                "degradation": {"kind": "classic", "params": {"resize": "area"}},
                "seed": k,
                "hr": f"clips/{clip_id}/hr.mp4",
                "lr": f"clips/{clip_id}/lr.mp4",
                "latents": f"clips/{clip_id}/latents.safetensors",
                "latent_space": None,
            }
            manifest.write(json.dumps(entry) + "\n")
    return root
