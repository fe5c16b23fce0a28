"""Training configuration: three dataclasses read from one flat JSON or YAML file by transformers'
`HfArgumentParser`, with `--name value` command-line overrides parsed by the same parser."""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from cascade_vsr.training.samplers import TIMESTEP_SAMPLERS


@dataclass
class ModelConfig:
    """The upsampler and transformer to train (defaults: the ~1B configuration of the paper)."""

    pretrained_model_name_or_path: str | None = field(
        default=None, metadata={"help": "An export (upsampler/ and transformer/) of a previous stage to start from."}
    )
    latent_channels: int = 16
    num_layers: int = 28
    num_attention_heads: int = 12
    attention_head_dim: int = 128
    ffn_dim: int = 6144
    text_dim: int = 4096
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    freq_dim: int = 256
    latent_space: str | None = None
    attention_mode: str = field(
        default="full", metadata={"help": "Self-attention mode of every layer (also applied to a pretrained model)."}
    )
    temporal_unit: int | None = field(
        default=None, metadata={"help": "Latent frames per temporal attention unit (SimpleGVR stage 3: 5)."}
    )
    sparse_window: list[int] | None = field(
        default=None, metadata={"help": "sparse_topk: (h, w) tokens per window unit (paper: 12 9)."}
    )
    sparse_topk: int | None = field(default=None, metadata={"help": "sparse_topk: other units each unit attends."})
    window_size: list[int] | None = field(default=None, metadata={"help": "window mode: (t, h, w) window size."})
    causal_chunk_frames: int | None = field(
        default=None,
        metadata={"help": "Block-causal self-attention (streaming, InfVSR): latent frames per chunk (offline form)."},
    )
    causal_cache_chunks: int | None = field(
        default=None, metadata={"help": "Block-causal: previous chunks each chunk sees (default 1)."}
    )
    visual_guidance_frames: int | None = field(
        default=None,
        metadata={"help": "Joint visual guidance from the first latent frames' condition (a fresh model only)."},
    )
    condition_residual_std: float | None = field(
        default=None,
        metadata={
            "help": "Precondition the transformer around the condition with this std of (HR - upsampled LR) "
            "latents (small models; see flow.preconditioned_velocity). Default: the paper's plain velocity."
        },
    )
    ffn_activation: str | None = field(
        default=None,
        metadata={
            "help": "GELU of the feed-forward layers: gelu-approximate (tanh, the default) or gelu (erf, faster on "
            "CPU). Owns no weights, so it also applies to a pretrained model."
        },
    )
    upsampler_hidden_channels: int = 128
    upsampler_num_blocks: int = 2
    upsampler_resize_mode: str | None = field(
        default=None,
        metadata={"help": "Base resize of the upsampler: bilinear or bicubic (default: bicubic for space_to_depth)."},
    )

    def attention_config(self) -> dict:
        """Fields that own no weights (attention, causality, the FFN's GELU), passed as overrides to `from_pretrained`
        so stage n+1 may change them."""
        config = {"attention_mode": self.attention_mode}
        # Only fields that are set: a transformer version without the sparse modes takes none of them.
        for name in (
            "temporal_unit",
            "sparse_topk",
            "sparse_window",
            "window_size",
            "causal_chunk_frames",
            "causal_cache_chunks",
            "ffn_activation",
        ):
            value = getattr(self, name)
            if value is not None:
                config[name] = tuple(value) if isinstance(value, list) else value
        return config

    def transformer_kwargs(self) -> dict:
        return dict(
            latent_channels=self.latent_channels,
            num_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            attention_head_dim=self.attention_head_dim,
            ffn_dim=self.ffn_dim,
            text_dim=self.text_dim,
            patch_size=tuple(self.patch_size),
            freq_dim=self.freq_dim,
            latent_space=self.latent_space,
            condition_residual_std=self.condition_residual_std,
            visual_guidance_frames=self.visual_guidance_frames,
            **self.attention_config(),
        )

    def upsampler_kwargs(self) -> dict:
        """Pixel-space (space_to_depth) latents resize on the pixel grid, bicubically by default: the
        condition then starts as the bicubic upsampling that the stage has to beat."""
        pixel_space = self.latent_space == "space_to_depth"
        factor = 1
        if pixel_space:
            factor = math.isqrt(self.latent_channels // 3)
            if 3 * factor**2 != self.latent_channels:
                raise ValueError(
                    f"`latent_channels` of space_to_depth latents must be 3 * factor**2 (48 for factor 4), "
                    f"got {self.latent_channels}"
                )
        return dict(
            latent_channels=self.latent_channels,
            hidden_channels=self.upsampler_hidden_channels,
            num_blocks=self.upsampler_num_blocks,
            resize_mode=self.upsampler_resize_mode or ("bicubic" if pixel_space else "bilinear"),
            space_to_depth_factor=factor,
        )


@dataclass
class DataConfig:
    data_dir: list[str] | None = field(
        default=None,
        metadata={"help": "One or more pair datasets (cascade-vsr make-pairs); several pool their clips."},
    )
    crop_size: list[int] | None = field(default=None, metadata={"help": "Crop (h w) in LR latent pixels."})
    num_latent_frames: int | None = field(default=None, metadata={"help": "Latent frames per sample."})
    dataloader_num_workers: int = 0
    drop_last: bool = True

    def __post_init__(self):
        if isinstance(self.data_dir, (str, Path)):  # one dataset, as a config file usually names it
            self.data_dir = [str(self.data_dir)]


@dataclass
class TrainConfig:
    output_dir: str = "outputs/cascade-vsr"
    seed: int = 0
    train_batch_size: int = field(default=1, metadata={"help": "Per-process batch size."})
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 20000
    learning_rate: float = 5e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.01
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 500
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None, metadata={"help": "None defers to `accelerate launch` / accelerate config."}
    )
    gradient_checkpointing: bool = False
    use_ema: bool = True
    ema_decay: float = 0.9999
    noise_aug_min: float = 0.3
    noise_aug_max: float = 0.6
    text_dropout: float = 0.1
    timestep_sampler: str = "detail_aware"
    upsampler_training: str = field(
        default="joint",
        metadata={
            "help": "joint: trained with the transformer (the paper); frozen: kept as loaded; resize: its learned "
            "residual zeroed and frozen, so the condition is exactly the base resize (bicubic for space_to_depth)."
        },
    )
    temporal_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the squared frame-to-frame change of the prediction error, next to its squared error "
            "(against flicker; the optimum is unchanged). Default: the paper's plain loss."
        },
    )
    objective: str = field(
        default="diffusion",
        metadata={
            "help": "diffusion: the flow-matching loss (SimpleGVR); distill: a student learns in one step what the "
            "teacher (pretrained_model_name_or_path) does in two (progressive distillation); adversarial: one-step "
            "adversarial post-training of a distilled one-step model against a discriminator (SeedVR2)."
        },
    )
    distill_teacher_steps: int = field(
        default=2,
        metadata={
            "help": "distill: the teacher's Euler steps; the student learns half as many. 1 (with "
            "`distill_teacher_self_ensemble` > 1): the student learns in one run what the teacher's self-ensemble "
            "does in one step."
        },
    )
    distill_guidance_scale: float = field(default=1.0, metadata={"help": "distill: the teacher's CFG scale."})
    distill_ground_truth_weight: float = field(
        default=0.0,
        metadata={
            "help": "distill, one-step student only: the target is (1 - w) x the teacher's latents + w x the ground "
            "truth's, i.e. the loss is (1 - w) x the distillation loss + w x the same loss against the ground truth "
            "(InfVSR's and SeedVR2's pixel supervision, in latent space). 0: pure distillation."
        },
    )
    distill_teacher_self_ensemble: int = field(
        default=1,
        metadata={
            "help": "distill: the target is the mean of the teacher's steps on the first N (1-8) flips / "
            "transposes of its inputs, each transformed back (the self-ensemble's gain, taught to one run; "
            "space_to_depth latents only)."
        },
    )
    dihedral_augmentation: bool = field(
        default=False,
        metadata={
            "help": "Flip / transpose each training pair at random (flips per sample, transposes per micro-batch; "
            "space_to_depth latents only)."
        },
    )
    discriminator_learning_rate: float = field(default=5e-5, metadata={"help": "adversarial: the discriminator's."})
    discriminator_head_layers: list[int] | None = field(
        default=None,
        metadata={"help": "adversarial: 1-based trunk blocks read by the logit heads (default: SeedVR2)."},
    )
    discriminator_sigma: float = field(
        default=0.0, metadata={"help": "adversarial: noise level of the latents the discriminator sees."}
    )
    gan_weight: float = field(default=1.0, metadata={"help": "adversarial: RpGAN weight (both networks)."})
    l1_weight: float = field(default=1.0, metadata={"help": "adversarial: generator L1 to the HR latents."})
    feature_matching_weight: float = field(default=1.0, metadata={"help": "adversarial: discriminator features."})
    r1_weight: float = field(default=1000.0, metadata={"help": "adversarial: approximated R1 (real inputs)."})
    r2_weight: float = field(default=1000.0, metadata={"help": "adversarial: approximated R2 (generated inputs)."})
    gradient_penalty_sigma: float = field(
        default=0.01, metadata={"help": "adversarial: std of the input perturbation of approximated R1 / R2."}
    )
    pixel_loss_weight: float = field(
        default=0.0,
        metadata={"help": "adversarial: L1 in pixels between VAE decodes of random latent crops (InfVSR)."},
    )
    pixel_crop_size: list[int] | None = field(
        default=None, metadata={"help": "adversarial: (h, w) latent crop that is decoded (default: the whole)."}
    )
    temporal_smoothness_weight: float = field(
        default=0.0,
        metadata={"help": "adversarial: squared difference of frame-to-frame changes, on the decoded crops."},
    )
    flow_temporal_weight: float = field(
        default=0.0,
        metadata={
            "help": "distill (one-step students) / adversarial: the relative warping error of the decoded crops "
            "against the HR clip, along its optical flow (flicker and fixed patterns that do not follow the motion)."
        },
    )
    lora_rank: int | None = field(
        default=None,
        metadata={
            "help": "Train a LoRA adapter of this rank on the transformer of `pretrained_model_name_or_path` (all "
            "else frozen); the export is the adapter (load it with `CascadeVSRPipeline.load_lora_weights`)."
        },
    )
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA scaling numerator (default: the rank)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        metadata={"help": "Transformer layers that get adapters (diffusers' attention names)."},
    )
    logit_mean: float = 0.0
    logit_std: float = 1.0
    timestep_curve: str | None = field(
        default=None, metadata={"help": "JSON of calibrate-sampler; the built-in curve when unset."}
    )
    checkpointing_steps: int = 1000
    checkpoints_total_limit: int | None = 3
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "A checkpoint folder or 'latest'."})
    report_to: str = field(
        default="auto", metadata={"help": "'auto' (tensorboard when installed), 'none', 'tensorboard', 'wandb'."}
    )
    logging_steps: int = 1
    export_ema: bool = field(default=True, metadata={"help": "Export EMA weights (else the raw weights)."})
    # The sampler settings the export recommends (its model_index.json `sampling`): a pipeline call without sampler
    # arguments uses them.
    sampling_num_inference_steps: int = field(default=50, metadata={"help": "Recommended Euler steps."})
    sampling_noise_aug_strength: float | None = field(
        default=None, metadata={"help": "Recommended condition noise; None: the middle of [noise_aug_min, max]."}
    )
    sampling_noise_frame_correlation: float = field(
        default=0.0, metadata={"help": "Recommended correlation of the initial noise between frames, in [0, 1]."}
    )
    sampling_guidance_scale: float = field(default=1.0, metadata={"help": "Recommended CFG scale (1: none)."})
    sampling_self_ensemble: int = field(
        default=1, metadata={"help": "Recommended runs on flips / transposes, averaged (1-8; pixel input only)."}
    )

    @property
    def distill_student_stride(self) -> int:
        """Teacher steps per student step: 2 (progressive distillation), or 1 for a one-step teacher's
        self-ensemble."""
        return 1 if self.distill_teacher_steps == 1 else 2

    def sampling(self) -> dict:
        """The export's recommended sampler settings (`CascadeVSRPipeline(sampling=...)`): a distilled student samples
        in half its teacher's steps and an adversarially post-trained model in one, whatever
        `sampling_num_inference_steps` says."""
        strength = self.sampling_noise_aug_strength
        steps = {"distill": self.distill_teacher_steps // self.distill_student_stride, "adversarial": 1}.get(
            self.objective, self.sampling_num_inference_steps
        )
        return {
            "num_inference_steps": steps,
            "noise_aug_strength": (self.noise_aug_min + self.noise_aug_max) / 2 if strength is None else strength,
            "noise_frame_correlation": self.sampling_noise_frame_correlation,
            "guidance_scale": self.sampling_guidance_scale,
            "self_ensemble": self.sampling_self_ensemble,
        }


