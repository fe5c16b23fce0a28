"""The committed demo model (demo/model/, trained by demo/README.md's commands) beats bicubic on held-out frames."""

from __future__ import annotations

import pytest

from cascade_vsr.commands import demo
from cascade_vsr.core.metrics import psnr, ssim


@pytest.mark.parametrize("clip", ["bigbuckbunny", "carphone"])
def test_demo_model_beats_bicubic_on_held_out_frames(clip):
    args = demo.parse_args(["--num-frames", "5"])  # the demo's own defaults otherwise (steps, ensemble, seed)
    pipe = demo.load_pipeline(args.model, "cpu")
    pipe.set_progress_bar_config(disable=True)

    # frames the model never saw, area-downsampled 2x
    ground_truth, _, lr, bicubic = demo.held_out_clip(clip, args.num_frames, tuple(args.hr_size))
    assert lr.shape[1:3] == (ground_truth.shape[1] // 2, ground_truth.shape[2] // 2)
    cascade = demo.super_resolve(pipe, lr, ground_truth.shape[1:3], **demo.sampler_settings(args), desc=clip)

    cascade_psnr, bicubic_psnr = float(psnr(cascade, ground_truth).mean()), float(psnr(bicubic, ground_truth).mean())
    cascade_ssim, bicubic_ssim = float(ssim(cascade, ground_truth).mean()), float(ssim(bicubic, ground_truth).mean())
    print(
        f"{clip}: cascade-vsr {cascade_psnr:.2f} dB / {cascade_ssim:.4f}, bicubic {bicubic_psnr:.2f} dB / {bicubic_ssim:.4f}"
    )
    assert cascade_psnr > bicubic_psnr + 0.1
    assert cascade_ssim > bicubic_ssim


def test_one_step_demo_model_samples_in_one_network_evaluation():
    """The shipped one-step model (demo/README.md, "The one-step model"): its folder's settings are one step and
    one run, and a call runs the transformer once."""
    import torch

    from cascade_vsr import CascadeVSRPipeline, demo_model_path

    pipe = CascadeVSRPipeline.from_pretrained(demo_model_path(one_step=True))
    settings = pipe.sampling_settings()
    assert (settings["num_inference_steps"], settings["self_ensemble"]) == (1, 1)
    calls = []
    pipe.transformer.register_forward_hook(lambda *args: calls.append(1))
    ground_truth, _, lr, bicubic = demo.held_out_clip("carphone", 3, (192, 320))
    frames = demo.super_resolve(pipe, lr, ground_truth.shape[1:3])
    assert len(calls) == 1 and frames.shape == ground_truth.shape
    assert float(psnr(frames, ground_truth).mean()) > float(psnr(bicubic, ground_truth).mean()) - 1.0
    assert torch.isfinite(torch.from_numpy(frames.astype("float32"))).all()


def test_the_one_step_demo_model_streams_its_whole_clip_numbers_and_beats_bicubic():
    """The shipped one-step model is block-causal (upscale's default; demo/README.md, recipe W): streamed frame by
    frame it gives the frames of one whole-clip call (to a grey level) and beats bicubic on held-out frames."""
    import numpy as np
    import torch
    from einops import rearrange

    from cascade_vsr import CascadeVSRPipeline, demo_model_path

    pipe = CascadeVSRPipeline.from_pretrained(demo_model_path(one_step=True))
    pipe.set_progress_bar_config(disable=True)
    chunk = pipe.transformer.config.causal_chunk_frames
    assert (chunk, pipe.transformer.config.causal_cache_chunks) == (1, 3)  # a sliding window of 4 frames
    ground_truth, _, lr, bicubic = demo.held_out_clip("bigbuckbunny", 9, (192, 320))
    whole = demo.super_resolve(pipe, lr, ground_truth.shape[1:3])

    video = rearrange(torch.from_numpy(lr), "t h w c -> 1 t c h w").float() / 255
    latents = pipe.adapter.encode(pipe.vae, pipe.preprocess_video(pipe.adapter, video))
    pieces = pipe.stream(latents.split(chunk, dim=2), scale=2, generator=torch.Generator().manual_seed(0))
    streamed = np.clip(np.rint(np.concatenate([piece[0] for piece in pieces]) * 255), 0, 255).astype(np.uint8)
    assert streamed.shape == whole.shape
    assert np.abs(streamed.astype(int) - whole.astype(int)).max() <= 1
    assert float(psnr(streamed, ground_truth).mean()) > float(psnr(bicubic, ground_truth).mean()) + 0.3
