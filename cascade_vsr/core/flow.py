"""Rectified-flow helpers shared by the pipeline and the trainer.

Conventions are those of diffusers' `FlowMatchEulerDiscreteScheduler`:

- sigma in [0, 1] is the noise fraction: `z_t = (1 - sigma) * z_0 + sigma * eps` (sigma = 1 is pure noise);
- the model predicts the velocity `v = eps - z_0`, so an Euler step is `z <- z + (sigma_next - sigma) * v`;
- the model's `timestep` input is `sigma * num_train_timesteps` (1000).

Noise augmentation of the upsampled LR condition uses the same interpolation with its own level `s`
(SimpleGVR: s ~ U[0.3, 0.6] in training, fixed at inference), and the level is fed to the model.
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from cascade_vsr.core.validation import check_per_sample

NUM_TRAIN_TIMESTEPS = 1000


def _per_sample(values: torch.Tensor | float, like: torch.Tensor, name: str) -> torch.Tensor:
    """A scalar or (B,) tensor of values in [0, 1], shaped (B, 1, ..., 1) to broadcast over a (B, ...) tensor."""
    values = check_per_sample(values, name, like.shape[0], bounds=(0, 1), dtype=torch.float32, device=like.device)
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def sigma_to_timestep(sigma: torch.Tensor | float) -> torch.Tensor:
    """Noise fraction in [0, 1] -> the model's timestep input (scheduler units)."""
    return torch.as_tensor(sigma, dtype=torch.float32) * NUM_TRAIN_TIMESTEPS


def timestep_to_sigma(timestep: torch.Tensor | float) -> torch.Tensor:
    """The model's timestep input (scheduler units) -> noise fraction in [0, 1]."""
    return torch.as_tensor(timestep, dtype=torch.float32) / NUM_TRAIN_TIMESTEPS


