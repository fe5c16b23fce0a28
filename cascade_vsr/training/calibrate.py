"""Calibration of the detail-aware timestep sampler (SimpleGVR section 4.3, Fig. 5).

Run N-step inference with a trained model on LR latents; at each step predict the clean latent x^0 from the
velocity, take its 2D DCT (per frame and channel), keep the high-frequency band, and measure how much that band
changes between consecutive steps: gain_i = mean |H(x^0_{i+1}) - H(x^0_i)|^2 (the DCT is linear, so this is
the high-frequency energy of the change of x^0). Step i covers sigma in [sigma_{i+1}, sigma_i]; the probability
of that interval is proportional to its gain (mixed with a small uniform floor so that no timestep is never
trained), which gives a piecewise-constant density over sigma that `DetailAwareTimestepSampler` samples.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from einops import einsum

from cascade_vsr.core.flow import noise_augment, predict_clean, timestep_to_sigma

CALIBRATION_FORMAT = "cascade-vsr-timestep-density"


def dct_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal DCT-II matrix D (n x n): X = D @ x."""
    k = torch.arange(n, dtype=dtype)[:, None]
    j = torch.arange(n, dtype=dtype)[None, :]
    matrix = torch.cos(math.pi * (2 * j + 1) * k / (2 * n)) * math.sqrt(2 / n)
    matrix[0] /= math.sqrt(2)
    return matrix


