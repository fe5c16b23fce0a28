import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from cascade_vsr.core.flow import (
    add_noise,
    condition_prior,
    frame_correlated_noise,
    noise_augment,
    preconditioned_input,
    preconditioned_loss_weight,
    preconditioned_velocity,
    predict_clean,
    sigma_to_timestep,
    timestep_to_sigma,
    velocity_target,
)


def test_exact_velocity_makes_one_euler_step_land_on_the_clean_latent():
    """With the true velocity, diffusers' scheduler recovers z_0 in one step: checks our sign,
    interpolation and timestep units against the scheduler itself."""
    clean, noise = torch.randn(2, 4, 3, 5, 6), torch.randn(2, 4, 3, 5, 6)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(num_inference_steps=1)
    timestep = scheduler.timesteps[0]
    sigma = timestep_to_sigma(timestep)
    torch.testing.assert_close(sigma, scheduler.sigmas[0])
    noisy = add_noise(clean, noise, sigma)
    step = scheduler.step(velocity_target(clean, noise), timestep, noisy).prev_sample
    torch.testing.assert_close(step, clean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(predict_clean(noisy, velocity_target(clean, noise), sigma), clean)


def test_per_sample_sigma_and_conversions():
    clean, noise = torch.zeros(3, 2, 1, 2, 2), torch.ones(3, 2, 1, 2, 2)
    noisy = add_noise(clean, noise, torch.tensor([0.0, 0.5, 1.0]))
    assert noisy[:, 0, 0, 0, 0].tolist() == [0.0, 0.5, 1.0]
    assert float(sigma_to_timestep(0.25)) == 250.0
    assert float(timestep_to_sigma(sigma_to_timestep(0.37))) == pytest.approx(0.37)


def test_noise_augment_is_reproducible_and_levelled():
    up = torch.randn(1, 4, 2, 8, 8)
    a = noise_augment(up, 0.45, generator=torch.Generator().manual_seed(1))
    b = noise_augment(up, 0.45, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(noise_augment(up, 0.0), up)
    noise = torch.randn_like(up)
    torch.testing.assert_close(noise_augment(up, 0.3, noise=noise), 0.7 * up + 0.3 * noise)


def test_flow_bad_inputs():
    x = torch.randn(2, 4, 1, 2, 2)
    with pytest.raises(ValueError, match="sigma.*\\[0, 1\\]"):
        add_noise(x, x, 1.5)
    with pytest.raises(ValueError, match="sigma.*shape"):
        add_noise(x, x, torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="noise"):
        add_noise(x, x[:1], 0.5)


# ---------------------------------------------------------------------------------------------------------------
# Preconditioning around the condition: checked against least-squares fits on Gaussian samples
# ---------------------------------------------------------------------------------------------------------------


def _least_squares(target: torch.Tensor, *features: torch.Tensor) -> list[float]:
    design = torch.stack([f.flatten().double() for f in features], dim=1)
    return torch.linalg.lstsq(design, target.flatten().double()[:, None]).solution.flatten().tolist()


def _gaussian_samples(prior_std: float, sigma: float, seed: int, n: int = 400_000) -> dict[str, torch.Tensor]:
    """Samples of z_0 ~ N(m, prior_std^2) around random prior means m, and z_t at `sigma`."""
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, generator=generator)
    clean = mean + prior_std * torch.randn(n, generator=generator)
    noise = torch.randn(n, generator=generator)
    return {"mean": mean, "clean": clean, "noise": noise, "noisy": add_noise(clean, noise, sigma)}


@pytest.mark.parametrize("sigma", [0.05, 0.3, 0.8, 1.0])
@pytest.mark.parametrize("prior_std", [0.06, 0.5])
def test_gaussian_part_of_the_preconditioned_velocity_is_the_least_squares_velocity(sigma, prior_std):
    # With z_0 ~ N(m, p^2), the best velocity estimate from (z_t, m) is linear: fit it on samples, independently of
    # the closed form, and compare both the coefficients and the residual error.
    samples = _gaussian_samples(prior_std, sigma, seed=0)
    mean, noisy = samples["mean"], samples["noisy"]
    target = velocity_target(samples["clean"], samples["noise"])
    closed_form = preconditioned_velocity(torch.zeros_like(mean), noisy, sigma, mean, torch.full_like(mean, prior_std))
    fitted = _least_squares(target, noisy, mean)
    torch.testing.assert_close(_least_squares(closed_form, noisy, mean), fitted, atol=0.01, rtol=0.01)
    fitted_error = (target - fitted[0] * noisy - fitted[1] * mean).pow(2).mean()
    assert abs((target - closed_form).pow(2).mean() - fitted_error) <= 0.01 * fitted_error


@pytest.mark.parametrize("sigma", [0.0, 0.2, 1.0])
def test_residual_is_the_normalized_posterior_deviation_and_the_weight_its_scale(sigma):
    # The implied clean estimate z_t - sigma v moves by std(z_0 | z_t) * residual, with the posterior std from the
    # textbook Gaussian conditioning formula; the loss weight turns velocity errors into residual errors.
    prior_std = torch.tensor([0.06, 0.3]).reshape(2, 1, 1)
    mean, noisy = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    residual = torch.randn(2, 3, 4)
    base = preconditioned_velocity(torch.zeros_like(residual), noisy, sigma, mean, prior_std)
    moved = preconditioned_velocity(residual, noisy, sigma, mean, prior_std)
    variance, covariance = prior_std**2, (1 - sigma) * prior_std**2
    posterior_std = (variance - covariance**2 / ((1 - sigma) ** 2 * variance + sigma**2)).sqrt()
    if sigma > 0:
        torch.testing.assert_close(-sigma * (moved - base), posterior_std * residual, atol=1e-6, rtol=1e-5)
    else:  # z_t is the clean latent itself: the estimate stays z_t whatever the network says
        torch.testing.assert_close(noisy - sigma * moved, noisy)
    weight = preconditioned_loss_weight(sigma, prior_std)
    torch.testing.assert_close(weight * (moved - base) ** 2, residual**2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sigma", [0.0, 0.3, 1.0])
def test_preconditioned_input_is_the_standardized_posterior_mean(sigma):
    # (E[z_0 | z_t] - m) / p with the posterior mean fitted by least squares on Gaussian samples; zero at sigma = 1.
    prior_std = 0.2
    samples = _gaussian_samples(prior_std, sigma, seed=2)
    mean, noisy = samples["mean"], samples["noisy"]
    network_input = preconditioned_input(noisy, sigma, mean, torch.full_like(mean, prior_std))
    if sigma == 1.0:
        assert torch.equal(network_input, torch.zeros_like(mean))
        return
    a, b = _least_squares(samples["clean"], noisy, mean)
    torch.testing.assert_close(network_input, (a * noisy + b * mean - mean) / prior_std, atol=0.02, rtol=0.02)


@pytest.mark.parametrize("level", [0.0, 0.25, 1.0])
def test_condition_prior_matches_a_regression_of_the_clean_latent_on_the_condition(level):
    generator = torch.Generator().manual_seed(1)
    n, residual_std = 400_000, 0.06
    upsampled = torch.randn(n, generator=generator)
    clean = upsampled + residual_std * torch.randn(n, generator=generator)
    condition = noise_augment(upsampled[:, None], level, generator=generator)[:, 0]
    mean, std = condition_prior(condition[:, None], level, residual_std)
    (slope,) = _least_squares(clean, condition)
    torch.testing.assert_close(mean[:, 0], slope * condition, atol=0.01, rtol=0.01)
    torch.testing.assert_close(std.flatten()[0].item(), (clean - slope * condition).std().item(), atol=0.01, rtol=0.01)


@pytest.mark.parametrize("correlation", [0.0, 0.5, 0.9, 1.0])
def test_frame_correlated_noise_has_unit_variance_and_the_asked_correlation(correlation):
    noise = frame_correlated_noise((2, 8, 3, 64, 64), correlation, generator=torch.Generator().manual_seed(0))
    frames = noise.transpose(0, 2).reshape(3, -1)  # one row per frame
    torch.testing.assert_close(frames.var(dim=1), torch.ones(3), atol=0.03, rtol=0)
    assert abs(float(torch.corrcoef(frames)[0, 1]) - correlation) < 0.02
    if correlation == 0.0:  # drawn exactly as plain noise: the default sampler is unchanged
        torch.testing.assert_close(noise, torch.randn(2, 8, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    if correlation == 1.0:
        assert torch.equal(noise[:, :, 0], noise[:, :, 2])
    with pytest.raises(ValueError, match="correlation"):
        frame_correlated_noise((1, 1, 2, 2, 2), 1.5)
    with pytest.raises(ValueError, match="shape"):
        frame_correlated_noise((1, 2, 2, 2), 0.5)
