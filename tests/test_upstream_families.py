"""Every upstream family end to end with its tiny random pipeline: prompt encoding, the chain after the upstream,
model-guided denoising through the upstream's own loop, make-pairs `--upstream` and one training step.

Each reference is the upstream pipeline itself: what its transformer receives as text, how its own `__call__`
decodes latents, and what its own denoising loop computes from the same initial latents."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler
from safetensors import safe_open

from cascade_vsr import CascadeVSRPipeline, CascadeVSRTransformer3DModel
from cascade_vsr import testing as tu
from cascade_vsr.cli import main as cli_main
from cascade_vsr.degradations.model_guided import (
    ModelGuidedDegradation,
    ModelGuidedDegradationConfig,
    cut_schedule,
    flow_matching_tail,
    is_flow_matching,
)
from cascade_vsr.pipelines.adapters import get_adapter
from cascade_vsr.pipelines.upstream import family_of_latent_space
from cascade_vsr.training.config import load_config
from cascade_vsr.training.trainer import train

from .test_make_pairs import VIDEO, check_dataset
from .test_pipeline import _stage as tiny_stage

FAMILIES = sorted(tu.TINY_UPSTREAMS)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    spec = tu.TINY_UPSTREAMS[request.param]
    upstream = spec.build()
    upstream.set_progress_bar_config(disable=True)
    return request.param, spec, upstream


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _stage(spec: tu.TinyUpstream, upstream, text_dim: int | None = None) -> dict:
    """A tiny random stage of the upstream's latent space, reading text of the family's width (or `text_dim`)."""
    channels = get_adapter(upstream).latent_channels
    return tiny_stage(channels, spec.text_dim if text_dim is None else text_dim, spec.latent_space)


def _grid(latents: torch.Tensor) -> dict:
    """The latent grid of model-space latents (LTX-Video's packed format needs it)."""
    return dict(latent_num_frames=latents.shape[2], latent_height=latents.shape[3], latent_width=latents.shape[4])


class TransformerInputs:
    """Records the keyword inputs of every forward of an upstream's transformer(s)."""

    def __init__(self, *modules: torch.nn.Module):
        self.calls: list[dict] = []
        self.handles = [m.register_forward_pre_hook(self._record, with_kwargs=True) for m in modules if m]

    def _record(self, module, args, kwargs):
        inputs = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
        self.calls.append(inputs | {"module": module})

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# ---------------------------------------------------------------- prompt encoding


@torch.no_grad()
def test_prompt_encoding_is_what_the_upstream_transformer_receives(family):
    """`CascadeVSRPipeline.encode_prompt` after `from_pipe` gives the embeddings that the upstream's own call feeds
    its transformer (HunyuanVideo's Llama template and crop, Wan's zero padding, ...), with the mask it passes."""
    name, spec, upstream = family
    stage = CascadeVSRPipeline.from_pipe(upstream, **_stage(spec, upstream))
    recorder = TransformerInputs(upstream.transformer)
    try:
        upstream(
            prompt="a red cat",
            num_frames=spec.num_frames,
            height=spec.lr_size[0],
            width=spec.lr_size[1],
            num_inference_steps=2,  # Mochi's schedule needs two
            guidance_scale=1.0,  # no CFG: one conditional forward
            output_type="latent",
            generator=_gen(),
            **spec.call_kwargs,
        )
    finally:
        recorder.remove()
    received = recorder.calls[0]
    embeds, mask, *_ = stage.encode_prompt("a red cat", **spec.call_kwargs)
    torch.testing.assert_close(embeds, received["encoder_hidden_states"], rtol=0, atol=0)
    assert mask.dtype == torch.int64 and mask.shape == embeds.shape[:2]
    if received.get("encoder_attention_mask") is not None:
        assert torch.equal(mask, received["encoder_attention_mask"].long())
    elif name.startswith("wan"):  # Wan zeroes the embeddings past the prompt instead of masking them
        assert torch.equal(mask.bool(), (embeds != 0).any(-1)) and 0 < int(mask.sum()) < mask.shape[1]
    else:  # CogVideoX attends to every padded position
        assert bool(mask.all())
    if name == "hunyuan_video":
        assert embeds.shape[1] == 256  # HunyuanVideo's own default length, after cropping its template
    # the same text through the stage's call conditions its transformer on exactly these embeddings
    stage_inputs = TransformerInputs(stage.transformer)
    try:
        lr = torch.zeros(1, stage.adapter.latent_channels, 1, 2, 2)
        stage(
            lr_latents=stage.adapter.from_model(lr),
            upstream_shape=dict(latent_num_frames=1, latent_height=2, latent_width=2),
            scale=2,
            prompt="a red cat",
            guidance_scale=1.0,
            num_inference_steps=1,
            output_type="latent",
            **spec.call_kwargs,
        )
    finally:
        stage_inputs.remove()
    torch.testing.assert_close(stage_inputs.calls[0]["encoder_hidden_states"], embeds, rtol=0, atol=0)


def test_text_dim_mismatch_names_the_family_width(family):
    name, spec, upstream = family
    title = family_of_latent_space(spec.latent_space).title
    stage = CascadeVSRPipeline.from_pipe(upstream, **_stage(spec, upstream, text_dim=spec.text_dim + 1))
    lr = torch.zeros(1, stage.adapter.latent_channels, 1, 2, 2)
    with pytest.raises(ValueError, match=rf"{title}'s prompt embeddings are {spec.text_dim} wide .*text_dim="):
        stage(
            lr_latents=stage.adapter.from_model(lr),
            upstream_shape=dict(latent_num_frames=1, latent_height=2, latent_width=2),
            scale=2,
            prompt="a cat",
            num_inference_steps=1,
        )


# ---------------------------------------------------------------- the chain


@torch.no_grad()
def test_chain_decodes_like_the_upstreams_own_call(family):
    """upstream(output_type="latent") -> from_pipe -> the stage's decoded frames equal what the upstream's own
    `__call__` decodes from the same HR latents (swapped in as its final latents by a step-end callback)."""
    name, spec, upstream = family
    adapter = get_adapter(upstream)
    lr = upstream(
        prompt="a cat",
        num_frames=spec.num_frames,
        height=spec.lr_size[0],
        width=spec.lr_size[1],
        num_inference_steps=2,  # Mochi's schedule needs two
        output_type="latent",
        generator=_gen(),
        **spec.call_kwargs,
    ).frames
    stage = CascadeVSRPipeline.from_pipe(upstream, **_stage(spec, upstream))
    stage.set_progress_bar_config(disable=True)
    height, width = 2 * spec.lr_size[0], 2 * spec.lr_size[1]
    upstream_shape = dict(num_frames=spec.num_frames, height=spec.lr_size[0], width=spec.lr_size[1])
    common = dict(
        lr_latents=lr,
        upstream_shape=upstream_shape if name == "ltx_video" else None,
        height=height,
        width=width,
        prompt="a cat",
        num_inference_steps=1,
        **spec.call_kwargs,
    )
    hr = stage(output_type="latent", generator=_gen(1), **common).frames
    sc = adapter.spatial_compression
    assert hr.shape == (
        1,
        adapter.latent_channels,
        adapter.to_model(lr, **upstream_shape).shape[2],
        height // sc,
        width // sc,
    )
    frames = stage(output_type="np", generator=_gen(1), **common).frames

    def swap_in_hr(pipe, step, timestep, tensors):  # after every step: the last one's latents are decoded
        return {"latents": adapter.from_model(hr).to(tensors["latents"].dtype)}

    reference = upstream(
        prompt="a cat",
        num_frames=adapter.num_pixel_frames(hr.shape[2]),
        height=height,
        width=width,
        num_inference_steps=2,
        output_type="np",
        generator=_gen(),
        callback_on_step_end=swap_in_hr,
        **spec.call_kwargs,
    ).frames
    assert frames.shape == reference.shape == (1, spec.num_frames, height, width, 3)
    np.testing.assert_allclose(frames, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(adapter.to_model(adapter.from_model(hr), **_grid(hr)), hr, rtol=0, atol=0)


# ---------------------------------------------------------------- model-guided degradation


def _frames(spec: tu.TinyUpstream) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (spec.num_frames, 48, 48, 3), dtype=np.uint8)


@torch.no_grad()
def test_model_guided_from_noise_level_one_is_the_upstreams_own_generation(family):
    """At alpha = 1 the SDEdit schedule is the whole schedule: the result equals the upstream's own call (its CFG,
    scheduler and timestep conventions) from the same initial latents, bit for bit."""
    name, spec, upstream = family
    config = ModelGuidedDegradationConfig(num_inference_steps=3, prompt="a cat", **_text_length(spec))
    degradation = ModelGuidedDegradation(upstream, config)
    adapter = degradation.adapter
    clean = degradation.encode(_frames(spec), size=spec.lr_size)
    noise = torch.randn(clean.shape, generator=_gen(5))
    if is_flow_matching(upstream.scheduler):
        initial = adapter.from_model(noise)
    else:  # DDPM-type: the scheduler's own noising at its first timestep
        probe = copy.deepcopy(upstream.scheduler)
        probe.set_timesteps(3)
        initial = upstream.scheduler.add_noise(
            adapter.from_model(clean), adapter.from_model(noise), probe.timesteps[:1]
        )
    reference = upstream(
        prompt="a cat",
        num_frames=spec.num_frames,
        height=spec.lr_size[0],
        width=spec.lr_size[1],
        num_inference_steps=3,
        latents=initial,
        output_type="latent",
        **spec.call_kwargs,
    ).frames
    result = degradation.denoise(clean, 1.0, seed=5)
    torch.testing.assert_close(result, adapter.to_model(reference, **_grid(clean)).float(), rtol=0, atol=0)
    # guidance is the upstream's: its default scale unless the config sets one
    assert degradation.guidance_scale > 1
    unguided = ModelGuidedDegradation(upstream, dataclasses.replace(config, guidance_scale=1.0))
    assert not torch.equal(unguided.denoise(clean, 1.0, seed=5), result)


def _text_length(spec: tu.TinyUpstream) -> dict:
    return {"max_sequence_length": spec.call_kwargs["max_sequence_length"]} if spec.call_kwargs else {}


def _noise_levels(calls: list[dict], scheduler) -> list[float]:
    """The distinct noise levels, in order, at which an upstream's transformer(s) ran (timesteps / 1000; Mochi's
    inverted sigmas count up; Wan 2.2 TI2V passes one timestep per token)."""
    levels = []
    for call in calls:
        timestep = torch.as_tensor(call["timestep"]).float().flatten().max().item()
        level = timestep / scheduler.config.num_train_timesteps
        if scheduler.config.get("invert_sigmas", False):
            level = 1 - level
        if not levels or abs(levels[-1] - level) > 1e-6:
            levels.append(level)
    return levels


@torch.no_grad()
def test_model_guided_runs_only_the_schedule_below_alpha(family):
    """The upstream's transformer(s) run at alpha itself, then exactly at the points of the upstream's own full
    schedule below alpha (flow matching); DDPM-type: at the grid points at or below alpha."""
    name, spec, upstream = family
    config = ModelGuidedDegradationConfig(num_inference_steps=8, guidance_scale=1.0, **_text_length(spec))
    degradation = ModelGuidedDegradation(upstream, config)
    clean = degradation.encode(_frames(spec), size=spec.lr_size)
    transformers = (upstream.transformer, getattr(upstream, "transformer_2", None))
    full = TransformerInputs(*transformers)
    try:
        degradation.denoise(clean, 1.0, seed=1)
    finally:
        full.remove()
    tail = TransformerInputs(*transformers)
    try:
        result = degradation.denoise(clean, 0.5, seed=1)
    finally:
        tail.remove()
    full_levels = _noise_levels(full.calls, upstream.scheduler)
    levels = _noise_levels(tail.calls, upstream.scheduler)
    if is_flow_matching(upstream.scheduler):
        expected = [0.5] + [level for level in full_levels if level < 0.5]
    else:
        expected = [level for level in full_levels if level <= 0.5]
    assert len(full_levels) == 8 and 1 <= len(levels) < 8
    np.testing.assert_allclose(levels, expected, atol=1e-3)
    assert torch.isfinite(result).all() and result.shape == clean.shape
    if name == "wan2.2":  # both experts run in the full schedule, only the low-noise one below its boundary
        assert {id(c["module"]) for c in full.calls} == {id(m) for m in transformers}
        assert {id(c["module"]) for c in tail.calls} == {id(upstream.transformer_2)}
    full_result = degradation.denoise(clean, 1.0, seed=1)
    assert torch.equal(degradation.denoise(clean, 0.0, seed=1), clean)
    assert 0 < float((result - clean).norm()) < float((full_result - clean).norm())


def test_unipc_flow_scheduler_cut_keeps_its_own_grid():
    """Wan's released scheduler (UniPC with flow sigmas) is cut like FlowMatchEuler: alpha, then its grid below."""
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    assert is_flow_matching(scheduler)
    scheduler.set_timesteps(10)
    full = scheduler.sigmas.clone()
    cut_schedule(scheduler, 0.6)
    below = full[:-1][full[:-1] < 0.6]
    torch.testing.assert_close(scheduler.sigmas, torch.cat([torch.tensor([0.6]), below, full[-1:]]))
    assert scheduler.timesteps.tolist() == (scheduler.sigmas[:-1] * 1000).long().tolist()
    # Mochi's inverted sigmas count up from 1 - level
    inverted = torch.tensor([0.0, 0.2, 0.7, 1.0])
    torch.testing.assert_close(flow_matching_tail(inverted, 0.5, inverted=True), torch.tensor([0.5, 0.7, 1.0]))
    pipe = tu.tiny_wan_pipeline(scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    degradation = ModelGuidedDegradation(pipe, ModelGuidedDegradationConfig(num_inference_steps=6))
    clean = degradation.encode(_frames(tu.TINY_UPSTREAMS["wan"]), size=(32, 32))
    result = degradation.denoise(clean, 0.4, seed=0)
    assert torch.isfinite(result).all() and not torch.equal(result, clean)
    assert "set_timesteps" not in vars(pipe.scheduler)  # the wrapper is gone after the call


def test_model_guided_config_checks():
    with pytest.raises(ValueError, match="`guidance_scale`"):
        ModelGuidedDegradationConfig(guidance_scale=0.5)
    with pytest.raises(ValueError, match="`pipeline_kwargs`.*latents"):
        ModelGuidedDegradationConfig(pipeline_kwargs={"latents": None})
    with pytest.raises(ValueError, match="`pipeline_kwargs` \\['nope'\\] are not arguments of WanPipeline"):
        ModelGuidedDegradation(tu.tiny_wan_pipeline(), ModelGuidedDegradationConfig(pipeline_kwargs={"nope": 1}))
    with pytest.raises(ValueError, match="`pipeline` must be a text-to-video pipeline"):
        ModelGuidedDegradation(tu.tiny_wan_vae())


# ---------------------------------------------------------------- make-pairs --upstream and one training step


def test_make_pairs_upstream_and_one_training_step(family, tmp_path):
    """make-pairs `--upstream` with model-guided pairs and text embeddings writes latents in the family's space
    (the stage's own prompt encoding), and the trainer trains a stage of that space one step on them."""
    name, spec, upstream = family
    folder = tmp_path / "upstream"
    upstream.save_pretrained(folder)
    root = tmp_path / "pairs"
    adapter = get_adapter(upstream)
    args = ["make-pairs", VIDEO, "--output-dir", root, "--num-frames", spec.num_frames, "--stride", 2]
    args += ["--hr-size", 2 * spec.lr_size[0], 2 * spec.lr_size[1], "--lr-scale", 0.5, "--max-clips-per-video", 1]
    args += ["--upstream", folder, "--degradations", "model_guided=1", "--sdedit-steps", 2, "--text-embeds"]
    args += ["--prompt", "a rabbit", "--no-quality-filter"]
    assert cli_main([str(a) for a in args]) == 0
    (record,) = check_dataset(root, 1)
    assert record["latent_space"] == spec.latent_space and record["degradation"]["kind"] == "model_guided"
    assert record["degradation"]["params"]["guidance_scale"] > 1  # the upstream's own CFG
    with safe_open(root / record["latents"], "pt") as handle:
        hr, lr = handle.get_tensor("hr_latents"), handle.get_tensor("lr_latents")
        embeds, mask = handle.get_tensor("prompt_embeds"), handle.get_tensor("prompt_attention_mask")
    latent_frames = adapter.num_latent_frames(spec.num_frames)
    h, w = (side // adapter.spatial_compression for side in spec.lr_size)
    assert lr.shape == (adapter.latent_channels, latent_frames, h, w)
    assert hr.shape == (adapter.latent_channels, latent_frames, 2 * h, 2 * w)
    stage = CascadeVSRPipeline.from_pipe(upstream, **_stage(spec, upstream))
    expected, expected_mask, *_ = stage.encode_prompt("a rabbit")
    torch.testing.assert_close(embeds, expected[0].float(), rtol=0, atol=0)
    assert torch.equal(mask, expected_mask[0])

    output = tmp_path / "train"
    overrides = {
        "--latent_channels": adapter.latent_channels, "--latent_space": spec.latent_space,
        "--text_dim": spec.text_dim, "--num_layers": 1, "--num_attention_heads": 2, "--attention_head_dim": 8,
        "--ffn_dim": 32, "--upsampler_hidden_channels": 16, "--upsampler_num_blocks": 1,
        "--data_dir": root, "--output_dir": output, "--max_train_steps": 1, "--report_to": "none",
        "--crop_size": f"{h} {w}", "--num_latent_frames": latent_frames, "--train_batch_size": 1,
    }  # fmt: skip
    args = [str(part) for key, value in overrides.items() for part in (key, *str(value).split())]
    summary = train(*load_config(None, args))
    log = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1] and np.isfinite(log[0]["loss"])
    exported = CascadeVSRTransformer3DModel.from_pretrained(summary["export_dir"], subfolder="transformer")
    assert exported.config.latent_space == spec.latent_space


def test_ddim_cut_keeps_the_step_size_of_the_full_schedule():
    """CogVideoX's DDIM steps from t to t - T // num_inference_steps: the cut keeps the grid and that count, so every
    step of the tail lands on the next grid point."""
    from diffusers import CogVideoXDDIMScheduler

    scheduler = CogVideoXDDIMScheduler()
    scheduler.set_timesteps(8)
    grid = scheduler.timesteps.clone()
    cut_schedule(scheduler, 0.5)
    assert scheduler.timesteps.tolist() == [t for t in grid.tolist() if t <= 500]
    assert scheduler.num_inference_steps == 8
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    assert all(a - b == stride for a, b in zip(scheduler.timesteps.tolist(), scheduler.timesteps.tolist()[1:]))
