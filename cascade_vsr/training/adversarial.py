"""The losses of adversarial post-training (SeedVR2, section 3.3), as pure functions of discriminator outputs.

Logits are (B, K): one per sample and discriminator head. Real and generated samples are paired by batch index
(the same LR clip), which is what the relativistic pairing of RpGAN compares.

    RpGAN, discriminator:  E[ softplus(D(x_fake) - D(x_real)) ]
    RpGAN, generator:      E[ softplus(D(x_real) - D(x_fake)) ]
    approximated R1 / R2:  E[ ||D(x) - D(x + sigma * eps)||^2 ]   on real (R1) / generated (R2) samples
    feature matching:      1/n sum_i mean |F_i(x_fake) - F_i(x_real)|

The approximated R1 and R2 penalise how much the discriminator's output moves under a small Gaussian perturbation
of its input: a finite-difference stand-in for the gradient penalty that needs no second-order gradients.

The temporal losses on decoded frames (`temporal_difference_loss`, InfVSR's; `flow_temporal_loss`, the relative
warping error) serve the adversarial generator and one-step distillation alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from cascade_vsr.core.metrics import consistency_mask, warp_residual
from cascade_vsr.core.optical_flow import bidirectional_flow


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


def flow_temporal_loss(prediction: torch.Tensor, target: torch.Tensor, flow_preset: str = "medium") -> torch.Tensor:
    """The relative warping error (`core.metrics.relative_warping_error`) as a loss, on (B, 3, T, H, W) decoded
    frames in about [-1, 1]: the mean absolute change of the error video `prediction - target` from frame t-1 to
    frame t along the target's optical flow, over the pixels that are not occluded.

    Unlike `temporal_difference_loss`, which compares changes at the same pixel, it follows the motion: an error
    that moves with the content costs nothing, one that stays put while the content moves (a fixed pattern) or
    that changes from frame to frame (flicker) does. The flow (DIS on the target, as the metric takes it from the
    ground truth) carries no gradient. Zero for a single frame."""
    if prediction.shape != target.shape or prediction.ndim != 5:
        raise ValueError(
            f"prediction and target must be (B, 3, T, H, W) of one shape, got {tuple(prediction.shape)} and "
            f"{tuple(target.shape)}"
        )
    if prediction.shape[2] < 2:
        return prediction.new_zeros((), dtype=torch.float32)
    frames = ((target.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    frames = rearrange(frames, "b c t h w -> b t h w c").cpu().numpy()
    errors = rearrange(prediction.float() - target.float(), "b c t h w -> b t h w c")
    total, count = errors.new_zeros(()), 0
    for clip, error in zip(frames, errors):  # DIS estimates one clip's flow at a time
        backward, forward = bidirectional_flow(clip, preset=flow_preset)
        mask = consistency_mask(backward, forward).to(error.device)
        residual, valid = warp_residual(error, backward, mask, name="prediction")
        total, count = total + residual[valid].sum(), count + int(valid.sum())
    return total / max(count, 1)
