"""The SimpleGVR trainer on accelerate: the upsampler and the transformer trained jointly end to end.

One optimizer step, per (micro-)batch (SimpleGVR sections 4.1 and 4.3):

    up = upsampler(lr, size of hr)                        # trained jointly with the DiT (upsampler_training)
    c  = (1 - s) * up + s * eps_c,   s ~ U[noise_aug_min, noise_aug_max], own noise eps_c
    z  = (1 - t) * hr + t * eps,     t ~ timestep sampler (uniform / logit-normal / detail-aware)
    e    = transformer(z, c, 1000 t, s, text) - (eps - hr)
    loss = ||e||^2 + temporal_loss_weight * ||e_f - e_{f-1}||^2    (f: latent frames)
           (weighted per sample to the residual output's scale for a model with `condition_residual_std`)
    text -> null embedding with probability text_dropout (always when the clip has no prompt)

That is `objective: diffusion`. The one-step objectives (`training.objectives`) reuse everything else: `distill`
trains a student to land in one Euler step where its frozen teacher lands in two, and `adversarial` alternates a
discriminator step and a one-step generator step, each network with its own optimizer and LR schedule.

Every random draw of a step comes from a generator seeded by (seed, rank, step, micro-batch), and the data
order and crops are a pure function of (seed, epoch): together with the checkpoint of the models, optimizer, LR
schedule, EMA, RNG and position (`training.checkpoint`: safetensors and JSON, never pickle), a resumed run replays
exactly the steps of an uninterrupted one.

A non-finite loss or gradient stops the run at that step, before the optimizer applies it, naming the step and the
clips of the batch: nothing non-finite is checkpointed or exported.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cascade_vsr.core.flow import (
    add_noise,
    condition_prior_std,
    noise_augment,
    preconditioned_loss_weight,
    predict_clean,
    sigma_to_timestep,
    velocity_target,
)
from cascade_vsr.core.validation import check_pretrained_source
from cascade_vsr.models.discriminator import CascadeVSRDiscriminator
from cascade_vsr.models.transformer import CascadeVSRTransformer3DModel
from cascade_vsr.models.upsampler import LatentUpsampler3D
from cascade_vsr.training import checkpoint as ckpt
from cascade_vsr.training.adversarial import flow_temporal_loss
from cascade_vsr.training.config import DataConfig, ModelConfig, TrainConfig, validate
from cascade_vsr.training.data import PairLatentDataset, collate_pairs
from cascade_vsr.training.objectives import (
    StepInputs,
    decoded_crops,
    discriminator_step_loss,
    distillation_target,
    draw_inputs,
    generator_step_loss,
)
from cascade_vsr.training.samplers import BucketBatchSampler, make_timestep_sampler

logger = logging.getLogger(__name__)


class NonFiniteTrainingError(ValueError):
    """The loss or the gradient of a step is NaN or infinite (bad data, or a diverging run)."""


class CascadeVSRTrainModule(nn.Module):
    """The upsampler and the transformer as one module whose forward returns the loss, so that DDP / FSDP wrap
    (and synchronize) both, and mixed-precision autocast covers the whole forward.

    The subclasses keep the same two submodules (and so the same state dict) and change only what forward
    computes: the distillation loss, or the one-step prediction of adversarial post-training."""

    def __init__(
        self,
        upsampler: LatentUpsampler3D,
        transformer: CascadeVSRTransformer3DModel,
        temporal_loss_weight: float = 0.0,
    ):
        super().__init__()
        self.upsampler, self.transformer = upsampler, transformer
        self.temporal_loss_weight = temporal_loss_weight

    def condition(
        self, lr_latents: torch.Tensor, size: tuple[int, int], aug_noise: torch.Tensor, aug_level: torch.Tensor
    ) -> torch.Tensor:
        """The noise-augmented upsampled LR latents c."""
        upsampled = self.upsampler(lr_latents, size=size).sample
        return noise_augment(upsampled, aug_level, noise=aug_noise.to(upsampled.dtype))

    def text(
        self,
        batch_size: int,
        drop_text: torch.Tensor,
        prompt_embeds: torch.Tensor | None,
        prompt_attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text conditioning, the learned null embedding where `drop_text`.

        The null embedding is always in the graph (selected per sample with `where`), so DDP sees the same
        parameters used on every rank and step."""
        if prompt_embeds is None:
            return self.transformer.null_text_embeds(batch_size), None
        null = self.transformer.null_text_embeds(batch_size, prompt_embeds.shape[1]).to(prompt_embeds.dtype)
        text = torch.where(drop_text[:, None, None], null, prompt_embeds)
        mask = torch.where(drop_text[:, None], torch.ones_like(prompt_attention_mask), prompt_attention_mask)
        return text, mask

    def velocity(
        self,
        noisy: torch.Tensor,
        condition: torch.Tensor,
        sigma: torch.Tensor,
        aug_level: torch.Tensor,
        text: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        return self.transformer(
            noisy,
            condition,
            timestep=sigma_to_timestep(sigma).to(noisy.device),
            noise_aug_level=aug_level,
            encoder_hidden_states=text,
            encoder_attention_mask=mask,
        ).sample

    def forward(
        self,
        hr_latents: torch.Tensor,
        lr_latents: torch.Tensor,
        noise: torch.Tensor,
        sigma: torch.Tensor,
        aug_noise: torch.Tensor,
        aug_level: torch.Tensor,
        drop_text: torch.Tensor,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        condition = self.condition(lr_latents, tuple(hr_latents.shape[-2:]), aug_noise, aug_level)
        noisy = add_noise(hr_latents, noise, sigma)
        text, mask = self.text(hr_latents.shape[0], drop_text, prompt_embeds, prompt_attention_mask)
        velocity = self.velocity(noisy, condition, sigma, aug_level, text, mask)
        error = velocity.float() - velocity_target(hr_latents, noise).float()
        squared_error = clip_squared_error(error, self.temporal_loss_weight)
        residual_std = self.transformer.config.condition_residual_std
        if residual_std is None:
            return squared_error.mean()
        # A preconditioned model: the MSE of its residual output (unit-variance target at every sigma).
        prior_std = condition_prior_std(aug_level, residual_std, condition)
        return (squared_error * preconditioned_loss_weight(sigma, prior_std)).mean()


class DistillationTrainModule(CascadeVSRTrainModule):
    """Progressive distillation (Salimans & Ho 2022; SeedVR2 3.3): from z at sigma_from, one student Euler step to
    sigma_to must land where two teacher steps land; the loss is the MSE in latent space, plus
    `temporal_loss_weight` times the squared change of the error between latent frames (`clip_squared_error`)."""

    def forward(
        self,
        noisy: torch.Tensor,
        lr_latents: torch.Tensor,
        sigma_from: torch.Tensor,
        sigma_to: torch.Tensor,
        teacher_latents: torch.Tensor,
        aug_noise: torch.Tensor,
        aug_level: torch.Tensor,
        drop_text: torch.Tensor,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        return_prediction: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The loss; with `return_prediction`, also the student's latents at `sigma_to` (for losses on them)."""
        condition = self.condition(lr_latents, tuple(noisy.shape[-2:]), aug_noise, aug_level)
        text, mask = self.text(noisy.shape[0], drop_text, prompt_embeds, prompt_attention_mask)
        velocity = self.velocity(noisy, condition, sigma_from, aug_level, text, mask)
        step = (sigma_to - sigma_from).reshape(-1, 1, 1, 1, 1)
        student_latents = noisy.float() + step * velocity.float()
        loss = clip_squared_error(student_latents - teacher_latents.float(), self.temporal_loss_weight).mean()
        return (loss, student_latents) if return_prediction else loss


class OneStepGenerator(CascadeVSRTrainModule):
    """The one-step generator of adversarial post-training: pure noise at sigma 1 -> the predicted clean latents
    (one Euler step to 0), and the condition it used (for the discriminator)."""

    def forward(
        self,
        noise: torch.Tensor,
        lr_latents: torch.Tensor,
        aug_noise: torch.Tensor,
        aug_level: torch.Tensor,
        drop_text: torch.Tensor,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        condition = self.condition(lr_latents, tuple(noise.shape[-2:]), aug_noise, aug_level)
        text, mask = self.text(noise.shape[0], drop_text, prompt_embeds, prompt_attention_mask)
        sigma = torch.ones(noise.shape[0], device=noise.device)
        velocity = self.velocity(noise, condition, sigma, aug_level, text, mask)
        return predict_clean(noise.float(), velocity.float(), 1.0), condition


def clip_squared_error(error: torch.Tensor, temporal_loss_weight: float = 0.0) -> torch.Tensor:
    """Squared error of a (B, C, F, H, W) velocity error, plus `temporal_loss_weight` times the squared change of
    the error from each latent frame to the next (zero at the first frame), elementwise.

    The clean-latent error of a prediction is the velocity error times sigma, so the second term makes error that
    changes from frame to frame (in static regions: flicker) cost more than error that stays the same.
    Both terms are one positive definite quadratic form of the clip's error, so the minimiser is still the
    posterior mean of the velocity: the term only changes which mistakes an imperfect model prefers to make.
    """
    squared_error = error.square()
    if temporal_loss_weight and error.shape[2] > 1:
        change = torch.diff(error, dim=2, prepend=error[:, :, :1]).square()
        squared_error = squared_error + temporal_loss_weight * change
    return squared_error


class TrainState:
    """Step and data position."""

    def __init__(self):
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]


def build_models(model_config: ModelConfig) -> tuple[LatentUpsampler3D, CascadeVSRTransformer3DModel]:
    """Fresh models from the config, or a previous stage's export with this stage's attention configuration."""
    path = model_config.pretrained_model_name_or_path
    if path is None:
        return (
            LatentUpsampler3D(**model_config.upsampler_kwargs()),
            CascadeVSRTransformer3DModel(**model_config.transformer_kwargs()),
        )
    if model_config.visual_guidance_frames is not None:
        raise ValueError(
            "`visual_guidance_frames` adds weights: it trains a fresh model, not one loaded from "
            "`pretrained_model_name_or_path`"
        )
    upsampler = LatentUpsampler3D.from_pretrained(path, subfolder="upsampler")
    transformer = CascadeVSRTransformer3DModel.from_pretrained(
        path, subfolder="transformer", **model_config.attention_config()
    )
    return upsampler, transformer


def load_teacher_transformer(model_config: ModelConfig) -> CascadeVSRTransformer3DModel:
    """The distillation teacher's transformer: the pretrained stage with this stage's attention overrides but its
    own saved causality (`causal_*` fields) and FFN activation: the function it was trained as."""
    overrides = {
        name: value
        for name, value in model_config.attention_config().items()
        if not name.startswith("causal_") and name != "ffn_activation"
    }
    return CascadeVSRTransformer3DModel.from_pretrained(
        model_config.pretrained_model_name_or_path, subfolder="transformer", **overrides
    )


def _trackers(report_to: str) -> list[str]:
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    if report_to == "none":
        return []
    if report_to == "auto":
        return ["tensorboard"] if is_tensorboard_available() else []
    available = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
    if report_to not in available:
        raise ValueError(f"`report_to` must be 'auto', 'none', 'tensorboard' or 'wandb', got {report_to!r}")
    if not available[report_to]:
        raise ValueError(f"`report_to` is {report_to!r} but that package is not installed")
    return [report_to]


def export_pipeline(
    path: str | Path,
    upsampler: LatentUpsampler3D,
    transformer: CascadeVSRTransformer3DModel,
    sampling: dict | None = None,
) -> Path:
    """Write a diffusers-format stage folder (upsampler/, transformer/, scheduler/, model_index.json with the
    recommended `sampling` settings) that `CascadeVSRPipeline.from_pretrained` loads alone; weights as safetensors.

    A pixel-space model (latent space `space_to_depth`) also gets its lossless autoencoder as vae/; a model of a
    learned latent space decodes with the upstream's VAE, shared through `from_pipe` or passed to from_pretrained.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    from cascade_vsr.models.space_to_depth import SpaceToDepthAutoencoder
    from cascade_vsr.pipelines.pipeline_cascade_vsr import CascadeVSRPipeline

    for model in (upsampler, transformer):
        bad = non_finite_parameters(model)
        if bad:
            raise NonFiniteTrainingError(
                f"refusing to export {type(model).__name__} with non-finite weights: {', '.join(bad[:5])}"
                + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            )

    # the `space_to_depth` latent space is RGB pixel-unshuffled by 4 (pipelines.adapters.SpaceToDepthAdapter)
    vae = SpaceToDepthAutoencoder() if transformer.config.latent_space == "space_to_depth" else None
    pipeline = CascadeVSRPipeline(
        upsampler=upsampler,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=vae,
        sampling=sampling,
    )
    pipeline.save_pretrained(path)
    return Path(path)


def non_finite_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers of `model` that hold a NaN or an infinity."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, tensor in tensors if tensor.is_floating_point() and not torch.isfinite(tensor).all()]


def _step_generator(seed: int, rank: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(((seed * 1_000_003 + rank) * 1_000_003 + step) * 1009 + micro)
    return generator


@dataclass
class TrainedNetwork:
    """A network the run updates, with its own optimizer and LR schedule (the stage; the discriminator)."""

    name: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any


def _optimizer_and_schedule(parameters: list, learning_rate: float, train_config: TrainConfig):
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(
        parameters,
        lr=learning_rate,
        betas=(train_config.adam_beta1, train_config.adam_beta2),
        weight_decay=train_config.adam_weight_decay,
        eps=train_config.adam_epsilon,
    )
    # Not prepared: accelerate would step a prepared schedule once per process; ours counts optimizer steps.
    lr_scheduler = get_scheduler(
        train_config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=train_config.lr_warmup_steps,
        num_training_steps=train_config.max_train_steps,
    )
    return optimizer, lr_scheduler


def add_lora_adapter(
    upsampler: LatentUpsampler3D, transformer: CascadeVSRTransformer3DModel, train_config: TrainConfig
) -> None:
    """Freeze the stage and give its transformer a trainable LoRA adapter (peft, through diffusers'
    PeftAdapterMixin) on `lora_target_modules`."""
    from peft import LoraConfig

    upsampler.requires_grad_(False)
    transformer.requires_grad_(False)
    rank = train_config.lora_rank
    transformer.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=train_config.lora_alpha or rank,
            target_modules=list(train_config.lora_target_modules),
            init_lora_weights=True,
        )
    )


def export_lora(path: str | Path, transformer: CascadeVSRTransformer3DModel) -> Path:
    """Write the transformer's LoRA adapter in diffusers' format (pytorch_lora_weights.safetensors with its
    LoraConfig as metadata), loadable with `CascadeVSRPipeline.load_lora_weights` onto the base stage."""
    from peft.utils import get_peft_model_state_dict

    from cascade_vsr.pipelines.pipeline_cascade_vsr import CascadeVSRPipeline

    bad = non_finite_parameters(transformer)
    if bad:
        raise NonFiniteTrainingError(
            f"refusing to export a LoRA adapter with non-finite weights: {', '.join(bad[:5])}"
        )
    CascadeVSRPipeline.save_lora_weights(
        path,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
    )
    return Path(path)


def teacher_sigmas(model_path: str, num_steps: int) -> torch.Tensor:
    """The N + 1 sigmas (ending at 0) of the teacher's N-step schedule, from its own scheduler config: the sigmas
    of the pipeline's default schedule, so that the student's N/2-step schedule is every second one of them."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from cascade_vsr.pipelines.sampling import set_schedule

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model_path, subfolder="scheduler")
    if scheduler.config.use_dynamic_shifting:
        raise ValueError("distillation needs a scheduler with a static shift (the teacher's has dynamic shifting)")
    set_schedule(scheduler, None, num_steps, seq_len=0, device="cpu")
    return scheduler.sigmas.float()


def pixel_decoder(model_path: str, device: torch.device):
    """Decode model-space latents to pixels with the stage folder's own VAE (for the pixel losses), frozen."""
    from cascade_vsr.pipelines.adapters import get_adapter
    from cascade_vsr.pipelines.pipeline_cascade_vsr import CascadeVSRPipeline

    vae = CascadeVSRPipeline.from_pretrained(model_path).vae
    if vae is None:
        raise ValueError(
            "`pixel_loss_weight` / `temporal_smoothness_weight` / `flow_temporal_weight` decode through a VAE, but "
            f"{model_path!r} has no vae/"
        )
    vae = vae.to(device).requires_grad_(False).eval()
    adapter = get_adapter(vae)
    return lambda latents: adapter.decode(vae, latents)


def train(model_config: ModelConfig, data_config: DataConfig, train_config: TrainConfig) -> dict:
    """Run (or resume) a training run; returns a summary. Call under `accelerate launch` for several processes."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    validate(model_config, data_config, train_config)
    if model_config.pretrained_model_name_or_path is not None:
        for subfolder in ("upsampler", "transformer"):
            check_pretrained_source(
                model_config.pretrained_model_name_or_path, "pretrained_model_name_or_path", subfolder
            )
    objective = train_config.objective
    output_dir = Path(train_config.output_dir)
    accelerator = Accelerator(
        mixed_precision=train_config.mixed_precision,
        log_with=_trackers(train_config.report_to) or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    set_seed(train_config.seed)
    if accelerator.device.type == "cpu":
        # AdaLN-zero gates and the zero-initialised output layers make the early gradients tiny: in fp32 they
        # fall into the denormal range, where x86 arithmetic is an order of magnitude slower. Flushing them to
        # zero keeps CPU steps fast; values that small do not change the updates.
        torch.set_flush_denormal(True)

    # Data (same-shape batches, sharded over processes by the sampler itself, so the loader is not prepared).
    dataset = PairLatentDataset(
        data_config.data_dir,
        crop_size=data_config.crop_size,
        num_frames=data_config.num_latent_frames,
        latent_channels=model_config.latent_channels,
        latent_space=model_config.latent_space,
    )
    batch_sampler = BucketBatchSampler(
        dataset.buckets(),
        train_config.train_batch_size,
        drop_last=data_config.drop_last,
        seed=train_config.seed,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
    )
    sigma_sampler = None
    if objective == "diffusion":
        sigma_sampler = make_timestep_sampler(
            train_config.timestep_sampler, train_config.logit_mean, train_config.logit_std, train_config.timestep_curve
        )

    # Models, optimizers, schedules, EMA.
    upsampler, transformer = build_models(model_config)
    if upsampler.config.latent_channels != transformer.config.latent_channels:
        raise ValueError(
            f"upsampler latent_channels {upsampler.config.latent_channels} != transformer latent_channels "
            f"{transformer.config.latent_channels}"
        )
    device = accelerator.device
    teacher = sigmas = discriminator = decode = None
    if objective == "distill":
        # the teacher is the loaded stage with this stage's attention, frozen, except that it keeps its own
        # temporal causality: a block-causal student learns from a bidirectional teacher
        teacher_transformer = copy.deepcopy(transformer)
        if model_config.causal_chunk_frames is not None:
            teacher_transformer = load_teacher_transformer(model_config)
        teacher = CascadeVSRTrainModule(copy.deepcopy(upsampler), teacher_transformer)
        teacher = teacher.requires_grad_(False).eval().to(device)
        sigmas = teacher_sigmas(model_config.pretrained_model_name_or_path, train_config.distill_teacher_steps)
    if train_config.upsampler_training == "resize":
        upsampler.reset_residual()
    if train_config.upsampler_training != "joint":
        upsampler.requires_grad_(False)
    if objective == "adversarial":
        head_layers = train_config.discriminator_head_layers
        discriminator = CascadeVSRDiscriminator.from_transformer(
            transformer, tuple(head_layers) if head_layers is not None else None
        )
    pixel_weights = (train_config.pixel_loss_weight, train_config.temporal_smoothness_weight)
    if (objective == "adversarial" and any(pixel_weights)) or train_config.flow_temporal_weight:
        decode = pixel_decoder(model_config.pretrained_model_name_or_path, device)
    if train_config.lora_rank is not None:
        add_lora_adapter(upsampler, transformer, train_config)
    if train_config.gradient_checkpointing:
        for model in (upsampler, transformer, *([discriminator.trunk] if discriminator is not None else [])):
            model.enable_gradient_checkpointing()
    module_class = {"diffusion": CascadeVSRTrainModule, "distill": DistillationTrainModule}.get(
        objective, OneStepGenerator
    )
    module = module_class(upsampler, transformer, train_config.temporal_loss_weight).train()
    optimizer, lr_scheduler = _optimizer_and_schedule(
        [p for p in module.parameters() if p.requires_grad], train_config.learning_rate, train_config
    )
    module, optimizer = accelerator.prepare(module, optimizer)
    networks = [TrainedNetwork("model", module, optimizer, lr_scheduler)]
    if discriminator is not None:
        d_optimizer, d_lr_scheduler = _optimizer_and_schedule(
            [p for p in discriminator.parameters() if p.requires_grad],
            train_config.discriminator_learning_rate,
            train_config,
        )
        discriminator, d_optimizer = accelerator.prepare(discriminator.train(), d_optimizer)
        networks.append(TrainedNetwork("discriminator", discriminator, d_optimizer, d_lr_scheduler))
    unwrapped = accelerator.unwrap_model(module)
    trained = [p for p in unwrapped.parameters() if p.requires_grad]
    ema = EMAModel(trained, decay=train_config.ema_decay) if train_config.use_ema else None
    state = TrainState()
    checkpointer = Checkpointer(accelerator, networks, ema, state)

    if train_config.resume_from_checkpoint:
        checkpoint = ckpt.find_checkpoint(output_dir, train_config.resume_from_checkpoint)
        checkpointer.load(checkpoint)
        logger.info("resumed from %s at step %d", checkpoint, state.step)

    log_path = output_dir / "log.jsonl"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_temporary(output_dir / "checkpoints")
        truncate_log(log_path, state.step)
        configs = {k: v for c in (model_config, data_config, train_config) for k, v in asdict(c).items()}
        (output_dir / "config.json").write_text(json.dumps(configs, indent=2) + "\n")
        if accelerator.log_with:
            accelerator.init_trackers("cascade-vsr", config={k: str(v) for k, v in configs.items()})

    def micro_batches():
        """Batches from the saved position on, updating the position as they are consumed."""
        while True:
            batch_sampler.set_position(state.epoch, state.batch_in_epoch)
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_sampler=batch_sampler,
                collate_fn=collate_pairs,
                num_workers=data_config.dataloader_num_workers,
            )
            for batch in loader:
                state.batch_in_epoch += 1
                yield batch
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0

    accumulation = train_config.gradient_accumulation_steps
    # distilled and one-step models start from noise drawn as the sampler draws it
    correlation = 0.0 if objective == "diffusion" else train_config.sampling_noise_frame_correlation
    batches = micro_batches()
    progress = tqdm(
        total=train_config.max_train_steps,
        initial=state.step,
        desc="train",
        disable=not accelerator.is_local_main_process,
    )
    d_unwrapped = accelerator.unwrap_model(discriminator) if discriminator is not None else None
    d_trained = [p for p in d_unwrapped.parameters() if p.requires_grad] if d_unwrapped is not None else []

    def stage_loss(inputs: StepInputs, sigma: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """The loss of the stage (the generator of adversarial training) on one micro-batch, and its terms."""
        if objective == "diffusion":
            loss = module(inputs.hr, inputs.lr, inputs.noise, sigma, inputs.aug_noise, inputs.aug_level, *inputs.text)
            return loss, {}
        if objective == "distill":
            noisy, start, end, target = distillation_target(
                teacher, inputs, sigmas, train_config, model_config.latent_space
            )
            args = (noisy, inputs.lr, start, end, target, inputs.aug_noise, inputs.aug_level, *inputs.text)
            if not train_config.flow_temporal_weight:
                return module(*args), {}
            loss, prediction = module(*args, return_prediction=True)
            flow = flow_temporal_loss(*decoded_crops(decode, prediction, inputs, train_config))
            return loss + train_config.flow_temporal_weight * flow, {"flow_temporal": flow.item()}
        return generator_step_loss(module, d_unwrapped, inputs, train_config, decode)

    def critic_loss(inputs: StepInputs, sigma: None) -> tuple[torch.Tensor, dict]:
        return discriminator_step_loss(discriminator, unwrapped, inputs, train_config)

    losses = []
    start_time = time.perf_counter()
    start_step = state.step
    try:
        while state.step < train_config.max_train_steps:
            micro = []
            for index in range(accumulation):
                generator = _step_generator(train_config.seed, accelerator.process_index, state.step, index, device)
                batch = next(batches)
                micro.append(
                    draw_inputs(
                        batch, generator, train_config, device, sigma_sampler, correlation, model_config.latent_space
                    )
                )
            record = {"step": state.step + 1}
            if discriminator is not None:
                d_loss, d_norm, d_parts = update(
                    accelerator, networks[1], micro, critic_loss, state.step, train_config
                )
                record |= {"d_loss": d_loss, "d_grad_norm": d_norm, **d_parts}
                for parameter in d_trained:  # frozen in the generator's step
                    parameter.requires_grad_(False)
            try:
                loss, grad_norm, parts = update(accelerator, networks[0], micro, stage_loss, state.step, train_config)
            finally:
                for parameter in d_trained:
                    parameter.requires_grad_(True)
            if ema is not None:
                ema.step(trained)
            state.step += 1
            progress.update(1)

            losses.append(loss)
            if state.step % train_config.logging_steps == 0 or state.step == train_config.max_train_steps:
                record |= {"loss": loss, "lr": lr_scheduler.get_last_lr()[0], "grad_norm": grad_norm, **parts}
                record["epoch"] = state.epoch
                progress.set_postfix(loss=f"{loss:.4f}")
                if accelerator.is_main_process:
                    with log_path.open("a") as log:
                        log.write(json.dumps(record) + "\n")
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state.step)

            if state.step % train_config.checkpointing_steps == 0 or state.step == train_config.max_train_steps:
                checkpointer.save(output_dir / "checkpoints", train_config.checkpoints_total_limit)

    finally:
        progress.close()  # before any error message, which is then the last thing the run prints
    elapsed = time.perf_counter() - start_time
    accelerator.wait_for_everyone()
    export_dir = output_dir / "export"
    if accelerator.is_main_process:
        if ema is not None and train_config.export_ema:
            ema.store(trained)
            ema.copy_to(trained)
        if train_config.lora_rank is not None:
            export_lora(export_dir, unwrapped.transformer)
        else:
            export_pipeline(export_dir, unwrapped.upsampler, unwrapped.transformer, train_config.sampling())
        if ema is not None and train_config.export_ema:
            ema.restore(trained)
        if discriminator is not None:  # to continue adversarial training from this run
            accelerator.unwrap_model(discriminator).save_pretrained(output_dir / "discriminator")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    steps = state.step - start_step
    return {
        "steps": state.step,
        "losses": losses,
        "steps_per_second": steps / elapsed if elapsed > 0 and steps else math.nan,
        "export_dir": str(export_dir),
        "model": unwrapped,
    }


def update(
    accelerator,
    network: TrainedNetwork,
    micro: list[tuple[StepInputs, torch.Tensor | None]],
    loss_fn: Callable[[StepInputs, torch.Tensor | None], tuple[torch.Tensor, dict]],
    step: int,
    train_config: TrainConfig,
) -> tuple[float, float | None, dict]:
    """One optimizer step of `network` on the losses of the micro-batches (gradients accumulated, synchronised on
    the last); stops with NonFiniteTrainingError before applying a step whose loss or gradient is not finite.

    Returns the mean loss over micro-batches and processes, the gradient norm, and the loss terms of the last
    micro-batch."""
    from accelerate.utils import gather_object

    step_loss = torch.zeros((), device=accelerator.device)
    parts = {}
    for index, (inputs, sigma) in enumerate(micro):
        sync = index == len(micro) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(network.module):
            loss, parts = loss_fn(inputs, sigma)
            accelerator.backward(loss / len(micro))
        step_loss += loss.detach() / len(micro)
    grad_norm = accelerator.clip_grad_norm_(network.module.parameters(), train_config.max_grad_norm)
    grad_norm = None if grad_norm is None else float(grad_norm)
    mean_loss = accelerator.reduce(step_loss, reduction="mean").item()
    # The reduced loss and the norm of the synchronised gradients are the same on every process, so all of them
    # stop together.
    if not (math.isfinite(mean_loss) and (grad_norm is None or math.isfinite(grad_norm))):
        clips = sorted(set(gather_object([clip for inputs, _ in micro for clip in inputs.ids])))
        raise NonFiniteTrainingError(
            f"non-finite training step {step + 1} ({network.name}): loss {mean_loss}, gradient norm {grad_norm}; "
            f"the batch held clips {', '.join(clips)}. Nothing of this step was applied, checkpointed or exported "
            "(check those clips' latents, or lower the learning rate)"
        )
    network.optimizer.step()
    network.lr_scheduler.step()
    network.optimizer.zero_grad(set_to_none=True)
    return mean_loss, grad_norm, parts


def truncate_log(log_path: Path, step: int) -> None:
    """Keep the log lines of steps up to `step` (the resumed one; none for a fresh run): the steps after it are
    trained again and logged again."""
    if not log_path.exists():
        return
    kept = [line for line in log_path.read_text().splitlines(keepends=True) if _logged_step(line) <= step]
    temporary = log_path.with_name(f".{log_path.name}.tmp")
    temporary.write_text("".join(kept))
    os.replace(temporary, log_path)


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf  # a torn last line of a killed run


class Checkpointer:
    """Saves and restores the whole training state in `training.checkpoint`'s pickle-free format: per trained
    network its weights (`<name>.safetensors`, the stage's as model.safetensors), optimizer and LR schedule; the
    EMA of the stage, every process's RNG, the step and the data position."""

    def __init__(self, accelerator, networks: list[TrainedNetwork], ema, state: TrainState):
        self.accelerator, self.networks, self.ema, self.state = accelerator, networks, ema, state

    @property
    def _sharded(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

    def _ema_file(self) -> str:
        return f"ema-rank{self.accelerator.process_index}.safetensors" if self._sharded else "ema.safetensors"

    @staticmethod
    def _files(name: str) -> tuple[str, str]:
        return f"{name}.safetensors", "optimizer.safetensors" if name == "model" else f"{name}_optimizer.safetensors"

    def _model_configs(self) -> dict:
        configs = {}
        for network in self.networks:
            unwrapped = self.accelerator.unwrap_model(network.module)
            if network.name == "model":
                configs["upsampler"] = ckpt.json_config(unwrapped.upsampler.config)
                configs["transformer"] = ckpt.json_config(unwrapped.transformer.config)
            else:
                configs[network.name] = ckpt.json_config(unwrapped.config)
        return configs

    def save(self, folder: Path, total_limit: int | None) -> Path:
        """Write checkpoint-<step> atomically, then prune the oldest beyond `total_limit`."""
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        accelerator = self.accelerator
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        states = {
            network.name: get_state_dict(network.module, network.optimizer.optimizer, options=options)
            for network in self.networks
        }
        manifest = {
            "format": ckpt.FORMAT_VERSION,
            "train_state": self.state.state_dict(),
            "lr_schedulers": {network.name: network.lr_scheduler.state_dict() for network in self.networks},
            "grad_scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "num_processes": accelerator.num_processes,
            "sharded": self._sharded,
            "models": self._model_configs(),
        }

        def write(temporary: Path) -> None:
            ckpt.save_state_file(temporary / f"rng-rank{accelerator.process_index}.safetensors", ckpt.rng_state())
            if self.ema is not None and (self._sharded or accelerator.is_main_process):
                ckpt.save_state_file(temporary / self._ema_file(), self.ema.state_dict())
            if accelerator.is_main_process:
                for name, (model_state, optimizer_state) in states.items():
                    weights, optimizer_file = self._files(name)
                    save_file({k: v.contiguous() for k, v in model_state.items()}, str(temporary / weights))
                    ckpt.save_state_file(temporary / optimizer_file, optimizer_state)
                (temporary / ckpt.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

        final = folder / f"{ckpt.CHECKPOINT_PREFIX}{self.state.step}"
        ckpt.write_atomically(final, write, accelerator.is_main_process, accelerator.wait_for_everyone)
        if accelerator.is_main_process:
            ckpt.prune(folder, total_limit)
        accelerator.wait_for_everyone()
        return final

    def load(self, path: Path) -> None:
        """Restore a checkpoint written by `save` (safetensors and JSON only: nothing in it can run code)."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        accelerator = self.accelerator
        manifest = ckpt.read_manifest(path)
        ckpt.check_same_models(path, manifest["models"], self._model_configs())
        if manifest["sharded"] != self._sharded or (
            self._sharded and manifest["num_processes"] != accelerator.num_processes
        ):
            raise ValueError(
                f"checkpoint {str(path)!r} keeps per-rank EMA shards of {manifest['num_processes']} FSDP processes; "
                f"resume it with the same launch configuration"
            )
        for network in self.networks:
            weights, optimizer_file = self._files(network.name)
            try:
                model_state = load_file(str(path / weights))
            except Exception as error:
                raise ValueError(f"checkpoint file {str(path / weights)!r} is not readable: {error}") from None
            optimizer_state = ckpt.load_state_file(path / optimizer_file)
            set_state_dict(
                network.module,
                network.optimizer.optimizer,
                model_state_dict=model_state,
                optim_state_dict=optimizer_state,
                options=StateDictOptions(full_state_dict=True),
            )
            network.lr_scheduler.load_state_dict(manifest["lr_schedulers"][network.name])
        if accelerator.scaler is not None and manifest["grad_scaler"] is not None:
            accelerator.scaler.load_state_dict(manifest["grad_scaler"])
        if self.ema is not None:
            ema_path = path / self._ema_file()
            if not ema_path.is_file():
                raise ValueError(
                    f"checkpoint {str(path)!r} has no EMA weights ({ema_path.name}); set `use_ema: false`"
                )
            self.ema.load_state_dict(ckpt.load_state_file(ema_path))
            self.ema.to(accelerator.device)
        rng_path = path / f"rng-rank{accelerator.process_index}.safetensors"
        if rng_path.is_file():  # a run resumed on more processes starts the new ranks' RNG fresh
            ckpt.set_rng_state(ckpt.load_state_file(rng_path))
        self.state.load_state_dict(manifest["train_state"])
