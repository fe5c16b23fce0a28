"""diffusers conventions of the models and the pipeline (issue 14): layerwise casting, LoRA, attention processors,
block caches, repeated blocks, and checkpoints of the earlier `to_out` layout."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.hooks import FirstBlockCacheConfig, apply_layerwise_casting
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from cascade_vsr import CascadeVSRPipeline, CascadeVSRTransformer3DModel, LatentUpsampler3D
from cascade_vsr.models.transformer import CascadeVSRAttnProcessor, CascadeVSRTransformerBlock

from .conftest import TINY_TRANSFORMER, TINY_UPSAMPLER, randomize_

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
WAN = dict(latent_channels=16, latent_space="wan")  # pipelines without a VAE name their latent space
FP8 = torch.float8_e4m3fn


def _inputs(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 4, 2, 6, 8, generator=g).to(dtype),
        condition=torch.randn(1, 4, 2, 6, 8, generator=g).to(dtype),
        timestep=torch.tensor([700.0]),
        noise_aug_level=torch.tensor([0.3]),
        encoder_hidden_states=torch.randn(1, 5, 16, generator=g).to(dtype),
    )


def _transformer(seed: int = 0, **config) -> CascadeVSRTransformer3DModel:
    torch.manual_seed(seed)
    return randomize_(CascadeVSRTransformer3DModel(**{**TINY_TRANSFORMER, **config}), seed=seed).eval()


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max())


# -- layerwise casting ---------------------------------------------------------------------------------------------


@torch.no_grad()
def test_layerwise_fp8_casting_runs_close_to_the_bf16_model():
    model = _transformer().to(torch.bfloat16)
    inputs = _inputs(torch.bfloat16)
    reference = model(**inputs).sample
    cast = copy.deepcopy(model)
    cast.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=torch.bfloat16)
    assert cast.blocks[0].attn1.to_q.weight.dtype == FP8 and cast.blocks[0].ffn.net[2].weight.dtype == FP8
    for kept in (cast.patch_embedding, cast.text_embedder.linear_1, cast.modulation_proj, cast.time_embedder.linear_1):
        assert kept.weight.dtype == torch.bfloat16  # `_skip_layerwise_casting_patterns`
    out = cast(**inputs).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert _relative_error(out, reference) < 0.1

    # Every layer but the norms in fp8, the text projection and the patch embedding too: each input still goes in
    # the compute dtype (the text embedder's weight dtype would be fp8 here).
    all_fp8 = copy.deepcopy(model)
    apply_layerwise_casting(all_fp8, storage_dtype=FP8, compute_dtype=torch.bfloat16, skip_modules_pattern=("norm",))
    assert all_fp8.text_embedder.linear_1.weight.dtype == FP8 and all_fp8.patch_embedding.weight.dtype == FP8
    out = all_fp8(**inputs).sample
    assert torch.isfinite(out).all() and _relative_error(out, reference) < 0.2


@torch.no_grad()
def test_bf16_model_with_float32_embedders_runs_like_from_pretrained_torch_dtype():
    """`from_pretrained(torch_dtype=bf16)` keeps `_keep_in_fp32_modules` in float32: mixed dtypes must run."""
    model = _transformer().to(torch.bfloat16)
    inputs = _inputs(torch.bfloat16)
    reference = model(**inputs).sample
    model.time_embedder.float()
    model.noise_level_embedder.float()
    out = model(**inputs).sample
    assert out.dtype == torch.bfloat16 and _relative_error(out, reference) < 0.05


@torch.no_grad()
def test_layerwise_fp8_casting_of_the_upsampler_runs_close_to_bf16():
    torch.manual_seed(0)
    upsampler = randomize_(LatentUpsampler3D(**TINY_UPSAMPLER)).eval().to(torch.bfloat16)
    lr = torch.randn(1, 4, 2, 5, 7, generator=torch.Generator().manual_seed(0)).bfloat16()
    reference = upsampler(lr, size=(9, 13)).sample
    upsampler.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=torch.bfloat16)
    assert upsampler.conv_in.weight.dtype == FP8 and upsampler.hr_norm.weight.dtype == torch.bfloat16
    out = upsampler(lr, size=(9, 13)).sample
    assert _relative_error(out, reference) < 0.1


# -- the earlier `to_out` layout -----------------------------------------------------------------------------------


def test_checkpoint_with_the_earlier_to_out_keys_loads_both_ways(tmp_path):
    model = _transformer()
    legacy = {k.replace("to_out.0.", "to_out."): v.clone() for k, v in model.state_dict().items()}
    assert "blocks.0.attn1.to_out.weight" in legacy
    model.save_config(tmp_path)
    save_file(legacy, tmp_path / "diffusion_pytorch_model.safetensors")
    loaded, info = CascadeVSRTransformer3DModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    fresh = CascadeVSRTransformer3DModel(**TINY_TRANSFORMER)
    fresh.load_state_dict(legacy)  # strict
    with torch.no_grad():
        expected = model(**_inputs()).sample
        torch.testing.assert_close(loaded.eval()(**_inputs()).sample, expected)
        assert torch.equal(fresh.eval()(**_inputs()).sample, expected)


# -- attention processors, repeated blocks -------------------------------------------------------------------------


@torch.no_grad()
def test_attn_processors_and_set_attn_processor():
    model = _transformer()
    processors = model.attn_processors
    assert len(processors) == 2 * TINY_TRANSFORMER["num_layers"]  # self- and cross-attention of every block
    assert "blocks.0.attn1.processor" in processors
    assert all(isinstance(p, CascadeVSRAttnProcessor) for p in processors.values())
    before = model(**_inputs()).sample
    model.set_attn_processor(CascadeVSRAttnProcessor())
    assert torch.equal(model(**_inputs()).sample, before)
    with pytest.raises(ValueError, match="number of processors"):
        model.set_attn_processor({"blocks.0.attn1.processor": CascadeVSRAttnProcessor()})


def test_repeated_blocks_name_the_block_class():
    model = _transformer()
    classes = {type(m).__name__ for m in model.modules()}
    assert model._repeated_blocks == ["CascadeVSRTransformerBlock"] and set(model._repeated_blocks) <= classes
    assert CascadeVSRTransformerBlock.__name__ in model._no_split_modules


# -- LoRA ----------------------------------------------------------------------------------------------------------


def _add_random_lora(model: CascadeVSRTransformer3DModel, seed: int = 3, adapter_name: str = "default") -> None:
    """A LoRA on the standard attention targets, with random (not zero) B so that it changes the output."""
    model.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=LORA_TARGETS), adapter_name=adapter_name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f"lora_B.{adapter_name}" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


@torch.no_grad()
def test_lora_targets_every_attention_projection_and_scale_weighs_it():
    model = _transformer()
    base = model(**_inputs()).sample
    _add_random_lora(model)
    lora_layers = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if n.endswith("lora_A")}
    expected = {f"blocks.{i}.{a}.{t}" for i in range(2) for a in ("attn1", "attn2") for t in LORA_TARGETS}
    assert lora_layers == expected
    adapted = model(**_inputs()).sample
    assert (adapted - base).abs().max() > 1e-3
    torch.testing.assert_close(model(**_inputs(), attention_kwargs={"scale": 0.0}).sample, base)
    # Independent reference of the scale: the adapter's B halved.
    half = copy.deepcopy(model)
    for name, param in half.named_parameters():
        if "lora_B" in name:
            param.mul_(0.5)
    torch.testing.assert_close(model(**_inputs(), attention_kwargs={"scale": 0.5}).sample, half(**_inputs()).sample)
    assert torch.equal(model(**_inputs()).sample, adapted)  # the scale is undone after the call
    with pytest.raises(ValueError, match="only the key 'scale'"):
        model(**_inputs(), attention_kwargs={"scale": 0.5, "mask": None})


def _pipeline(transformer: CascadeVSRTransformer3DModel) -> CascadeVSRPipeline:
    torch.manual_seed(1)
    upsampler = randomize_(LatentUpsampler3D(**{**TINY_UPSAMPLER, "latent_channels": 16}), seed=1).eval()
    pipe = CascadeVSRPipeline(
        upsampler=upsampler, transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe: CascadeVSRPipeline, steps: int = 2, **kwargs) -> torch.Tensor:
    lr = torch.randn(1, 16, 2, 3, 4, generator=torch.Generator().manual_seed(5))
    return pipe(
        lr_latents=lr,
        scale=2,
        num_inference_steps=steps,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).frames


@torch.no_grad()
def test_pipeline_lora_save_load_adapters_and_fuse(tmp_path):
    trained = _transformer(**WAN)
    base = _call(_pipeline(copy.deepcopy(trained)))
    _add_random_lora(trained)
    adapted_pipe = _pipeline(trained)
    adapted = _call(adapted_pipe)
    assert (adapted - base).abs().max() > 1e-3
    CascadeVSRPipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(trained),
        transformer_lora_adapter_metadata=trained.peft_config["default"].to_dict(),
    )
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    state_dict = CascadeVSRPipeline.lora_state_dict(tmp_path)
    assert "transformer.blocks.0.attn1.to_out.0.lora_A.weight" in state_dict

    pipe = _pipeline(_transformer(**WAN))
    assert torch.equal(_call(pipe), base)
    pipe.load_lora_weights(tmp_path, adapter_name="style")
    assert pipe.get_active_adapters() == ["style"]
    torch.testing.assert_close(_call(pipe), adapted, rtol=1e-5, atol=1e-6)
    # `attention_kwargs={"scale": ...}` through the pipeline, checked before any compute
    torch.testing.assert_close(_call(pipe, attention_kwargs={"scale": 0.0}), base, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="attention_kwargs"):
        _call(pipe, attention_kwargs={"heads": 2})

    pipe.set_adapters(["style"], adapter_weights=[0.0])
    torch.testing.assert_close(_call(pipe), base, rtol=1e-5, atol=1e-6)
    pipe.set_adapters(["style"], adapter_weights=[1.0])
    pipe.disable_lora()
    torch.testing.assert_close(_call(pipe), base, rtol=1e-5, atol=1e-6)
    pipe.enable_lora()
    unfused = _call(pipe)
    pipe.fuse_lora()
    fused = _call(pipe)
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-5)
    pipe.unfuse_lora()
    torch.testing.assert_close(_call(pipe), unfused, rtol=1e-5, atol=1e-6)
    pipe.unload_lora_weights()
    torch.testing.assert_close(_call(pipe), base, rtol=1e-5, atol=1e-6)


def test_load_lora_weights_refuses_a_state_dict_without_lora_keys():
    pipe = _pipeline(_transformer(**WAN))
    with pytest.raises(ValueError, match="LoRA checkpoint"):
        pipe.load_lora_weights({"transformer.blocks.0.attn1.to_q.weight": torch.zeros(24, 24)})


# -- first-block cache ---------------------------------------------------------------------------------------------


@torch.no_grad()
def test_first_block_cache_in_a_multi_step_call():
    transformer = _transformer(num_layers=3, **WAN)
    pipe = _pipeline(transformer)
    evaluations = []
    for block in transformer.blocks:  # inside the block: runs only when the block is evaluated, not skipped
        block.ffn.register_forward_hook(lambda *args: evaluations.append(1))

    def counted(**kwargs):
        evaluations.clear()
        return _call(pipe, steps=8, **kwargs), len(evaluations)

    uncached, full = counted()
    assert full == 8 * 3

    transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))  # never reuse: exactly the uncached output
    out, count = counted()
    assert count == full and torch.equal(out, uncached)
    transformer.disable_cache()

    transformer.enable_cache(FirstBlockCacheConfig(threshold=10.0))  # reuse whenever possible
    out, count = counted()
    assert count < full and count >= 8  # the first block always runs
    assert torch.isfinite(out).all() and _relative_error(out, uncached) < 0.5
    again, _ = counted()  # the cache state does not leak from one call into the next
    assert torch.equal(again, out)
    transformer.disable_cache()

    out, count = counted()
    assert count == full and torch.equal(out, uncached)