CONFIG_CLASSES = (ModelConfig, DataConfig, TrainConfig)
OBJECTIVES = ("diffusion", "distill", "adversarial")
# diffusers.optimization's schedules that need no extra arguments
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
UPSAMPLER_TRAINING = ("joint", "frozen", "resize")


def _describe(value: Any) -> str:
    return f"the string {value!r}" if isinstance(value, str) else f"{value!r} ({type(value).__name__})"


def check_field_value(name: str, value: Any, annotation: Any) -> None:
    """Raise ValueError naming `name` unless `value` matches the field's type annotation exactly: a config file's
    `crop_size: 4` or `learning_rate: "1e-3"` must not travel on to fail somewhere else. Floats must be finite."""
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return
        options = [a for a in arguments if a is not type(None)]
        errors = []
        for option in options:
            try:
                return check_field_value(name, value, option)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0] if len(errors) == 1 else f"`{name}`: none of {options} accepts {_describe(value)}")
    if origin is Literal:
        if value not in arguments:
            raise ValueError(f"`{name}` must be one of {list(arguments)}, got {_describe(value)}")
        return
    if origin is list:
        (item,) = arguments
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"`{name}` must be a list of {item.__name__}, got {_describe(value)}")
        for element in value:
            check_field_value(name, element, item)
        return
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"`{name}` must be true or false, got {_describe(value)}")
    elif annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"`{name}` must be an integer, got {_describe(value)}")
    elif annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"`{name}` must be a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise ValueError(f"`{name}` must be finite, got {value}")
    elif annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"`{name}` must be a string, got {_describe(value)}")


