import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from cascade_vsr.flow import (
    add_noise,
    noise_augment,
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
