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