def dct2(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2D DCT-II over the last two dims."""
    d_h = dct_matrix(x.shape[-2], x.dtype).to(x.device)
    d_w = dct_matrix(x.shape[-1], x.dtype).to(x.device)
    return einsum(d_h, x, d_w, "u h, ... h w, v w -> ... u v")


def high_frequency_mask(height: int, width: int, cutoff: float = 0.5) -> torch.Tensor:
    """DCT coefficients whose normalized frequency max(u / H, v / W) is at least `cutoff`."""
    u = torch.arange(height)[:, None] / height
    v = torch.arange(width)[None, :] / width
    return torch.maximum(u, v) >= cutoff


@torch.no_grad()
def detail_gain_curve(
    upsampler,
    transformer,
    lr_latents: list[torch.Tensor],
    hr_sizes: list[tuple[int, int]],
    num_steps: int = 50,
    noise_level: float = 0.3,
    cutoff: float = 0.5,
    seed: int = 0,
) -> dict:
    """Sigmas and per-step high-frequency energies / detail gains, averaged over the LR clips."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not lr_latents:
        raise ValueError("`lr_latents` must hold at least one clip")
    if num_steps < 2:
        raise ValueError(f"`num_steps` must be at least 2, got {num_steps}")
    if not 0 < cutoff < 1:
        raise ValueError(f"`cutoff` must lie in (0, 1), got {cutoff}")
    device = next(transformer.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    energies, gains = torch.zeros(num_steps + 1, dtype=torch.float64), torch.zeros(num_steps, dtype=torch.float64)
    sigmas = None
    for lr, size in zip(lr_latents, hr_sizes):
        lr = lr.to(device)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
        scheduler.set_timesteps(num_steps)
        condition = upsampler(lr, size=tuple(size)).sample
        condition = noise_augment(condition, noise_level, noise=torch.randn(condition.shape, generator=generator))
        latents = torch.randn(condition.shape, generator=generator).to(device)
        mask = high_frequency_mask(*size, cutoff).to(device)
        bands = []
        for t in scheduler.timesteps:
            velocity = transformer(
                latents, condition, timestep=t.expand(latents.shape[0]), noise_aug_level=noise_level
            ).sample
            clean = predict_clean(latents, velocity, timestep_to_sigma(t).expand(latents.shape[0]))
            bands.append(dct2(clean.double())[..., mask])
            latents = scheduler.step(velocity, t, latents).prev_sample
        bands.append(dct2(latents.double())[..., mask])  # sigma = 0: the output itself
        bands = torch.stack(bands)  # (steps + 1, B, C, T, K)
        energies += bands.pow(2).flatten(1).mean(1).cpu()
        gains += (bands[1:] - bands[:-1]).pow(2).flatten(1).mean(1).cpu()
        sigmas = scheduler.sigmas.double().cpu()
    count = len(lr_latents)
    return {"sigmas": sigmas, "hf_energy": energies / count, "gain": gains / count}


def curve_to_distribution(sigmas: torch.Tensor, gain: torch.Tensor, floor: float = 0.05) -> dict:
    """Piecewise-constant density over sigma from the per-interval gains (intervals [sigma_{i+1}, sigma_i])."""
    if not 0 <= floor < 1:
        raise ValueError(f"`floor` must lie in [0, 1), got {floor}")
    edges = sigmas.flip(0).double()  # increasing: 0 ... 1
    widths = edges[1:] - edges[:-1]
    gain = gain.flip(0).double().clamp_min(0)
    if gain.sum() <= 0:
        raise ValueError("the detail-gain curve is zero everywhere: the model produced no detail change")
    probabilities = (1 - floor) * gain / gain.sum() + floor * widths / widths.sum()
    return {"edges": edges, "probabilities": probabilities, "density": probabilities / widths}


def write_calibration(path: str | Path, curve: dict, distribution: dict, meta: dict) -> tuple[Path, Path]:
    """Write the JSON read by `DetailAwareTimestepSampler.from_json` and a PNG plot next to it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "format": CALIBRATION_FORMAT,
        "version": 1,
        "edges": distribution["edges"].tolist(),
        "density": distribution["density"].tolist(),
        "probabilities": distribution["probabilities"].tolist(),
        "sigmas": curve["sigmas"].tolist(),
        "hf_energy": curve["hf_energy"].tolist(),
        "gain": curve["gain"].tolist(),
        **meta,
    }
    path.write_text(json.dumps(data, indent=2) + "\n")

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    mid = ((curve["sigmas"][1:] + curve["sigmas"][:-1]) / 2).numpy()
    left.plot(mid, curve["gain"].numpy(), marker="o", markersize=3)
    left.set(xlabel="sigma (1 = noise)", ylabel="HF change of x^0", title="detail gain per step")
    right.stairs(distribution["density"].numpy(), distribution["edges"].numpy(), fill=True, alpha=0.6)
    right.set(xlabel="sigma (1 = noise)", ylabel="density", title="detail-aware timestep density")
    figure.tight_layout()
    png = path.with_suffix(".png")
    figure.savefig(png, dpi=100)
    plt.close(figure)
    return path, png


def calibrate(
    model_dir: str | Path,
    data_dir: str | Path,
    output: str | Path,
    num_clips: int = 8,
    num_steps: int = 50,
    noise_level: float = 0.3,
    cutoff: float = 0.5,
    floor: float = 0.05,
    num_latent_frames: int | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[Path, Path]:
    """Calibrate on the first `num_clips` clips of a pair dataset with an exported model."""
    from cascade_vsr.core.validation import check_device, check_pretrained_source, check_writable_file
    from cascade_vsr.models.transformer import CascadeVSRTransformer3DModel
    from cascade_vsr.models.upsampler import LatentUpsampler3D
    from cascade_vsr.training.data import PairLatentDataset

    if not 0 <= noise_level <= 1:
        raise ValueError(f"`noise_level` must lie in [0, 1], got {noise_level}")
    for name, value in (("num_clips", num_clips), ("num_steps", num_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    if num_latent_frames is not None and num_latent_frames <= 0:
        raise ValueError(f"`num_latent_frames` must be positive, got {num_latent_frames}")
    if not 0 < cutoff < 1 or not 0 <= floor < 1:
        raise ValueError(f"`cutoff` must lie in (0, 1) and `floor` in [0, 1), got {cutoff}, {floor}")
    if seed < 0:
        raise ValueError(f"`seed` must be >= 0, got {seed}")
    check_writable_file(output, "output")
    check_device(device, "device")
    check_pretrained_source(model_dir, "model", subfolder="upsampler")
    check_pretrained_source(model_dir, "model", subfolder="transformer")
    dataset = PairLatentDataset(data_dir, num_frames=num_latent_frames)
    upsampler = LatentUpsampler3D.from_pretrained(model_dir, subfolder="upsampler").to(device).eval()
    transformer = CascadeVSRTransformer3DModel.from_pretrained(model_dir, subfolder="transformer").to(device).eval()
    channels = {clip.lr_shape[0] for clip in dataset.clips}
    if channels != {upsampler.config.latent_channels}:
        raise ValueError(
            f"`data` latents have {sorted(channels)} channels, the model's latent_channels is "
            f"{upsampler.config.latent_channels}"
        )
    samples = [dataset[i] for i in range(min(num_clips, len(dataset)))]
    curve = detail_gain_curve(
        upsampler,
        transformer,
        [s["lr_latents"][None] for s in samples],
        [tuple(s["hr_latents"].shape[-2:]) for s in samples],
        num_steps=num_steps,
        noise_level=noise_level,
        cutoff=cutoff,
        seed=seed,
    )
    distribution = curve_to_distribution(curve["sigmas"], curve["gain"], floor)
    meta = {
        "model": str(model_dir),
        "data_dir": str(data_dir),
        "num_clips": len(samples),
        "num_steps": num_steps,
        "noise_level": noise_level,
        "cutoff": cutoff,
        "floor": floor,
    }
    return write_calibration(output, curve, distribution, meta)
