"""The SimpleGVR trainer on accelerate: the upsampler and the transformer trained jointly end to end.

One optimizer step, per (micro-)batch (SimpleGVR sections 4.1 and 4.3):

    up = upsampler(lr, size of hr)                        # trained jointly with the DiT (upsampler_training)
    c  = (1 - s) * up + s * eps_c,   s ~ U[noise_aug_min, noise_aug_max], own noise eps_c
    z  = (1 - t) * hr + t * eps,     t ~ timestep sampler (uniform / logit-normal / detail-aware)
    e    = transformer(z, c, 1000 t, s, text) - (eps - hr)
    loss = ||e||^2 + temporal_loss_weight * ||e_f - e_{f-1}||^2    (f: latent frames)
           (weighted per sample to the residual output's scale for a model with `condition_residual_std`)
    text -> null embedding with probability text_dropout (always when the clip has no prompt)

Every random draw of a step comes from a generator seeded by (seed, rank, step, micro-batch), and the data
order and crops are a pure function of (seed, epoch): together with accelerate's `save_state` of the models,
optimizer, LR schedule, EMA and position, a resumed run replays exactly the steps of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from cascade_vsr.core.flow import (
    add_noise,
    condition_prior_std,
    noise_augment,
    preconditioned_loss_weight,
    sigma_to_timestep,
    velocity_target,
)
from cascade_vsr.models.transformer import CascadeVSRTransformer3DModel
from cascade_vsr.models.upsampler import LatentUpsampler3D
from cascade_vsr.training.config import DataConfig, ModelConfig, TrainConfig, validate
from cascade_vsr.training.data import PairLatentDataset, collate_pairs
from cascade_vsr.training.samplers import BucketBatchSampler, make_timestep_sampler

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"


class CascadeVSRTrainModule(nn.Module):
    """The upsampler and the transformer as one module whose forward returns the loss, so that DDP / FSDP wrap
    (and synchronize) both, and mixed-precision autocast covers the whole forward."""

    def __init__(
        self,
        upsampler: LatentUpsampler3D,
        transformer: CascadeVSRTransformer3DModel,
        temporal_loss_weight: float = 0.0,
    ):
        super().__init__()
        self.upsampler, self.transformer = upsampler, transformer
        self.temporal_loss_weight = temporal_loss_weight

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
        batch_size = hr_latents.shape[0]
        upsampled = self.upsampler(lr_latents, size=tuple(hr_latents.shape[-2:])).sample
        condition = noise_augment(upsampled, aug_level, noise=aug_noise.to(upsampled.dtype))
        noisy = add_noise(hr_latents, noise, sigma)

        # The null embedding is always in the graph (selected per sample with `where`), so DDP sees the same
        # parameters used on every rank and step.
        if prompt_embeds is None:
            text, mask = self.transformer.null_text_embeds(batch_size), None
        else:
            null = self.transformer.null_text_embeds(batch_size, prompt_embeds.shape[1]).to(prompt_embeds.dtype)
            text = torch.where(drop_text[:, None, None], null, prompt_embeds)
            mask = torch.where(drop_text[:, None], torch.ones_like(prompt_attention_mask), prompt_attention_mask)

        velocity = self.transformer(
            noisy,
            condition,
            timestep=sigma_to_timestep(sigma).to(noisy.device),
            noise_aug_level=aug_level,
            encoder_hidden_states=text,
            encoder_attention_mask=mask,
        ).sample
        error = velocity.float() - velocity_target(hr_latents, noise).float()
        squared_error = clip_squared_error(error, self.temporal_loss_weight)
        residual_std = self.transformer.config.condition_residual_std
        if residual_std is None:
            return squared_error.mean()
        # A preconditioned model: the MSE of its residual output (unit-variance target at every sigma).
        prior_std = condition_prior_std(aug_level, residual_std, condition)
        return (squared_error * preconditioned_loss_weight(sigma, prior_std)).mean()


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
    """Step and data position, checkpointed with `accelerator.register_for_checkpointing`."""

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
    upsampler = LatentUpsampler3D.from_pretrained(path, subfolder="upsampler")
    transformer = CascadeVSRTransformer3DModel.from_pretrained(
        path, subfolder="transformer", **model_config.attention_config()
    )
    return upsampler, transformer


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


def find_checkpoint(output_dir: str | Path, resume_from: str) -> Path:
    """Resolve `resume_from_checkpoint` ('latest' or a folder)."""
    if resume_from != "latest":
        path = Path(resume_from)
        if not path.is_dir():
            raise ValueError(f"`resume_from_checkpoint` {resume_from!r} is not a checkpoint folder")
        return path
    folders = sorted(
        (p for p in (Path(output_dir) / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()),
        key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]),
    )
    if not folders:
        raise ValueError(f"`resume_from_checkpoint` is 'latest' but {output_dir}/checkpoints holds no checkpoint")
    return folders[-1]


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


def _step_generator(seed: int, rank: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(((seed * 1_000_003 + rank) * 1_000_003 + step) * 1009 + micro)
    return generator


def train(model_config: ModelConfig, data_config: DataConfig, train_config: TrainConfig) -> dict:
    """Run (or resume) a training run; returns a summary. Call under `accelerate launch` for several processes."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    validate(model_config, data_config, train_config)
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
    timestep_sampler = make_timestep_sampler(
        train_config.timestep_sampler, train_config.logit_mean, train_config.logit_std, train_config.timestep_curve
    )

    # Models, optimizer, schedule, EMA.
    upsampler, transformer = build_models(model_config)
    if upsampler.config.latent_channels != transformer.config.latent_channels:
        raise ValueError(
            f"upsampler latent_channels {upsampler.config.latent_channels} != transformer latent_channels "
            f"{transformer.config.latent_channels}"
        )
    if train_config.upsampler_training == "resize":
        upsampler.reset_residual()
    if train_config.upsampler_training != "joint":
        upsampler.requires_grad_(False)
    if train_config.gradient_checkpointing:
        upsampler.enable_gradient_checkpointing()
        transformer.enable_gradient_checkpointing()
    module = CascadeVSRTrainModule(upsampler, transformer, train_config.temporal_loss_weight)
    module.train()
    optimizer = torch.optim.AdamW(
        [p for p in module.parameters() if p.requires_grad],
        lr=train_config.learning_rate,
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
    module, optimizer = accelerator.prepare(module, optimizer)
    unwrapped = accelerator.unwrap_model(module)
    ema = EMAModel(unwrapped.parameters(), decay=train_config.ema_decay) if train_config.use_ema else None
    state = TrainState()
    accelerator.register_for_checkpointing(lr_scheduler, state, *([ema] if ema is not None else []))

    if train_config.resume_from_checkpoint:
        checkpoint = find_checkpoint(output_dir, train_config.resume_from_checkpoint)
        accelerator.load_state(str(checkpoint))
        logger.info("resumed from %s at step %d", checkpoint, state.step)

    log_path = output_dir / "log.jsonl"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
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

    device = accelerator.device
    accumulation = train_config.gradient_accumulation_steps
    batches = micro_batches()
    progress = tqdm(
        total=train_config.max_train_steps,
        initial=state.step,
        desc="train",
        disable=not accelerator.is_local_main_process,
    )
    losses = []
    start_time = time.perf_counter()
    start_step = state.step
    while state.step < train_config.max_train_steps:
        step_loss = torch.zeros((), device=device)
        for micro in range(accumulation):
            batch = next(batches)
            generator = _step_generator(train_config.seed, accelerator.process_index, state.step, micro, device)
            hr = batch["hr_latents"].to(device)
            lr = batch["lr_latents"].to(device)
            batch_size = hr.shape[0]
            sigma = timestep_sampler.sample(batch_size, generator=generator, device=device)
            low, high = train_config.noise_aug_min, train_config.noise_aug_max
            aug_level = low + (high - low) * torch.rand(batch_size, generator=generator, device=device)
            noise = torch.randn(hr.shape, generator=generator, device=device)
            aug_noise = torch.randn(hr.shape, generator=generator, device=device)
            drop = torch.rand(batch_size, generator=generator, device=device) < train_config.text_dropout
            prompt_embeds = batch.get("prompt_embeds")
            mask = batch.get("prompt_attention_mask")
            if prompt_embeds is not None:
                prompt_embeds, mask = prompt_embeds.to(device), mask.to(device)
                drop = drop | ~batch["has_text"].to(device)
            sync = micro == accumulation - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(module):
                loss = module(hr, lr, noise, sigma, aug_noise, aug_level, drop, prompt_embeds, mask)
                accelerator.backward(loss / accumulation)
            step_loss += loss.detach() / accumulation

        grad_norm = accelerator.clip_grad_norm_(module.parameters(), train_config.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(unwrapped.parameters())
        state.step += 1
        progress.update(1)

        mean_loss = accelerator.reduce(step_loss, reduction="mean").item()
        losses.append(mean_loss)
        if state.step % train_config.logging_steps == 0 or state.step == train_config.max_train_steps:
            record = {
                "step": state.step,
                "loss": mean_loss,
                "lr": lr_scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "epoch": state.epoch,
            }
            progress.set_postfix(loss=f"{mean_loss:.4f}")
            if accelerator.is_main_process:
                with log_path.open("a") as log:
                    log.write(json.dumps(record) + "\n")
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state.step)

        if state.step % train_config.checkpointing_steps == 0 or state.step == train_config.max_train_steps:
            save_checkpoint(accelerator, output_dir, state.step, train_config.checkpoints_total_limit)

    elapsed = time.perf_counter() - start_time
    progress.close()
    accelerator.wait_for_everyone()
    export_dir = output_dir / "export"
    if accelerator.is_main_process:
        params = list(unwrapped.parameters())
        if ema is not None and train_config.export_ema:
            ema.store(params)
            ema.copy_to(params)
        export_pipeline(export_dir, unwrapped.upsampler, unwrapped.transformer, train_config.sampling())
        if ema is not None and train_config.export_ema:
            ema.restore(params)
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


def save_checkpoint(accelerator, output_dir: Path, step: int, total_limit: int | None) -> Path:
    """`accelerator.save_state` into checkpoints/checkpoint-<step>, pruning the oldest beyond the limit."""
    folder = output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process and total_limit is not None:
        existing = sorted(
            (p for p in folder.parent.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()),
            key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]),
        )
        for old in existing[: max(len(existing) - total_limit, 0)]:
            shutil.rmtree(old)
    return folder
