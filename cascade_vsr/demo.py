"""`cascade-vsr demo`: run the cascade data flow on a real clip.

Until a trained demo model exists this runs the stage with freshly initialised weights: the upsampler
is then exactly a bilinear resize and the transformer an untrained velocity field, so the numbers show
that the data flow works end to end, not super-resolution quality.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "Run the cascade stage on a real sample clip and write frames and numbers to --output-dir."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--num-frames", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from einops import rearrange

    from .flow import noise_augment, sigma_to_timestep
    from .transformer import CascadeVSRTransformer3DModel
    from .upsampler import LatentUpsampler3D
    from .video import read_video, sample_video_path, write_video

    torch.manual_seed(args.seed)
    frames = read_video(sample_video_path("bigbuckbunny.mp4"), start=100, num_frames=args.num_frames)
    hr = rearrange(torch.from_numpy(frames).float() / 127.5 - 1, "t h w c -> 1 c t h w")[..., :352, :640]
    lr = F.interpolate(rearrange(hr, "1 c t h w -> t c h w"), scale_factor=0.5, mode="area")
    lr = rearrange(lr, "t c h w -> 1 c t h w")

    upsampler = LatentUpsampler3D(latent_channels=3, hidden_channels=32, num_blocks=1)
    transformer = CascadeVSRTransformer3DModel(
        latent_channels=3, num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, text_dim=32,
        patch_size=(1, 8, 8),
    )
    with torch.no_grad():
        up = upsampler(lr, size=hr.shape[-2:])
        condition = noise_augment(up, 0.45)
        noisy = torch.randn_like(up)
        velocity = transformer(noisy, condition, sigma_to_timestep(torch.ones(1)), torch.tensor([0.45])).sample

    mse = F.mse_loss(up.clamp(-1, 1), hr).item()
    summary = {
        "frames": list(hr.shape),
        "upsampler_psnr_db_vs_ground_truth": 10 * np.log10(4 / mse),
        "velocity_shape": list(velocity.shape),
        "note": "untrained weights: a fresh upsampler is a bilinear resize; the trained demo comes later",
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    out = ((rearrange(up, "1 c t h w -> t h w c").clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    write_video(args.output_dir / "upsampled.mp4", out)
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0
