"""What one training step computes, per objective: the flow-matching loss (SimpleGVR), progressive distillation
(a student does in one step what its teacher does in two) and adversarial post-training (SeedVR2: a one-step
generator against a discriminator initialised from the same transformer).

Each function takes the inputs of one micro-batch, `StepInputs`, whose random draws all come from the step's own
generator, so that a resumed run draws exactly what an uninterrupted one does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from cascade_vsr.core.flow import add_noise, frame_correlated_noise, sigma_to_timestep
from cascade_vsr.pipelines.self_ensemble import latent_dihedral_transform, swaps_height_width
from cascade_vsr.training.adversarial import (
    approximate_gradient_penalty,
    feature_matching_loss,
    flow_temporal_loss,
    rpgan_discriminator_loss,
    rpgan_generator_loss,
    temporal_difference_loss,
)
from cascade_vsr.training.config import TrainConfig


@dataclass
class StepInputs:
    """One micro-batch and its random draws."""

    ids: list[str]
    hr: torch.Tensor
    lr: torch.Tensor
    noise: torch.Tensor
    aug_noise: torch.Tensor
    aug_level: torch.Tensor
    drop_text: torch.Tensor
    prompt_embeds: torch.Tensor | None
    prompt_attention_mask: torch.Tensor | None
    generator: torch.Generator

    @property
    def text(self) -> tuple:
        return self.drop_text, self.prompt_embeds, self.prompt_attention_mask


def dihedral_indices(batch_size: int, generator: torch.Generator, device: torch.device) -> list[int]:
    """Random flips / transposes of a micro-batch (`dihedral_transform` indices): the flips drawn per sample, the
    transpose once for the micro-batch (its samples keep one shape); each sample's index is uniform over the 8."""
    transpose = int(torch.randint(2, (1,), generator=generator, device=device))
    flips = torch.randint(4, (batch_size,), generator=generator, device=device).tolist()
    return [flip + 4 * transpose for flip in flips]


def dihedral_augment(latents: torch.Tensor, indices: list[int], latent_space: str | None) -> torch.Tensor:
    """Sample b of (B, C, F, h, w) `latents` flipped / transposed by `indices[b]` (`latent_dihedral_transform`)."""
    return torch.cat(
        [latent_dihedral_transform(latents[b : b + 1], index, latent_space) for b, index in enumerate(indices)]
    )


def draw_inputs(
    batch: dict,
    generator: torch.Generator,
    config: TrainConfig,
    device: torch.device,
    sigma_sampler=None,
    noise_correlation: float = 0.0,
    latent_space: str | None = None,
) -> tuple[StepInputs, torch.Tensor | None]:
    """The micro-batch on `device` with its noise draws; also a flow-matching sigma per sample when a
    `sigma_sampler` is given (the diffusion objective). The order of the draws is fixed: the flips / transposes of
    `config.dihedral_augmentation` (only when it is on; `latent_space` is the model's), sigma, condition level,
    noise (correlated between frames by `noise_correlation`, as the sampler draws it), condition noise, text
    dropout."""
    hr = batch["hr_latents"].to(device)
    lr = batch["lr_latents"].to(device)
    batch_size = hr.shape[0]
    if config.dihedral_augmentation:
        indices = dihedral_indices(batch_size, generator, device)
        hr, lr = dihedral_augment(hr, indices, latent_space), dihedral_augment(lr, indices, latent_space)
    sigma = None
    if sigma_sampler is not None:
        sigma = sigma_sampler.sample(batch_size, generator=generator, device=device)
    low, high = config.noise_aug_min, config.noise_aug_max
    aug_level = low + (high - low) * torch.rand(batch_size, generator=generator, device=device)
    if noise_correlation:
        noise = frame_correlated_noise(tuple(hr.shape), noise_correlation, generator=generator, device=device)
    else:
        noise = torch.randn(hr.shape, generator=generator, device=device)
    aug_noise = torch.randn(hr.shape, generator=generator, device=device)
    drop = torch.rand(batch_size, generator=generator, device=device) < config.text_dropout
    prompt_embeds, mask = batch.get("prompt_embeds"), batch.get("prompt_attention_mask")
    if prompt_embeds is not None:
        prompt_embeds, mask = prompt_embeds.to(device), mask.to(device)
        drop = drop | ~batch["has_text"].to(device)
    inputs = StepInputs(batch["ids"], hr, lr, noise, aug_noise, aug_level, drop, prompt_embeds, mask, generator)
    return inputs, sigma


