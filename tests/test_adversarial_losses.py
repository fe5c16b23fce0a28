"""The adversarial post-training losses against hand-written formulas on small tensors."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from einops import rearrange

from cascade_vsr.core.metrics import consistency_mask, relative_warping_error
from cascade_vsr.core.optical_flow import bidirectional_flow
from cascade_vsr.training.adversarial import (
    approximate_gradient_penalty,
    feature_matching_loss,
    flow_temporal_loss,
    rpgan_discriminator_loss,
    rpgan_generator_loss,
    temporal_difference_loss,
)

REAL = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
FAKE = torch.tensor([[1.5, -1.0], [-1.0, 0.25]])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_rpgan_losses_pair_each_real_with_its_generated_sample():
    pairs = [(0.5, 1.5), (-1.0, -1.0), (2.0, -1.0), (0.0, 0.25)]
    expected_d = sum(softplus(fake - real) for real, fake in pairs) / 4
    expected_g = sum(softplus(real - fake) for real, fake in pairs) / 4
    assert rpgan_discriminator_loss(REAL, FAKE).item() == pytest.approx(expected_d, rel=1e-6)
    assert rpgan_generator_loss(REAL, FAKE).item() == pytest.approx(expected_g, rel=1e-6)
    # relativistic: shifting every logit by the same amount changes nothing
    assert rpgan_discriminator_loss(REAL + 3, FAKE + 3).item() == pytest.approx(expected_d, rel=1e-6)
    with pytest.raises(ValueError, match=r"\(B, heads\)"):
        rpgan_generator_loss(REAL, FAKE[:1])


def test_approximate_gradient_penalty_is_the_squared_change_of_the_logits():
    perturbed = REAL + torch.tensor([[0.1, 0.2], [-0.3, 0.0]])
    expected = ((0.1**2 + 0.2**2) + (0.3**2 + 0.0)) / 2
    assert approximate_gradient_penalty(REAL, perturbed).item() == pytest.approx(expected, rel=1e-6)
    assert approximate_gradient_penalty(REAL, REAL).item() == 0


def test_approximate_r1_tracks_the_true_gradient_penalty_of_a_linear_discriminator():
    """For D(x) = w.x, E||D(x) - D(x + s eps)||^2 = s^2 ||w||^2: the R1 penalty times s^2."""
    torch.manual_seed(0)
    weight, sigma = torch.randn(6), 0.01
    x = torch.randn(20000, 6)
    logits = (x @ weight)[:, None]
    perturbed = ((x + sigma * torch.randn_like(x)) @ weight)[:, None]
    estimate = approximate_gradient_penalty(logits, perturbed).item()
    assert estimate == pytest.approx(sigma**2 * weight.square().sum().item(), rel=0.05)


def test_feature_matching_is_the_mean_l1_over_layers():
    fake = [torch.tensor([[1.0, 2.0]]), torch.tensor([[[0.0], [4.0]]])]
    real = [torch.tensor([[0.0, 0.0]]), torch.tensor([[[1.0], [1.0]]])]
    expected = ((1 + 2) / 2 + (1 + 3) / 2) / 2
    assert feature_matching_loss(fake, real).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="same positive number"):
        feature_matching_loss(fake, real[:1])


def test_temporal_difference_loss_compares_frame_to_frame_changes():
    target = torch.tensor([0.0, 1.0, 3.0]).reshape(1, 1, 3, 1, 1)
    prediction = torch.tensor([1.0, 1.0, 4.0]).reshape(1, 1, 3, 1, 1)
    # changes: target (1, 2), prediction (0, 3) -> squared differences (1, 1)
    assert temporal_difference_loss(prediction, target).item() == pytest.approx(1.0)
    assert temporal_difference_loss(target + 5, target).item() == 0  # a constant offset does not flicker
    assert temporal_difference_loss(prediction[:, :, :1], target[:, :, :1]).item() == 0


def moving_texture(frames: int = 4, size: int = 32, shift: int = 2) -> np.ndarray:
    """A smooth random texture translated by `shift` px per frame: (T, H, W, 3) uint8 with known motion."""
    rng = np.random.default_rng(0)
    base = cv2.GaussianBlur(rng.uniform(0, 255, (size + frames * shift, size + frames * shift, 3)), (0, 0), 2.0)
    base = (base - base.min()) / (base.max() - base.min()) * 200 + 28
    return np.stack([base[:size, t * shift : t * shift + size] for t in range(frames)]).round().astype(np.uint8)


def as_decoded(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> a decoded clip (1, 3, T, H, W) in [-1, 1]."""
    return rearrange(torch.from_numpy(frames).float() / 127.5 - 1, "t h w c -> 1 c t h w")


def test_flow_temporal_loss_is_the_relative_warping_error_in_decoded_units():
    target = moving_texture()
    rng = np.random.default_rng(1)
    prediction = np.clip(target.astype(int) + rng.integers(-6, 7, target.shape), 0, 255).astype(np.uint8)
    backward, forward = bidirectional_flow(target, preset="medium")
    expected = relative_warping_error(prediction, target, backward, consistency_mask(backward, forward)) / 127.5
    loss = flow_temporal_loss(as_decoded(prediction), as_decoded(target))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # a batch: the mean over the valid pixels of both clips, here two copies of the one clip
    both = flow_temporal_loss(as_decoded(prediction).repeat(2, 1, 1, 1, 1), as_decoded(target).repeat(2, 1, 1, 1, 1))
    assert both.item() == pytest.approx(expected, rel=1e-5)


def test_flow_temporal_loss_follows_the_motion():
    """An error pattern that moves with the content costs (almost) nothing; the same pattern standing still while
    the content moves, as a fixed grid does, costs as much as flicker."""
    target = moving_texture(frames=4, size=32, shift=2)
    pattern = moving_texture(frames=4, size=32, shift=2).astype(np.float32) / 127.5 - 1
    moving = as_decoded(target) + 0.05 * rearrange(torch.from_numpy(pattern), "t h w c -> 1 c t h w")
    still = as_decoded(target) + 0.05 * rearrange(torch.from_numpy(pattern[:1]), "t h w c -> 1 c t h w")
    moving_loss = flow_temporal_loss(moving, as_decoded(target))
    still_loss = flow_temporal_loss(still, as_decoded(target))
    assert moving_loss.item() < 0.2 * still_loss.item()
    # the same-pixel term cannot tell them apart: it charges the moving error more
    assert temporal_difference_loss(moving, as_decoded(target)) > temporal_difference_loss(still, as_decoded(target))

    prediction = still.clone().requires_grad_(True)
    flow_temporal_loss(prediction, as_decoded(target)).backward()
    assert prediction.grad.abs().sum() > 0
    assert flow_temporal_loss(still[:, :, :1], as_decoded(target)[:, :, :1]).item() == 0
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\) of one shape"):
        flow_temporal_loss(still, as_decoded(target)[:, :, :2])