def add_noise(clean: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """`(1 - sigma) * clean + sigma * noise`, with sigma a scalar or one value per sample."""
    if clean.shape != noise.shape:
        raise ValueError(f"`noise` must have the shape of `clean` {tuple(clean.shape)}, got {tuple(noise.shape)}")
    sigma = _per_sample(sigma, clean, "sigma").to(clean.dtype)
    return (1 - sigma) * clean + sigma * noise


def velocity_target(clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target `eps - z_0`."""
    return noise - clean


def predict_clean(noisy: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Estimate `z_0 = z_t - sigma * v` from a velocity prediction."""
    sigma = _per_sample(sigma, noisy, "sigma").to(noisy.dtype)
    return noisy - sigma * velocity


def noise_augment(
    condition: torch.Tensor,
    level: torch.Tensor | float,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Noise-augment the upsampled LR condition: `c = (1 - s) * up + s * eps` with its own noise.

    The noise is drawn independently of the diffusion noise (SimpleGVR section 4.1); pass `noise` to
    control it, or a `generator` for reproducibility.
    """
    if noise is None:
        noise = torch.randn(condition.shape, generator=generator, device=condition.device, dtype=condition.dtype)
    return add_noise(condition, noise, level)


def frame_correlated_noise(
    shape: tuple[int, ...],
    correlation: float,
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Unit-variance Gaussian noise of (B, C, T, H, W) whose frames have correlation `correlation` with each other:
    `sqrt(r) eps_shared + sqrt(1 - r) eps_t` (the mixed noise prior of PYoCo, Ge et al. 2023).

    r = 0 is plain i.i.d. noise (drawn exactly as `randn_tensor(shape)`); r = 1 is one noise image for every frame.
    Independent noise per frame makes whatever detail a sampler generates differ from frame to frame (flicker in
    static regions); shared noise keeps it in place.
    """
    if len(shape) != 5:
        raise ValueError(f"`shape` must be (B, C, T, H, W), got {tuple(shape)}")
    if not 0.0 <= correlation <= 1.0:
        raise ValueError(f"`correlation` must lie in [0, 1], got {correlation}")
    device = torch.device(device or "cpu")
    independent = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
    if correlation == 0.0:
        return independent
    shared = randn_tensor((*shape[:2], 1, *shape[3:]), generator=generator, device=device, dtype=torch.float32)
    return correlation**0.5 * shared + (1 - correlation) ** 0.5 * independent


# ------------------------------------------------------------------------------------------------------------------
# In super-resolution the clean HR latent is close to the upsampled LR latent: z_0 = up + r with a small residual r.
# A plain velocity network has to pass the condition through to its output with that precision, which is hard for a
# small model trained briefly (demo/README.md has the numbers). With `residual_std` the velocity is instead written
# around the exact posterior of a Gaussian model z_0 ~ N(m, p^2) built from the condition, and the network only
# predicts the normalized residual of z_0 (EDM-style preconditioning, Karras et al. 2022): an untrained network
# already samples around the condition.


def condition_prior(
    condition: torch.Tensor, noise_aug_level: torch.Tensor | float, residual_std: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian prior (mean m, std p per sample) of the clean latent given the noise-augmented condition.

    With `c = (1 - a) up + a eps_c`, a unit-variance prior on `up`, and `z_0 = up + r`, r ~ N(0, residual_std^2):
    `m = (1 - a) c / ((1 - a)^2 + a^2)` and `p^2 = residual_std^2 + a^2 / ((1 - a)^2 + a^2)`. At a = 0 this is
    `N(c, residual_std^2)`; at a = 1 the condition carries nothing and the prior is N(0, 1 + residual_std^2).
    """
    level = _per_sample(noise_aug_level, condition, "noise_aug_level").float()
    mean = (1 - level) / ((1 - level) ** 2 + level**2) * condition.float()
    return mean, condition_prior_std(noise_aug_level, residual_std, condition)


def condition_prior_std(
    noise_aug_level: torch.Tensor | float, residual_std: float, condition: torch.Tensor
) -> torch.Tensor:
    """The per-sample std `p` of `condition_prior` alone (B, 1, ..., 1): the trainer's loss weight needs no mean."""
    level = _per_sample(noise_aug_level, condition, "noise_aug_level").float()
    return (residual_std**2 + level**2 / ((1 - level) ** 2 + level**2)).sqrt()


def _noisy_variance(sigma: torch.Tensor, prior_variance: torch.Tensor) -> torch.Tensor:
    """`D = Var(z_t) / Var(eps) = (1 - sigma)^2 p^2 + sigma^2` under the prior: the one term all three share."""
    return (1 - sigma) ** 2 * prior_variance + sigma**2


def preconditioned_input(
    noisy: torch.Tensor, sigma: torch.Tensor | float, prior_mean: torch.Tensor, prior_std: torch.Tensor
) -> torch.Tensor:
    """What a preconditioned network sees instead of z_t: `(E[z_0 | z_t] - m) / p` under the Gaussian prior.

    An invertible function of z_t for sigma < 1 (no information is lost), with variance in [0, 1] under the prior;
    at sigma = 1, where z_t says nothing about z_0, it is exactly zero. Fed raw z_t, a small model let the pure noise
    of the first step leak into its prediction, and identical input frames came out different (flicker).
    """
    sigma = _per_sample(sigma, noisy, "sigma").float()
    denominator = _noisy_variance(sigma, prior_std**2)
    return (1 - sigma) * prior_std / denominator * (noisy.float() - (1 - sigma) * prior_mean)


def preconditioned_velocity(
    residual: torch.Tensor,
    noisy: torch.Tensor,
    sigma: torch.Tensor | float,
    prior_mean: torch.Tensor,
    prior_std: torch.Tensor,
) -> torch.Tensor:
    """Velocity whose implied clean estimate is `E[z_0 | z_t] + std(z_0 | z_t) * residual` under the prior.

    With `D = (1 - sigma)^2 p^2 + sigma^2` and `u = z_t - (1 - sigma) m`, the Gaussian posterior velocity is
    `E[eps - z_0 | z_t] = (sigma - (1 - sigma) p^2) / D * u - m`, and the residual enters scaled by `p / sqrt(D)`
    (the posterior std of z_0 divided by sigma). Finite for every sigma in [0, 1]; fp32 throughout.
    """
    sigma = _per_sample(sigma, noisy, "sigma").float()
    variance = prior_std**2
    denominator = _noisy_variance(sigma, variance)
    gaussian = (sigma - (1 - sigma) * variance) / denominator * (noisy.float() - (1 - sigma) * prior_mean) - prior_mean
    return gaussian - prior_std / denominator.sqrt() * residual.float()


def preconditioned_loss_weight(sigma: torch.Tensor | float, prior_std: torch.Tensor) -> torch.Tensor:
    """Per-sample weight `D / p^2` that turns the velocity MSE into the MSE of the network's residual output, whose
    target has unit variance at every sigma (the velocity error is `p / sqrt(D)` times the residual error)."""
    sigma = _per_sample(sigma, prior_std, "sigma").float()
    variance = prior_std.float() ** 2
    return _noisy_variance(sigma, variance) / variance