# -- progressive distillation ---------------------------------------------------------------------------------------


def guided_velocity(
    model: nn.Module,
    noisy: torch.Tensor,
    condition: torch.Tensor,
    sigma: torch.Tensor,
    aug_level: torch.Tensor,
    text: tuple[torch.Tensor, torch.Tensor | None],
    guidance_scale: float,
) -> torch.Tensor:
    """The velocity of a `CascadeVSRTrainModule`, with classifier-free guidance against its null prompt when
    `guidance_scale` > 1 (the pipeline's `uncond + g * (cond - uncond)`)."""
    embeds, mask = text
    velocity = model.velocity(noisy, condition, sigma, aug_level, embeds, mask)
    if guidance_scale == 1:
        return velocity
    null = model.transformer.null_text_embeds(noisy.shape[0])
    unconditional = model.velocity(noisy, condition, sigma, aug_level, null, None)
    return unconditional + guidance_scale * (velocity - unconditional)


def _teacher_euler(
    teacher: nn.Module,
    noisy: torch.Tensor,
    lr: torch.Tensor,
    aug_noise: torch.Tensor,
    aug_level: torch.Tensor,
    text: tuple[torch.Tensor, torch.Tensor | None],
    sigmas: tuple[torch.Tensor, ...],
    guidance_scale: float,
) -> torch.Tensor:
    """The teacher's Euler steps from `noisy` through the per-sample `sigmas` (from, ..., to)."""
    condition = teacher.condition(lr, tuple(noisy.shape[-2:]), aug_noise, aug_level)
    latents = noisy.float()
    for sigma_from, sigma_to in zip(sigmas[:-1], sigmas[1:]):
        velocity = guided_velocity(teacher, latents, condition, sigma_from, aug_level, text, guidance_scale)
        latents = latents + (sigma_to - sigma_from).reshape(-1, 1, 1, 1, 1) * velocity.float()
    return latents


def _transformed(tensor: torch.Tensor, indices: list[int], latent_space: str | None) -> torch.Tensor:
    """The `indices` transforms of `tensor`, one after another along the batch."""
    return torch.cat([latent_dihedral_transform(tensor, index, latent_space) for index in indices])


