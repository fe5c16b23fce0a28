"""Latent path vs pixel path of a cascade stage, with the real-size Wan 2.1 VAE architecture (random weights:
compute does not depend on weight values).

- latent path: LatentUpsampler3D on the LR latents (9 frames, 256x448 -> 512x896, i.e. 3x32x56 -> 3x64x112)
- pixel path: decode the LR latents, resize the frames to 512x896, re-encode them at HR (what a pixel-space
  cascade must do before its second stage)

Also the per-step time of the default (~1.09B) transformer at one small latent size.
Writes benchmarks/results/cascade.json.  Run: python benchmarks/cascade.py
"""

from __future__ import annotations

import json
import pathlib
import platform
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from einops import rearrange

from cascade_vsr import CascadeVSRTransformer3DModel, LatentUpsampler3D
from cascade_vsr.pipelines.adapters import get_adapter

RESULTS = pathlib.Path(__file__).parent / "results" / "cascade.json"


def timed(fn, repeats: int = 1) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vae = AutoencoderKLWan().eval().to(device)  # the default config = the Wan 2.1 VAE architecture
    adapter = get_adapter(vae)
    upsampler = LatentUpsampler3D(latent_channels=16).eval().to(device)
    num_frames, lr_size, hr_size = 9, (256, 448), (512, 896)
    lr = torch.randn(1, 16, adapter.num_latent_frames(num_frames), lr_size[0] // 8, lr_size[1] // 8, device=device)
    hr_latent = (hr_size[0] // 8, hr_size[1] // 8)

    def latent_path():
        return upsampler(lr, size=hr_latent).sample

    def pixel_path():
        video = adapter.decode(vae, lr)
        frames = F.interpolate(rearrange(video, "b c t h w -> (b t) c h w"), size=hr_size, mode="bilinear")
        video = rearrange(frames, "(b t) c h w -> b c t h w", b=1)
        return adapter.encode(vae, video.clamp(-1, 1))

    latent_s = timed(latent_path, repeats=3)
    print(f"latent path: {latent_s:.3f} s", flush=True)
    start = time.perf_counter()
    pixel_path()  # one run, no warm-up: it is slow on CPU
    pixel_s = time.perf_counter() - start
    print(f"pixel path: {pixel_s:.3f} s", flush=True)

    transformer = CascadeVSRTransformer3DModel().eval().to(device)
    grid = (2, 16, 16)  # latent (T, h, w): 512 tokens after the (1, 2, 2) patch
    x = torch.randn(1, 16, *grid, device=device)
    text = torch.randn(1, 32, 4096, device=device)
    step_s = timed(
        lambda: transformer(x, x, timestep=torch.tensor([500.0]), noise_aug_level=0.45, encoder_hidden_states=text),
        repeats=1,
    )

    result = {
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu ({platform.processor() or 'unknown'}, {torch.get_num_threads()} threads, shared with other jobs)",
        "torch": torch.__version__,
        "num_frames": num_frames,
        "lr_size": list(lr_size),
        "hr_size": list(hr_size),
        "latent_path_s": latent_s,
        "pixel_path_s": pixel_s,
        "latent_over_pixel": latent_s / pixel_s,
        "target_latent_over_pixel": 0.02,
        "transformer_params": sum(p.numel() for p in transformer.parameters()),
        "transformer_step_latent_grid": list(grid),
        "transformer_step_s": step_s,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'path':<28}{'seconds':>12}")
    print(f"{'latent (upsampler)':<28}{latent_s:>12.3f}")
    print(f"{'pixel (decode+resize+enc)':<28}{pixel_s:>12.3f}")
    print(f"{'ratio latent/pixel':<28}{latent_s / pixel_s:>12.4f}   (target <= 0.02)")
    print(f"{'transformer step ' + str(grid):<28}{step_s:>12.3f}")


if __name__ == "__main__":
    main()
