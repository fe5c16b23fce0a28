"""The committed demo model (demo/model/, trained by demo/README.md's commands) beats bicubic on held-out frames."""

from __future__ import annotations

import argparse

import pytest

from cascade_vsr import demo
from cascade_vsr.metrics import psnr, ssim


@pytest.mark.parametrize("clip", ["bigbuckbunny", "carphone"])
def test_demo_model_beats_bicubic_on_held_out_frames(clip):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--num-frames", "5"])  # the demo's own defaults otherwise (steps, noise level, seed)
    pipe = demo.load_pipeline(args.model, "cpu")
    pipe.set_progress_bar_config(disable=True)

    ground_truth, _ = demo.load_ground_truth(clip, args.num_frames, tuple(args.hr_size))  # frames the model never saw
    size = ground_truth.shape[1:3]
    lr = demo.resize(ground_truth, (size[0] // 2, size[1] // 2), "area")
    cascade = demo.super_resolve(pipe, lr, size, args, desc=clip)
    bicubic = demo.resize(lr, size, "bicubic")

    cascade_psnr, bicubic_psnr = float(psnr(cascade, ground_truth).mean()), float(psnr(bicubic, ground_truth).mean())
    cascade_ssim, bicubic_ssim = float(ssim(cascade, ground_truth).mean()), float(ssim(bicubic, ground_truth).mean())
    print(f"{clip}: cascade-vsr {cascade_psnr:.2f} dB / {cascade_ssim:.4f}, bicubic {bicubic_psnr:.2f} dB / {bicubic_ssim:.4f}")
    assert cascade_psnr > bicubic_psnr + 0.1
    assert cascade_ssim > bicubic_ssim
