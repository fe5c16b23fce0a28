"""The losses of adversarial post-training (SeedVR2, section 3.3), as pure functions of discriminator outputs.

Logits are (B, K): one per sample and discriminator head. Real and generated samples are paired by batch index
(the same LR clip), which is what the relativistic pairing of RpGAN compares.

    RpGAN, discriminator:  E[ softplus(D(x_fake) - D(x_real)) ]
    RpGAN, generator:      E[ softplus(D(x_real) - D(x_fake)) ]
    approximated R1 / R2:  E[ ||D(x) - D(x + sigma * eps)||^2 ]   on real (R1) / generated (R2) samples
    feature matching:      1/n sum_i mean |F_i(x_fake) - F_i(x_real)|

The approximated R1 and R2 penalise how much the discriminator's output moves under a small Gaussian perturbation
of its input: a finite-difference stand-in for the gradient penalty that needs no second-order gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _check_pair(real: torch.Tensor, fake: torch.Tensor) -> None:
    if real.shape != fake.shape or real.ndim != 2:
        raise ValueError(
            f"real and generated logits must both be (B, heads), got {tuple(real.shape)} and {tuple(fake.shape)}"
        )


def rpgan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Relativistic pairing GAN loss of the discriminator: each real sample should score above its generated pair."""
    _check_pair(real_logits, fake_logits)
    return F.softplus(fake_logits.float() - real_logits.float()).mean()


def rpgan_generator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Relativistic pairing GAN loss of the generator: each generated sample should score above its real pair."""
    _check_pair(real_logits, fake_logits)
    return F.softplus(real_logits.float() - fake_logits.float()).mean()


def approximate_gradient_penalty(logits: torch.Tensor, perturbed_logits: torch.Tensor) -> torch.Tensor:
    """Approximated R1 (real inputs) or R2 (generated inputs): the squared change of the logits when the input is
    perturbed by small Gaussian noise, summed over heads, averaged over the batch."""
    _check_pair(logits, perturbed_logits)
    return (logits.float() - perturbed_logits.float()).square().sum(dim=1).mean()


def feature_matching_loss(
    fake_features: Sequence[torch.Tensor], real_features: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Mean absolute difference of the discriminator's features of generated and real samples, averaged over the
    feature layers (SeedVR2's replacement of LPIPS, computed in latent space)."""
    if len(fake_features) != len(real_features) or not fake_features:
        raise ValueError(
            f"need the same positive number of features, got {len(fake_features)} and {len(real_features)}"
        )
    losses = [(fake.float() - real.float()).abs().mean() for fake, real in zip(fake_features, real_features)]
    return torch.stack(losses).mean()


def temporal_difference_loss(prediction: torch.Tensor, target: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """InfVSR's temporal smoothness term: the squared difference between the frame-to-frame changes of the
    prediction and of the target along `dim` (frames); zero for a single frame."""
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction and target must have one shape, got {tuple(prediction.shape)} and {tuple(target.shape)}"
        )
    if prediction.shape[dim] < 2:
        return prediction.new_zeros((), dtype=torch.float32)
    change = torch.diff(prediction.float(), dim=dim) - torch.diff(target.float(), dim=dim)
    return change.square().mean()