def parse_number_strings(value: Any, annotation: Any) -> Any:
    """Numbers written as strings in a config file (YAML reads `1e-3` as a string) become numbers where the field
    holds numbers, as they do on the command line; anything else is returned unchanged for the type check."""
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in arguments if a is not type(None)]
        numeric = [a for a in options if a in (int, float)]
        if numeric and isinstance(value, str):
            return parse_number_strings(value, numeric[0])
        return parse_number_strings(value, options[0]) if len(options) == 1 else value
    if origin is list and isinstance(value, list):
        return [parse_number_strings(item, arguments[0]) for item in value]
    if annotation in (int, float) and isinstance(value, str):
        try:
            return annotation(value)
        except ValueError:
            return value
    return value


def check_field_types(config: Any) -> None:
    """`check_field_value` for every field of one config dataclass."""
    hints = typing.get_type_hints(type(config))
    for item in fields(config):
        check_field_value(item.name, getattr(config, item.name), hints[item.name])


def validate(model: ModelConfig, data: DataConfig, train: TrainConfig) -> None:
    """Cheap checks with messages that name the field; the models and the dataset check the rest."""
    from cascade_vsr.core.validation import check_writable_folder
    from cascade_vsr.models.attention_spec import check_attention_mode
    from cascade_vsr.models.upsampler import RESIZE_MODES

    for config in (model, data, train):
        check_field_types(config)
    check_attention_mode(model.attention_mode, "attention_mode")
    if model.temporal_unit is not None and model.temporal_unit <= 0:
        raise ValueError(f"`temporal_unit` must be a positive number of latent frames, got {model.temporal_unit}")
    if len(model.patch_size) != 3:
        raise ValueError(f"`patch_size` must be three ints (t h w), got {model.patch_size}")
    if model.condition_residual_std is not None and not model.condition_residual_std > 0:
        raise ValueError(f"`condition_residual_std` must be > 0 when set, got {model.condition_residual_std}")
    if model.upsampler_resize_mode not in (None, *RESIZE_MODES):
        raise ValueError(f"`upsampler_resize_mode` must be one of {RESIZE_MODES}, got {model.upsampler_resize_mode!r}")
    model.upsampler_kwargs()  # space_to_depth latents: latent_channels must be 3 * factor**2
    for name in ("latent_channels", "num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim", "text_dim"):
        if getattr(model, name) <= 0:
            raise ValueError(f"`{name}` must be positive, got {getattr(model, name)}")
    if any(size <= 0 for size in model.patch_size):
        raise ValueError(f"`patch_size` must be three positive ints (t h w), got {model.patch_size}")
    for name, length in (("sparse_window", 2), ("window_size", 3)):
        value = getattr(model, name)
        if value is not None and (len(value) != length or min(value) <= 0):
            raise ValueError(f"`{name}` must be {length} positive ints, got {value}")
    if model.upsampler_hidden_channels <= 0 or model.upsampler_num_blocks < 0:
        raise ValueError(
            "`upsampler_hidden_channels` must be positive and `upsampler_num_blocks` >= 0, got "
            f"{model.upsampler_hidden_channels}, {model.upsampler_num_blocks}"
        )
    if not data.data_dir:
        raise ValueError("`data_dir` must name one or more pair datasets (cascade-vsr make-pairs output)")
    if data.crop_size is not None and (len(data.crop_size) != 2 or min(data.crop_size) <= 0):
        raise ValueError(f"`crop_size` must be two positive ints [h, w] in LR latent pixels, got {data.crop_size}")
    if data.num_latent_frames is not None and data.num_latent_frames <= 0:
        raise ValueError(f"`num_latent_frames` must be positive, got {data.num_latent_frames}")
    if data.dataloader_num_workers < 0:
        raise ValueError(f"`dataloader_num_workers` must be >= 0, got {data.dataloader_num_workers}")
    check_writable_folder(train.output_dir, "output_dir")
    if not 0 <= train.seed < 2**32:
        raise ValueError(f"`seed` must lie in [0, 2**32), got {train.seed}")
    if train.lr_warmup_steps < 0 or train.logging_steps <= 0:
        raise ValueError(
            f"`lr_warmup_steps` must be >= 0 and `logging_steps` positive, got {train.lr_warmup_steps}, "
            f"{train.logging_steps}"
        )
    if train.checkpoints_total_limit is not None and train.checkpoints_total_limit < 1:
        raise ValueError(
            f"`checkpoints_total_limit` must be >= 1 (or null: keep all), got {train.checkpoints_total_limit}"
        )
    if not (0 <= train.adam_beta1 < 1 and 0 <= train.adam_beta2 < 1) or train.adam_epsilon <= 0:
        raise ValueError(
            "`adam_beta1` and `adam_beta2` must lie in [0, 1) and `adam_epsilon` be positive, got "
            f"{train.adam_beta1}, {train.adam_beta2}, {train.adam_epsilon}"
        )
    if train.adam_weight_decay < 0 or train.logit_std <= 0:
        raise ValueError(
            f"`adam_weight_decay` must be >= 0 and `logit_std` positive, got {train.adam_weight_decay}, {train.logit_std}"
        )
    if train.objective not in OBJECTIVES:
        raise ValueError(f"`objective` must be one of {OBJECTIVES}, got {train.objective!r}")
    if train.objective != "diffusion" and model.pretrained_model_name_or_path is None:
        raise ValueError(
            f"`objective` {train.objective!r} starts from a trained stage: set `pretrained_model_name_or_path` "
            "(distill: the teacher; adversarial: the distilled one-step model)"
        )
    steps, runs = train.distill_teacher_steps, train.distill_teacher_self_ensemble
    if not (steps >= 2 and steps % 2 == 0 or steps == 1 and (runs > 1 or train.objective != "distill")):
        raise ValueError(
            "`distill_teacher_steps` must be an even number >= 2, or 1 with `distill_teacher_self_ensemble` > 1 "
            f"(a one-step teacher's self-ensemble), got {steps} with distill_teacher_self_ensemble {runs}"
        )
    if not 0 <= train.distill_ground_truth_weight <= 1:
        raise ValueError(f"`distill_ground_truth_weight` must lie in [0, 1], got {train.distill_ground_truth_weight}")
    if train.distill_ground_truth_weight and (train.objective != "distill" or steps not in (1, 2)):
        raise ValueError(
            "`distill_ground_truth_weight` blends the ground truth into the target of a one-step student: it needs "
            f"`objective` distill and `distill_teacher_steps` 1 or 2, got {train.objective!r} and {steps}"
        )
    one_step = train.objective == "adversarial" or train.objective == "distill" and steps in (1, 2)
    if train.flow_temporal_weight > 0 and not one_step:
        raise ValueError(
            "`flow_temporal_weight` judges the decoded clean prediction of a one-step model: it needs `objective` "
            f"adversarial, or distill with `distill_teacher_steps` 1 or 2, got {train.objective!r} and {steps}"
        )
    if train.distill_guidance_scale < 1:
        raise ValueError(f"`distill_guidance_scale` must be >= 1 (1: none), got {train.distill_guidance_scale}")
    if not 1 <= train.distill_teacher_self_ensemble <= 8:
        raise ValueError(
            f"`distill_teacher_self_ensemble` must be in 1..8 (1: a single teacher run), got "
            f"{train.distill_teacher_self_ensemble}"
        )
    if train.distill_teacher_self_ensemble > 1 and train.objective != "distill":
        raise ValueError(
            f"`distill_teacher_self_ensemble` {train.distill_teacher_self_ensemble} is for `objective` distill, "
            f"got {train.objective!r}"
        )
    for name, used in (
        ("distill_teacher_self_ensemble", train.distill_teacher_self_ensemble > 1),
        ("dihedral_augmentation", train.dihedral_augmentation),
    ):
        if used and model.latent_space != "space_to_depth":
            raise ValueError(
                f"`{name}` flips and transposes latents, which is exact only in the space_to_depth latent space: "
                f"`latent_space` must be 'space_to_depth', got {model.latent_space!r}"
            )
    for name in ("gan_weight", "l1_weight", "feature_matching_weight", "r1_weight", "r2_weight",
                 "pixel_loss_weight", "temporal_smoothness_weight", "flow_temporal_weight",
                 "discriminator_sigma"):  # fmt: skip
        if getattr(train, name) < 0:
            raise ValueError(f"`{name}` must be >= 0, got {getattr(train, name)}")
    if not train.discriminator_sigma < 1:
        raise ValueError(f"`discriminator_sigma` must lie in [0, 1), got {train.discriminator_sigma}")
    if train.discriminator_learning_rate <= 0 or train.gradient_penalty_sigma <= 0:
        raise ValueError(
            "`discriminator_learning_rate` and `gradient_penalty_sigma` must be positive, got "
            f"{train.discriminator_learning_rate}, {train.gradient_penalty_sigma}"
        )
    if train.pixel_crop_size is not None and (len(train.pixel_crop_size) != 2 or min(train.pixel_crop_size) <= 0):
        raise ValueError(f"`pixel_crop_size` must be two positive ints (h w), got {train.pixel_crop_size}")
    if train.objective == "adversarial" and train.gradient_accumulation_steps != 1:
        raise ValueError("`gradient_accumulation_steps` must be 1 with `objective` adversarial")
    if train.lora_rank is not None:
        if train.lora_rank < 1 or (train.lora_alpha is not None and not train.lora_alpha > 0):
            raise ValueError(
                f"`lora_rank` must be >= 1 and `lora_alpha` positive, got {train.lora_rank}, {train.lora_alpha}"
            )
        if model.pretrained_model_name_or_path is None:
            raise ValueError("`lora_rank` adapts a trained stage: set `pretrained_model_name_or_path`")
        if not train.lora_target_modules:
            raise ValueError("`lora_target_modules` must name at least one layer")
    if train.lr_scheduler not in LR_SCHEDULERS:
        raise ValueError(f"`lr_scheduler` must be one of {LR_SCHEDULERS}, got {train.lr_scheduler!r}")
    if not (0 <= train.noise_aug_min <= train.noise_aug_max <= 1):
        raise ValueError(
            "`noise_aug_min` and `noise_aug_max` must satisfy 0 <= min <= max <= 1, got "
            f"[{train.noise_aug_min}, {train.noise_aug_max}]"
        )
    if not 0 <= train.text_dropout <= 1:
        raise ValueError(f"`text_dropout` must lie in [0, 1], got {train.text_dropout}")
    if train.upsampler_training not in UPSAMPLER_TRAINING:
        raise ValueError(f"`upsampler_training` must be one of {UPSAMPLER_TRAINING}, got {train.upsampler_training!r}")
    if not train.temporal_loss_weight >= 0:
        raise ValueError(f"`temporal_loss_weight` must be >= 0, got {train.temporal_loss_weight}")
    if train.timestep_sampler not in TIMESTEP_SAMPLERS:
        raise ValueError(f"`timestep_sampler` must be one of {TIMESTEP_SAMPLERS}, got {train.timestep_sampler!r}")
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps"):
        if getattr(train, name) <= 0:
            raise ValueError(f"`{name}` must be positive, got {getattr(train, name)}")
    if train.sampling_num_inference_steps < 1:
        raise ValueError(f"`sampling_num_inference_steps` must be >= 1, got {train.sampling_num_inference_steps}")
    for name in ("sampling_noise_aug_strength", "sampling_noise_frame_correlation"):
        value = getattr(train, name)
        if value is not None and not 0 <= value <= 1:
            raise ValueError(f"`{name}` must lie in [0, 1], got {value}")
    if train.sampling_guidance_scale < 1:
        raise ValueError(
            f"`sampling_guidance_scale` must be >= 1 (1: no guidance), got {train.sampling_guidance_scale}"
        )
    if not 1 <= train.sampling_self_ensemble <= 8:
        raise ValueError(f"`sampling_self_ensemble` must be in 1..8, got {train.sampling_self_ensemble}")
    if train.learning_rate <= 0 or train.max_grad_norm <= 0 or not 0 <= train.ema_decay < 1:
        raise ValueError(
            "`learning_rate` and `max_grad_norm` must be positive and `ema_decay` in [0, 1), got "
            f"{train.learning_rate}, {train.max_grad_norm}, {train.ema_decay}"
        )


