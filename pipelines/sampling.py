"""The sampling settings a stage folder carries, so that a call without sampler arguments samples as the model was
trained to (the demo model: 2 steps, a clean condition, one noise image for all frames, an 8-run self-ensemble).

They are stored in the pipeline's config (`model_index.json`, key `sampling`); a call's explicit arguments win, then
the model's settings, then the library defaults below. `set_schedule` turns the steps or sigmas into the
scheduler's timesteps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

SAMPLING_DEFAULTS: dict[str, Any] = {
    "num_inference_steps": 50,
    "sigmas": None,
    "guidance_scale": 1.0,
    "noise_aug_strength": 0.45,
    "noise_frame_correlation": 0.0,
    "self_ensemble": 1,
}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def check_sampling(settings: dict[str, Any] | None) -> dict[str, Any]:
    """A model's sampling settings: known names only, each of the right kind (the call checks the values again)."""
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise ValueError(f"`sampling` must be a dict of sampler settings, got {type(settings).__name__}")
    unknown = sorted(set(settings) - set(SAMPLING_DEFAULTS))
    if unknown:
        raise ValueError(f"`sampling` has unknown settings {unknown}; expected some of {sorted(SAMPLING_DEFAULTS)}")
    for name in ("num_inference_steps", "self_ensemble"):
        value = settings.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"`sampling['{name}']` must be a positive int, got {value!r}")
    for name in ("guidance_scale", "noise_aug_strength", "noise_frame_correlation"):
        value = settings.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"`sampling['{name}']` must be a number, got {value!r}")
    sigmas = settings.get("sigmas")
    if sigmas is not None and (
        not isinstance(sigmas, list | tuple) or not all(isinstance(s, float | int) for s in sigmas)
    ):
        raise ValueError(f"`sampling['sigmas']` must be a list of numbers, got {sigmas!r}")
    return dict(settings)


def resolve_sampling(
    model_settings: dict[str, Any] | None, pixels_in_and_out: bool, **explicit: Any
) -> dict[str, Any]:
    """The settings of one call: `explicit` values that are not None, else the model's, else SAMPLING_DEFAULTS.

    A model's recommended self-ensemble averages flipped pixels, so it applies only to a pixel input with a decoded
    output (`pixels_in_and_out`); elsewhere the model's default is a single run. Explicit `sigmas` replace the model's
    step count too (the schedule then fixes the number of steps).
    """
    model_settings = model_settings or {}
    resolved = {}
    for name, default in SAMPLING_DEFAULTS.items():
        if explicit.get(name) is not None:
            resolved[name] = explicit[name]
        elif model_settings.get(name) is not None:
            resolved[name] = model_settings[name]
        else:
            resolved[name] = default
    if explicit.get("self_ensemble") is None and not pixels_in_and_out:
        resolved["self_ensemble"] = 1
    if explicit.get("num_inference_steps") is not None and explicit.get("sigmas") is None:
        resolved["sigmas"] = None  # the caller's step count, on the default schedule
    sigmas = resolved["sigmas"]
    if isinstance(sigmas, list | tuple | np.ndarray) and all(_is_number(s) for s in sigmas):
        resolved["sigmas"] = [float(s) for s in sigmas]
        resolved["num_inference_steps"] = len(resolved["sigmas"])
    # Anything else is left as given, for the pipeline's checks to refuse with a message naming it.
    return resolved


def inverse_shift(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Sigmas that the scheduler's static `shift * s / (1 + (shift - 1) * s)` maps back onto `sigmas`."""
    return sigmas / (shift - (shift - 1) * sigmas)


def set_schedule(scheduler, sigmas: list[float] | None, num_inference_steps: int, seq_len: int, device) -> None:
    """Set `scheduler`'s timesteps: the default linspace(1, 1/N, N) through its shift (or dynamic shift for `seq_len`
    tokens), or the user's `sigmas` exactly as given: `set_timesteps(sigmas=...)` would shift them, so the inverse
    shift is applied first (or mu chosen for the identity)."""
    config = scheduler.config
    if sigmas is None:
        values, mu = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps), None
        if config.use_dynamic_shifting:
            base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
            base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
            slope = (max_shift - base_shift) / (max_len - base_len)
            mu = seq_len * slope + base_shift - slope * base_len
    else:
        values = np.asarray(sigmas, dtype=np.float64)
        if config.use_dynamic_shifting:
            mu = 0.0 if config.time_shift_type == "exponential" else 1.0  # identity time shift
        else:
            values, mu = inverse_shift(values, config.shift), None
    scheduler.set_timesteps(sigmas=values.tolist(), device=device, mu=mu)


def guided_velocity(
    transformer,
    latents: torch.Tensor,
    condition: torch.Tensor,
    timestep: torch.Tensor,
    guidance_scale: float | None,
    **forward_kwargs: Any,
) -> torch.Tensor:
    """One float32 velocity of the stage's transformer at `timestep` (a scalar tensor), with classifier-free
    guidance `uncond + g * (cond - uncond)` unless `guidance_scale` is None: the two halves run as one batch, and the
    text in `forward_kwargs` holds the unconditional half first.

    The latents and the condition go in as float32: the transformer casts what its layers read, and the velocity it
    returns around the condition (preconditioned models) keeps float32 precision. Cast to a bfloat16 stage's dtype,
    the clip itself would be rounded to 8 bits of mantissa, about a grey level, differently in every frame."""
    do_cfg = guidance_scale is not None
    model_input = torch.cat([latents] * 2) if do_cfg else latents
    model_condition = torch.cat([condition] * 2) if do_cfg else condition
    velocity = transformer(
        hidden_states=model_input.float(),
        condition=model_condition.float(),
        timestep=timestep.expand(model_input.shape[0]),
        return_dict=False,
        **forward_kwargs,
    )[0].float()
    if not do_cfg:
        return velocity
    uncond, cond = velocity.chunk(2)
    return uncond + guidance_scale * (cond - uncond)
