"""It learns: a tiny model trained on CPU on pairs from the real bigbuckbunny clip lowers its loss, and sampling
its export with CascadeVSRPipeline (12 Euler steps) lands closer to the HR latents than the bilinearly upsampled
LR latents."""

from __future__ import annotations

import json
import time

import pytest
import torch

from cascade_vsr.models.upsampler import resize_frames
from cascade_vsr.training.config import load_config
from cascade_vsr.training.data import PairLatentDataset
from cascade_vsr.training.trainer import train

from ._pairs import build_pairs
from ._recipes import LEARN_ARGS, LEARN_CROP, LEARN_DATA, euler_sample, tiny_args

LEARN_STEPS = 200


@pytest.mark.slow
def test_tiny_model_learns_on_real_clip(tmp_path):
    root = build_pairs(tmp_path / "pairs", **LEARN_DATA)
    start = time.perf_counter()
    summary = train(*load_config(None, tiny_args(root, tmp_path / "run", LEARN_STEPS, *LEARN_ARGS)))
    elapsed = time.perf_counter() - start
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert len(losses) == LEARN_STEPS
    first, last = sum(losses[:5]) / 5, sum(losses[-20:]) / 20
    print(f"trained {LEARN_STEPS} steps in {elapsed:.1f} s; loss {first:.3f} -> {last:.3f}")
    assert last < 0.5 * first

    # Evaluate on 16 aligned crops of the training size (the shape the tiny model was trained on).
    dataset = PairLatentDataset(root, crop_size=LEARN_CROP, num_frames=1)
    keys = [(index, seed) for index in range(len(dataset)) for seed in range(4)]
    lr = torch.stack([dataset[key]["lr_latents"] for key in keys])
    hr = torch.stack([dataset[key]["hr_latents"] for key in keys])
    size = tuple(hr.shape[-2:])
    bilinear_error = (resize_frames(lr, size) - hr).pow(2).mean().item()
    sample = euler_sample(summary["export_dir"], lr, size, num_steps=12, noise_level=0.0)
    sample_error = (sample - hr).pow(2).mean().item()
    print(f"MSE to HR latents: sample {sample_error:.4f}, bilinear {bilinear_error:.4f}")
    assert sample_error < 0.95 * bilinear_error

    # The same check rejects a sampler with the velocity sign flipped (z += (sigma - sigma_next) v).
    broken = euler_sample(summary["export_dir"], lr, size, num_steps=12, noise_level=0.0, velocity_sign=-1.0)
    assert (broken - hr).pow(2).mean().item() > bilinear_error