def student_start(
    inputs: StepInputs, sigmas: torch.Tensor, teacher_steps_per_student_step: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """A student step k per sample on the teacher's grid `sigmas` (N + 1 values ending at 0), s =
    `teacher_steps_per_student_step`: z = the HR latents noised to sigmas[s k], and the teacher's path
    (sigmas[s k], ..., sigmas[s k + s])."""
    stride = teacher_steps_per_student_step
    if stride not in (1, 2) or (len(sigmas) - 1) % stride:
        raise ValueError(
            f"`teacher_steps_per_student_step` must be 1 or 2 and divide the grid's {len(sigmas) - 1} steps, "
            f"got {stride}"
        )
    num_student_steps = (len(sigmas) - 1) // stride
    step = torch.randint(num_student_steps, (inputs.hr.shape[0],), generator=inputs.generator, device=inputs.hr.device)
    sigmas = sigmas.to(inputs.hr.device)
    path = tuple(sigmas[stride * step + offset] for offset in range(stride + 1))
    return add_noise(inputs.hr, inputs.noise, path[0]), path


@torch.no_grad()
def teacher_target(
    teacher: nn.Module,
    inputs: StepInputs,
    sigmas: torch.Tensor,
    guidance_scale: float = 1.0,
    self_ensemble: int = 1,
    latent_space: str | None = None,
    teacher_steps_per_student_step: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick a student step k per sample on the teacher's grid `sigmas` (N + 1 values ending at 0): from
    z = noised HR at sigmas[s k], the teacher's s = `teacher_steps_per_student_step` Euler steps to sigmas[s k + s].
    s = 2 is progressive distillation; s = 1 (with a self-ensemble) distils the ensemble at the student's own step
    count.

    With `self_ensemble` N > 1, the teacher's result is the mean over the first N flips / transposes g of its
    inputs (z, the LR latents and the condition noise, all transformed by g in `latent_space`) of g^-1 applied to
    its steps from them: the geometric self-ensemble of the pipeline, from the same noise. Transforms of one
    shape run as one batch.

    Returns (z at sigmas[s k], sigmas[s k], sigmas[s k + s], the teacher's latents at sigmas[s k + s])."""
    batch_size = inputs.hr.shape[0]
    noisy, path = student_start(inputs, sigmas, teacher_steps_per_student_step)
    start, end = path[0], path[-1]
    text = teacher.text(batch_size, *inputs.text)
    if self_ensemble == 1:
        latents = _teacher_euler(
            teacher, noisy, inputs.lr, inputs.aug_noise, inputs.aug_level, text, path, guidance_scale
        )
        return noisy, start, end, latents
    total = torch.zeros(noisy.shape, dtype=torch.float32, device=noisy.device)
    for transposed in (False, True):
        group = [index for index in range(self_ensemble) if swaps_height_width(index) == transposed]
        if not group:
            continue
        runs = len(group)
        embeds, mask = text
        group_text = (embeds.repeat(runs, 1, 1), None if mask is None else mask.repeat(runs, 1))
        group_sigmas = tuple(sigma.repeat(runs) for sigma in path)
        latents = _teacher_euler(
            teacher,
            _transformed(noisy, group, latent_space),
            _transformed(inputs.lr, group, latent_space),
            _transformed(inputs.aug_noise, group, latent_space),
            inputs.aug_level.repeat(runs),
            group_text,
            group_sigmas,
            guidance_scale,
        )
        for index, run in zip(group, latents.chunk(runs)):
            total += latent_dihedral_transform(run, index, latent_space, inverse=True)
    return noisy, start, end, total / self_ensemble


def distillation_target(
    teacher: nn.Module,
    inputs: StepInputs,
    sigmas: torch.Tensor,
    train_config: TrainConfig,
    latent_space: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`teacher_target` with the config's settings, its latents blended towards the ground truth by
    `distill_ground_truth_weight` w: (1 - w) x teacher + w x HR. The loss is a quadratic form of the error, so the
    blended target gives (1 - w) x the distillation loss + w x the ground-truth loss, up to a constant. At w = 1
    the teacher does not run: the student regresses the HR latents from the same start."""
    weight = train_config.distill_ground_truth_weight
    if weight == 1:
        noisy, path = student_start(inputs, sigmas, train_config.distill_student_stride)
        return noisy, path[0], path[-1], inputs.hr.float()
    noisy, start, end, target = teacher_target(
        teacher,
        inputs,
        sigmas,
        train_config.distill_guidance_scale,
        train_config.distill_teacher_self_ensemble,
        latent_space,
        teacher_steps_per_student_step=train_config.distill_student_stride,
    )
    return noisy, start, end, torch.lerp(target.float(), inputs.hr.float(), weight)


# -- adversarial post-training ----------------------------------------------------------------------------------


def _discriminator_input(latents: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    return latents if sigma == 0 else add_noise(latents, noise, sigma)


def discriminator_step_loss(
    discriminator: nn.Module,
    generator: nn.Module,
    inputs: StepInputs,
    config: TrainConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The discriminator's loss: RpGAN on (real, generated) pairs plus the approximated R1 and R2 terms. The
    generator (the unwrapped module) runs without gradients; the four discriminator inputs go through one batched
    forward."""
    batch_size = inputs.hr.shape[0]
    with torch.no_grad():
        fake, condition = generator(inputs.noise, inputs.lr, inputs.aug_noise, inputs.aug_level, *inputs.text)
        embeds, mask = generator.text(batch_size, *inputs.text)
    shape, device, draw = inputs.hr.shape, inputs.hr.device, inputs.generator
    view_noise = torch.randn(shape, generator=draw, device=device)
    perturb_real, perturb_fake = (torch.randn(shape, generator=draw, device=device) for _ in range(2))
    real = _discriminator_input(inputs.hr, view_noise, config.discriminator_sigma)
    fake = _discriminator_input(fake.to(inputs.hr.dtype), view_noise, config.discriminator_sigma)
    sigma = config.gradient_penalty_sigma
    samples = torch.cat([real, fake, real + sigma * perturb_real, fake + sigma * perturb_fake])
    logits = discriminator(
        samples,
        condition.repeat(4, 1, 1, 1, 1),
        timestep=sigma_to_timestep(torch.full((4 * batch_size,), config.discriminator_sigma, device=device)),
        noise_aug_level=inputs.aug_level.repeat(4),
        encoder_hidden_states=None if embeds is None else embeds.repeat(4, 1, 1),
        encoder_attention_mask=None if mask is None else mask.repeat(4, 1),
    ).logits
    real_logits, fake_logits, real_perturbed, fake_perturbed = logits.chunk(4)
    gan = rpgan_discriminator_loss(real_logits, fake_logits)
    r1 = approximate_gradient_penalty(real_logits, real_perturbed)
    r2 = approximate_gradient_penalty(fake_logits, fake_perturbed)
    loss = config.gan_weight * gan + config.r1_weight * r1 + config.r2_weight * r2
    return loss, {"d_gan": gan.item(), "d_r1": r1.item(), "d_r2": r2.item()}


def random_crop_box(
    size: tuple[int, int], crop: tuple[int, int] | None, generator: torch.Generator
) -> tuple[slice, slice]:
    """A random (h, w) crop of a latent of spatial `size` (the whole latent when `crop` is None or larger)."""
    if crop is None:
        return slice(None), slice(None)
    boxes = []
    for length, side in zip(size, crop):
        side = min(side, length)
        start = int(torch.randint(length - side + 1, (1,), generator=generator, device=generator.device))
        boxes.append(slice(start, start + side))
    return boxes[0], boxes[1]


def generator_step_loss(
    generator: nn.Module,
    discriminator: nn.Module,
    inputs: StepInputs,
    config: TrainConfig,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The one-step generator's loss: RpGAN against the frozen discriminator, L1 to the HR latents, feature
    matching on the discriminator's features and, with `decode`, InfVSR's pixel L1 and temporal smoothness on
    random decoded latent crops. `discriminator` must not require gradients (it is the unwrapped module)."""
    batch_size = inputs.hr.shape[0]
    fake, condition = generator(inputs.noise, inputs.lr, inputs.aug_noise, inputs.aug_level, *inputs.text)
    device, draw = inputs.hr.device, inputs.generator
    view_noise = torch.randn(inputs.hr.shape, generator=draw, device=device)
    with torch.no_grad():  # the discriminator judges the clip; the text is given, not generated
        embeds, mask = generator_text(generator, batch_size, inputs)
    judged = dict(
        condition=condition.detach(),
        timestep=sigma_to_timestep(torch.full((batch_size,), config.discriminator_sigma, device=device)),
        noise_aug_level=inputs.aug_level,
        encoder_hidden_states=embeds,
        encoder_attention_mask=mask,
    )
    with torch.no_grad():
        real_out = discriminator(_discriminator_input(inputs.hr, view_noise, config.discriminator_sigma), **judged)
    fake_out = discriminator(_discriminator_input(fake, view_noise, config.discriminator_sigma), **judged)
    gan = rpgan_generator_loss(real_out.logits, fake_out.logits)
    l1 = (fake.float() - inputs.hr.float()).abs().mean()
    matching = feature_matching_loss(fake_out.features, real_out.features)
    loss = config.gan_weight * gan + config.l1_weight * l1 + config.feature_matching_weight * matching
    parts = {"g_gan": gan.item(), "g_l1": l1.item(), "g_feature_matching": matching.item()}
    pixel_weights = (config.pixel_loss_weight, config.temporal_smoothness_weight, config.flow_temporal_weight)
    if decode is not None and any(pixel_weights):
        predicted, target = decoded_crops(decode, fake, inputs, config)
        pixel = (predicted.float() - target.float()).abs().mean()
        smoothness = temporal_difference_loss(predicted, target)
        loss = loss + config.pixel_loss_weight * pixel + config.temporal_smoothness_weight * smoothness
        parts |= {"g_pixel": pixel.item(), "g_temporal": smoothness.item()}
        if config.flow_temporal_weight:
            flow = flow_temporal_loss(predicted, target)
            loss = loss + config.flow_temporal_weight * flow
            parts["g_flow_temporal"] = flow.item()
    return loss, parts


def decoded_crops(
    decode: Callable[[torch.Tensor], torch.Tensor], prediction: torch.Tensor, inputs: StepInputs, config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoded pixels of one random `pixel_crop_size` latent crop of `prediction` and of the HR latents (the
    latter without gradient): InfVSR's patch-wise pixel supervision decodes only a crop."""
    crop = tuple(config.pixel_crop_size) if config.pixel_crop_size is not None else None
    rows, cols = random_crop_box(tuple(prediction.shape[-2:]), crop, inputs.generator)
    predicted = decode(prediction[..., rows, cols])
    with torch.no_grad():
        target = decode(inputs.hr[..., rows, cols])
    return predicted, target


def generator_text(generator: nn.Module, batch_size: int, inputs: StepInputs) -> tuple:
    """The generator's text conditioning (through DDP's wrapper to the module that owns it)."""
    module = generator.module if hasattr(generator, "module") else generator
    return module.text(batch_size, *inputs.text)