def read_config_file(path: str | Path) -> dict:
    """The fields of a flat JSON / YAML config file, checked: a mapping of known field names to values of their
    types (ValueError naming the file and the field otherwise)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"`config` {str(path)!r} does not exist")
    if path.suffix not in (".json", ".yaml", ".yml"):
        raise ValueError(f"`config` must be a .json, .yaml or .yml file, got {str(path)!r}")
    try:
        text = path.read_text()
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as error:
        message = " ".join(str(error).split())  # one line: YAML errors span several
        raise ValueError(f"`config` {str(path)!r} cannot be parsed: {message}") from None
    if values is None:
        raise ValueError(f"`config` {str(path)!r} is empty: expected a mapping of field: value")
    if not isinstance(values, dict):
        raise ValueError(f"`config` {str(path)!r} must be a mapping of field: value, got a {type(values).__name__}")
    annotations = {}
    for config_class in CONFIG_CLASSES:
        annotations.update(typing.get_type_hints(config_class))
    unknown = sorted(str(key) for key in values if key not in annotations)
    if unknown:
        raise ValueError(f"`config` {str(path)!r} has unknown fields: {', '.join(unknown)}")
    if isinstance(values.get("data_dir"), str):  # one dataset, named without a list
        values["data_dir"] = [values["data_dir"]]
    values = {name: parse_number_strings(value, annotations[name]) for name, value in values.items()}
    for name, value in values.items():
        check_field_value(name, value, annotations[name])
    return values


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> tuple[ModelConfig, DataConfig, TrainConfig]:
    """Read a flat JSON / YAML config (unknown keys are errors), apply `--name value` overrides, validate."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(CONFIG_CLASSES)
    if path is not None:
        parser.set_defaults(**read_config_file(path))
    configs = parser.parse_args_into_dataclasses(args=list(overrides or []))
    validate(*configs)
    return tuple(configs)
