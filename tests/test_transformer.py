import json

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from einops import rearrange
from torch.utils._python_dispatch import TorchDispatchMode

from cascade_vsr import CascadeVSRTransformer3DModel, LatentUpsampler3D
from cascade_vsr.models.attention_spec import AttentionSpec
from cascade_vsr.models.rope import (
    RotaryPositionEmbedding3D,
    apply_rope,
    rms_norm_rope,
    rope_cos_sin,
    rope_rotation,
)
from cascade_vsr.models.transformer import normalize_and_rotate

from .conftest import TINY_TRANSFORMER, TINY_UPSAMPLER, randomize_


def _inputs(batch=2, frames=5, height=17, width=31, text_len=7, channels=4, text_dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, channels, frames, height, width, generator=g),
        condition=torch.randn(batch, channels, frames, height, width, generator=g),
        timestep=torch.rand(batch, generator=g) * 1000,
        noise_aug_level=torch.rand(batch, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, text_dim, generator=g),
    )


def test_default_config_is_about_one_billion_parameters():
    with torch.device("meta"):
        model = CascadeVSRTransformer3DModel()
    num_params = sum(p.numel() for p in model.parameters())
    print(f"default CascadeVSRTransformer3DModel: {num_params:,} parameters")
    assert 0.9e9 < num_params < 1.2e9


@pytest.mark.parametrize("frames", [1, 5, 20])
def test_shapes_odd_sizes_and_noninteger_upsampling(tiny_transformer, tiny_upsampler, frames):
    lr = torch.randn(2, 4, frames, 9, 16)
    up = tiny_upsampler(lr, size=(17, 31)).sample  # 1.89x and 1.94x
    inputs = _inputs(frames=frames)
    inputs["condition"] = up
    with torch.no_grad():
        out = tiny_transformer(**inputs).sample
    assert out.shape == (2, 4, frames, 17, 31)
    assert torch.isfinite(out).all()


def test_batch_broadcast_of_timestep_and_text(tiny_transformer):
    inputs = _inputs(batch=3)
    inputs["timestep"] = torch.tensor([400.0])
    inputs["noise_aug_level"] = 0.45
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][:1]
    with torch.no_grad():
        out = tiny_transformer(**inputs).sample
        single = tiny_transformer(
            **{k: (v[1:2] if k in ("hidden_states", "condition") else v) for k, v in inputs.items()}
        )
    torch.testing.assert_close(out[1:2], single.sample, rtol=1e-4, atol=1e-5)


def test_fresh_model_predicts_zero_velocity():
    """AdaLN-zero and a zero output projection: a fresh model is a well-defined starting point."""
    model = CascadeVSRTransformer3DModel(**TINY_TRANSFORMER)
    out = model(**_inputs(batch=1, frames=2, height=6, width=6)).sample
    assert torch.count_nonzero(out) == 0


def test_gradients_reach_every_parameter_in_a_joint_backward():
    upsampler = randomize_(LatentUpsampler3D(**TINY_UPSAMPLER))
    transformer = randomize_(CascadeVSRTransformer3DModel(**TINY_TRANSFORMER), seed=1)
    lr = torch.randn(2, 4, 3, 5, 9)
    inputs = _inputs(frames=3, height=11, width=17)
    inputs["condition"] = upsampler(lr, size=(11, 17)).sample
    inputs["encoder_hidden_states"] = None  # the null embedding must get gradients too
    loss = transformer(**inputs).sample.square().mean()
    loss.backward()
    for name, module in (("upsampler", upsampler), ("transformer", transformer)):
        for pname, param in module.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{name}.{pname} got no gradient"


def test_gradient_checkpointing_matches(tiny_transformer):
    inputs = _inputs(batch=1, frames=2, height=6, width=10)
    params = [p for n, p in tiny_transformer.named_parameters() if n != "null_text_embedding"]
    out = tiny_transformer(**inputs).sample.sum()
    grads = torch.autograd.grad(out, params)
    tiny_transformer.enable_gradient_checkpointing()
    out_ckpt = tiny_transformer(**inputs).sample.sum()
    grads_ckpt = torch.autograd.grad(out_ckpt, params)
    torch.testing.assert_close(out_ckpt, out)
    for a, b in zip(grads, grads_ckpt):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_save_and_load_round_trip_uses_safetensors(tmp_path, tiny_transformer, tiny_upsampler):
    tiny_transformer.save_pretrained(tmp_path / "transformer")
    tiny_upsampler.save_pretrained(tmp_path / "upsampler")
    for sub in ("transformer", "upsampler"):
        files = sorted(p.name for p in (tmp_path / sub).iterdir())
        assert "diffusion_pytorch_model.safetensors" in files, files
        assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files), files
    assert json.loads((tmp_path / "transformer" / "config.json").read_text())["num_layers"] == 2
    transformer = CascadeVSRTransformer3DModel.from_pretrained(tmp_path / "transformer")
    upsampler = LatentUpsampler3D.from_pretrained(tmp_path / "upsampler")
    inputs = _inputs(batch=1, frames=2, height=6, width=10)
    lr = torch.randn(1, 4, 2, 3, 5)
    # Same weights; the loaded ones live in memory-mapped, unaligned storage, where the CPU kernels may sum in
    # another order, so the outputs agree to float32 rounding rather than bit for bit.
    with torch.no_grad():
        torch.testing.assert_close(transformer(**inputs).sample, tiny_transformer(**inputs).sample)
        torch.testing.assert_close(upsampler(lr, size=(6, 10)).sample, tiny_upsampler(lr, size=(6, 10)).sample)


def test_the_residual_stream_is_token_major_in_memory(tiny_transformer):
    # element-wise ops keep the layout of their first input: a transposed stream would make every norm and linear
    # layer of every block copy it first
    layouts = []
    for block in tiny_transformer.blocks:
        block.register_forward_hook(
            lambda module, args, out: layouts.append((args[0].is_contiguous(), out.is_contiguous()))
        )
    with torch.no_grad():
        tiny_transformer(**_inputs(batch=1))
    assert layouts == [(True, True)] * len(tiny_transformer.blocks)


def test_rope_is_relative_in_time(tiny_transformer):
    inputs = _inputs(batch=1, frames=4, height=6, width=8)
    with torch.no_grad():
        base = tiny_transformer(**inputs).sample
        shifted = tiny_transformer(**inputs, frame_offset=1000).sample
    torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-5)


def test_rope_matches_complex_rotation_reference():
    """Independent reference: RoPE as complex multiplication by exp(i * pos * freq) per axis."""
    grid, head_dim, theta = (3, 4, 5), 12, 10000.0
    x = torch.randn(1, 2, 60, head_dim, dtype=torch.float64)
    cos, sin = rope_cos_sin(grid, head_dim, theta)
    out = apply_rope(x.float(), rope_rotation(cos, sin)).double()
    t_dim, s_dim = head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6)
    t, h, w = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in grid), indexing="ij")
    angles = []
    for pos, dim in ((t, t_dim), (h, s_dim), (w, s_dim)):
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(pos.reshape(-1, 1) * freqs)
    angles = torch.cat(angles, dim=1)  # (N, head_dim / 2)
    reference = torch.view_as_real(
        torch.view_as_complex(x.reshape(1, 2, 60, -1, 2).contiguous()) * torch.polar(torch.ones_like(angles), angles)
    )
    torch.testing.assert_close(out, reference.reshape_as(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad_enabled", [True, False])
@pytest.mark.parametrize("heads_interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_rope_matches_the_norm_then_the_real_valued_rotation(dtype, heads_interleaved, grad_enabled):
    """x * w / sqrt(mean(x^2) + eps), then each channel pair rotated by the 2x2 matrix [[cos, -sin], [sin, cos]],
    in float64; bfloat16 input rounds once, at the end. Also for x a view of a projection's (B, N, heads, D) output
    and in inference mode, where the fused form works in place: on its own buffer, never on x."""
    grid, head_dim = (2, 3, 4), 12
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 24, head_dim, generator=g) * 4).to(dtype)
    if heads_interleaved:
        x = rearrange(x, "b h n d -> b n h d").contiguous().transpose(1, 2)
    original = x.clone()
    norm = torch.nn.RMSNorm(head_dim, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(head_dim, generator=g) + 0.5)
    cos, sin = rope_cos_sin(grid, head_dim)
    x64 = x.double()
    normed = x64 * norm.weight.double() / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    even, odd, c, s = normed[..., 0::2], normed[..., 1::2], cos[:, 0::2].double(), sin[:, 0::2].double()
    reference = torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2)
    with torch.set_grad_enabled(grad_enabled):
        out = rms_norm_rope(x, norm, rope_rotation(cos, sin))
    assert out.dtype == dtype and torch.equal(x, original)
    tolerance = 1e-5 if dtype == torch.float32 else 2**-8 * reference.abs().max().item()
    torch.testing.assert_close(out.double(), reference, rtol=0, atol=tolerance)


def test_rms_norm_rope_gradients_match_the_module_path_and_stay_finite_at_zero():
    """Training runs the fused form too: its gradients are those of nn.RMSNorm + apply_rope, also for an all-zero
    head vector (where a norm's own gradient is 0 / 0)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 24, 12, generator=g)
    x[0, 0, 3] = 0.0
    norm = torch.nn.RMSNorm(12, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(12, generator=g) + 0.5)
    rotation, upstream = rope_rotation(*rope_cos_sin((2, 3, 4), 12)), torch.randn(1, 2, 24, 12, generator=g)
    grads = []
    for forward in (lambda x: rms_norm_rope(x, norm, rotation), lambda x: apply_rope(norm(x), rotation)):
        leaf = x.clone().requires_grad_(True)
        norm.weight.grad = None
        (forward(leaf) * upstream).sum().backward()
        grads.append((leaf.grad, norm.weight.grad.clone()))
    assert all(torch.isfinite(grad).all() for pair in grads for grad in pair)
    for fused, module in zip(*grads):
        torch.testing.assert_close(fused, module, rtol=1e-4, atol=1e-5)


def test_a_hooked_or_wrapped_rms_norm_runs_through_the_module():
    """`normalize_and_rotate` fuses only the plain unhooked nn.RMSNorm; a hook's effect is kept."""
    norm = torch.nn.RMSNorm(12, eps=1e-6)
    x, rotation = torch.randn(1, 2, 24, 12), rope_rotation(*rope_cos_sin((2, 3, 4), 12))
    torch.testing.assert_close(normalize_and_rotate(norm, x, rotation), apply_rope(norm(x), rotation))
    norm.register_forward_hook(lambda module, args, out: out * 2)
    torch.testing.assert_close(normalize_and_rotate(norm, x, rotation), apply_rope(norm(x), rotation))
    torch.testing.assert_close(normalize_and_rotate(norm, x, rotation), 2 * rms_norm_rope(x, norm, rotation))


def test_self_attention_matches_naive_dense_reference(tiny_transformer):
    """The block's self-attention against a hand-written projection + RoPE + softmax."""
    attn = tiny_transformer.blocks[0].attn1
    grid = (2, 3, 4)
    x = torch.randn(2, 24, 24)
    cos, sin = rope_cos_sin(grid, 12)
    with torch.no_grad():
        out = attn(x, rotary_emb=rope_rotation(cos, sin), grid=grid)

        def rope(t):  # the real-valued form: pair (a, b) -> (a cos - b sin, b cos + a sin)
            a, b = t[..., 0::2], t[..., 1::2]
            c, s = cos[:, 0::2], sin[:, 0::2]
            return torch.stack([a * c - b * s, b * c + a * s], dim=-1).flatten(-2)

        def heads(t):
            return rearrange(t, "b n (h d) -> b h n d", h=2)

        def rms(t, weight):
            return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

        q = rope(rms(heads(x @ attn.to_q.weight.T + attn.to_q.bias), attn.norm_q.weight))
        k = rope(rms(heads(x @ attn.to_k.weight.T + attn.to_k.bias), attn.norm_k.weight))
        v = heads(x @ attn.to_v.weight.T + attn.to_v.bias)
        weights = torch.softmax(q @ k.transpose(-1, -2) / 12**0.5, dim=-1)
        reference = rearrange(weights @ v, "b h n d -> b n (h d)") @ attn.to_out[0].weight.T + attn.to_out[0].bias
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)


def test_text_mask_hides_padding_tokens(tiny_transformer):
    inputs = _inputs(batch=2, frames=2, height=6, width=6, text_len=5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        out = tiny_transformer(**inputs, encoder_attention_mask=mask).sample
        inputs["encoder_hidden_states"][0, 3:] = 100.0  # padding of sample 0 changes
        out2 = tiny_transformer(**inputs, encoder_attention_mask=mask).sample
    torch.testing.assert_close(out2, out)


def test_null_text_is_the_default_and_differs_from_a_prompt(tiny_transformer):
    inputs = _inputs(batch=2, frames=2, height=6, width=6)
    with torch.no_grad():
        prompt = tiny_transformer(**inputs).sample
        inputs["encoder_hidden_states"] = None
        null = tiny_transformer(**inputs).sample
        inputs["encoder_hidden_states"] = tiny_transformer.null_text_embeds(2, seq_len=9)
        null_long = tiny_transformer(**inputs).sample
    torch.testing.assert_close(null_long, null, rtol=1e-5, atol=1e-6)
    assert (prompt - null).abs().max() > 1e-4


def test_one_text_token_skips_the_queries_and_matches_full_cross_attention(tiny_transformer, monkeypatch):
    """With one key, cross-attention is that key's projected value for every query: the shortcut equals the full
    computation (and the same token twice, which takes the full path)."""
    import cascade_vsr.models.transformer as transformer_module

    inputs = _inputs(batch=2, frames=2, height=6, width=6, text_len=1)
    with torch.no_grad():
        shortcut = tiny_transformer(**inputs).sample
        twice = tiny_transformer(
            **(inputs | {"encoder_hidden_states": inputs["encoder_hidden_states"].repeat(1, 2, 1)})
        ).sample
        masked = tiny_transformer(**inputs, encoder_attention_mask=torch.ones(2, 1, dtype=torch.long)).sample
        monkeypatch.setattr(transformer_module, "attends_to_one_token", lambda encoder_hidden_states: False)
        full = tiny_transformer(**inputs).sample
    torch.testing.assert_close(shortcut, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(twice, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked, full, rtol=1e-5, atol=1e-6)
    assert (full - tiny_transformer.eval()(**(inputs | {"encoder_hidden_states": None})).sample).abs().max() > 1e-4
    assert not transformer_module.attends_to_one_token(inputs["encoder_hidden_states"])  # grad mode: full path


def test_attention_backend_passthrough_matches_default(tiny_transformer):
    inputs = _inputs(batch=1, frames=2, height=6, width=6)
    with torch.no_grad():
        default = tiny_transformer(**inputs).sample
        tiny_transformer.set_attention_backend("native")
        native = tiny_transformer(**inputs).sample
    torch.testing.assert_close(native, default, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(hidden_states=torch.randn(2, 3, 5, 17, 31)), "hidden_states.*4 channels"),
        (dict(condition=torch.randn(2, 4, 5, 17, 30)), "condition.*shape of `hidden_states`"),
        (dict(condition=torch.randn(2, 5, 5, 17, 31)), "condition.*4 channels"),
        (dict(hidden_states=torch.randn(2, 4, 17, 31)), "hidden_states.*5 dims"),
        (dict(timestep=torch.rand(3)), "timestep.*\\(1,\\) or \\(2,\\)"),
        (dict(noise_aug_level=torch.rand(2, 1)), "noise_aug_level"),
        (dict(encoder_hidden_states=torch.randn(3, 7, 16)), "encoder_hidden_states.*batch size must be 1 or 2"),
        (dict(encoder_hidden_states=torch.randn(2, 7, 15)), "encoder_hidden_states.*text_dim=16"),
        (dict(encoder_hidden_states=torch.randn(2, 16)), "encoder_hidden_states.*\\(B, L, text_dim\\)"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(tiny_transformer, change, match):
    inputs = _inputs()
    inputs.update(change)
    with pytest.raises(ValueError, match=match):
        tiny_transformer(**inputs)


def test_bad_mask_and_config():
    model = CascadeVSRTransformer3DModel(**TINY_TRANSFORMER)
    inputs = _inputs(batch=1, frames=1, height=4, width=4, text_len=3)
    with pytest.raises(ValueError, match="encoder_attention_mask.*shape"):
        model(**inputs, encoder_attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="encoder_attention_mask.*at least one"):
        model(**inputs, encoder_attention_mask=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="attention_mode"):
        CascadeVSRTransformer3DModel(**{**TINY_TRANSFORMER, "attention_mode": "nope"})
    with pytest.raises(ValueError, match="attention_mode.*list of 2"):
        CascadeVSRTransformer3DModel(**{**TINY_TRANSFORMER, "attention_mode": ["full"]})
    with pytest.raises(ValueError, match="attention_head_dim"):
        CascadeVSRTransformer3DModel(**{**TINY_TRANSFORMER, "attention_head_dim": 7})
    with pytest.raises(ValueError, match="condition_residual_std"):
        CascadeVSRTransformer3DModel(**{**TINY_TRANSFORMER, "condition_residual_std": 0.0})


@pytest.mark.parametrize("level", [0.0, 0.3])
def test_fresh_preconditioned_model_samples_around_the_condition(level):
    """With `condition_residual_std` the zero-initialised output is the Gaussian posterior velocity: one Euler step
    from pure noise lands exactly on the prior mean (the condition itself when it is clean), and the velocity stays
    finite at sigma = 0. A trained model only adds its residual to this."""
    model = CascadeVSRTransformer3DModel(**{**TINY_TRANSFORMER, "condition_residual_std": 0.05})
    noise, condition = torch.randn(2, 4, 2, 4, 6), torch.randn(2, 4, 2, 4, 6)
    with torch.no_grad():
        velocity = model(noise, condition, timestep=1000.0, noise_aug_level=level).sample
        at_zero = model(noise, condition, timestep=0.0, noise_aug_level=level).sample
    keep = (1 - level) / ((1 - level) ** 2 + level**2)
    torch.testing.assert_close(noise - velocity, keep * condition, atol=1e-6, rtol=1e-6)
    assert torch.isfinite(at_zero).all()


def test_preconditioned_model_ignores_the_pure_noise_of_the_first_step():
    """At sigma = 1, z_t carries no information: a (trained, here randomized) preconditioned model predicts the same
    clean latent whatever the noise, so identical input frames cannot come out different."""
    model = randomize_(CascadeVSRTransformer3DModel(**{**TINY_TRANSFORMER, "condition_residual_std": 0.05}))
    condition = torch.randn(1, 4, 3, 4, 6)
    with torch.no_grad():
        first, second = (
            noise - model(noise, condition, timestep=1000.0, noise_aug_level=0.1).sample
            for noise in (torch.randn_like(condition), torch.randn_like(condition))
        )
    torch.testing.assert_close(first, second, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(first, condition * 0.9 / 0.82, atol=1e-3)  # the prior mean plus a real residual


@pytest.mark.parametrize("patch_size", [(1, 2, 2), (2, 2, 2)])
def test_patch_padding_is_zeros_at_the_end_and_the_crop_keeps_exactly_the_real_region(patch_size):
    """Sizes the patch does not divide are padded inside the model and the output is cropped back. The padded pixels
    share tokens and attention with the real ones, so they do reach the real outputs; what the model promises is that
    the padding is zeros at the end of each axis and that the crop returns the real region: the output equals that of
    the same input zero-padded by hand to a size that needs no padding, cropped, in values and in input gradients."""
    model = randomize_(CascadeVSRTransformer3DModel(**{**TINY_TRANSFORMER, "patch_size": patch_size})).eval()
    inputs = _inputs(batch=1, frames=3, height=7, width=9)
    padding = (0, 1, 0, 1, 0, patch_size[0] - 1)  # to (3 or 4, 8, 10)
    padded = {
        **inputs,
        **{name: F.pad(inputs[name], padding) for name in ("hidden_states", "condition")},
    }
    weight = torch.randn(inputs["hidden_states"].shape)
    gradients = []
    for given in (inputs, padded):
        given["hidden_states"] = given["hidden_states"].clone().requires_grad_(True)
        out = model(**given).sample
        assert out.shape == given["hidden_states"].shape
        real = out[:, :, :3, :7, :9]
        (real * weight).sum().backward()
        gradients.append((real.detach(), given["hidden_states"].grad[:, :, :3, :7, :9]))
    (out, grad), (out_padded, grad_padded) = gradients
    torch.testing.assert_close(out, out_padded, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_padded, rtol=0, atol=0)
    # The padding values matter (so the equality above is no accident of an insensitive model): other values there
    # change the real region.
    padded["hidden_states"] = padded["hidden_states"].detach().clone()
    padded["hidden_states"][:, :, :, -1] = 5.0
    with torch.no_grad():
        changed = model(**padded).sample[:, :, :3, :7, :9]
    assert not torch.allclose(changed, out, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Attention modes (issue 3)
# ---------------------------------------------------------------------------------------------------------------

ATTENTION_CONFIGS = {
    "full": dict(attention_mode="full"),
    "full_temporal_units": dict(attention_mode="full", temporal_unit=5),
    "sparse_topk": dict(attention_mode="sparse_topk", sparse_window=(4, 5), sparse_topk=1, temporal_unit=5),
    "window": dict(attention_mode="window", window_reference=(6, 10)),
    "window_fixed": dict(attention_mode="window", window_size=(3, 4, 4)),
    "mixed": dict(attention_mode=["sparse_topk", "window"], sparse_window=(3, 3), sparse_topk=2),
}


@pytest.mark.parametrize("frames", [1, 20])
@pytest.mark.parametrize("name", sorted(ATTENTION_CONFIGS))
def test_every_attention_mode_runs_forward_and_backward_at_odd_sizes(name, frames):
    model = randomize_(CascadeVSRTransformer3DModel(**{**TINY_TRANSFORMER, **ATTENTION_CONFIGS[name]}))
    inputs = _inputs(batch=1, frames=frames, height=13, width=19)  # grid (frames, 7, 10)
    out = model(**inputs).sample
    assert out.shape == inputs["hidden_states"].shape and torch.isfinite(out).all()
    out.square().mean().backward()
    for pname, param in model.named_parameters():
        if pname != "null_text_embedding":  # unused: a prompt is given
            assert param.grad is not None and torch.isfinite(param.grad).all(), pname
    assert model.blocks[0].attn1.to_q.weight.grad.abs().sum() > 0


def test_attention_specs_come_from_the_config():
    model = CascadeVSRTransformer3DModel(
        **{**TINY_TRANSFORMER, "attention_mode": ["sparse_topk", "window"], "sparse_window": (6, 5)},
        sparse_topk=3,
        temporal_unit=4,
    )
    assert model.attention_specs == (
        AttentionSpec("sparse_topk", shift=False, window=(6, 5), topk=3, temporal_unit=4),
        AttentionSpec("window", shift=True, window=None, window_reference=(45, 80)),  # no temporal unit
    )
    assert all(spec.backend == "sdpa" for spec in model.attention_specs)


def _cross_attention_backends(model):
    return {block.attn2.processor._attention_backend for block in model.blocks}


def test_set_attention_backend_reaches_every_layer_and_sdpa_restores_the_default():
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    model = randomize_(
        CascadeVSRTransformer3DModel(**{**TINY_TRANSFORMER, "attention_mode": ["sparse_topk", "window"]})
    )
    inputs = _inputs(batch=1, frames=3, height=6, width=10)
    active = _AttentionBackendRegistry.get_active_backend()[0]
    with torch.no_grad():
        default = model(**inputs).sample
        model.set_attention_backend("flex")
        assert [spec.backend for spec in model.attention_specs] == ["flex", "flex"]
        assert _cross_attention_backends(model) == {AttentionBackendName.FLEX}
        assert _AttentionBackendRegistry.get_active_backend()[0] == active  # no process-wide side effect
        flex = model(**inputs).sample
        model.reset_attention_backend()
        assert [spec.backend for spec in model.attention_specs] == ["sdpa", "sdpa"]
        assert _cross_attention_backends(model) == {None}
        back = model(**inputs).sample
    torch.testing.assert_close(flex, default, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(back, default, rtol=0, atol=0)


@pytest.mark.parametrize(
    "config, backend, match",
    [
        (
            dict(attention_mode="window"),
            "flash",
            r"'flash' cannot .* layers 0, 1 \(mode 'window', which accepts 'sdpa', 'flex'\)",
        ),
        (
            dict(attention_mode=["full", "sparse_topk"]),
            "native",
            r"'native' cannot .* layer 1 \(mode 'sparse_topk', which accepts 'sdpa', 'flex'\)$",
        ),
        (
            dict(temporal_unit=2),
            "sage",
            r"layers 0, 1 \(mode 'full' with temporal_unit=2, which accepts 'sdpa', 'flex'\)",
        ),
        (dict(), "cuda", r"`backend` must be 'sdpa' or one of diffusers' attention backends .*'native'.*got 'cuda'"),
    ],
)
def test_a_backend_a_mode_cannot_use_raises_naming_the_layers_and_changes_nothing(config, backend, match):
    model = CascadeVSRTransformer3DModel(**{**TINY_TRANSFORMER, **config})
    specs = model.attention_specs
    with pytest.raises(ValueError, match=match):
        model.set_attention_backend(backend)
    assert model.attention_specs == specs and _cross_attention_backends(model) == {None}


def test_checkpoint_of_one_mode_loads_and_runs_with_another(tmp_path, tiny_transformer):
    tiny_transformer.save_pretrained(tmp_path / "full")
    inputs = _inputs(batch=1, frames=3, height=9, width=11)
    with torch.no_grad():
        reference = tiny_transformer(**inputs).sample
        for mode, options in [
            ("sparse_topk", dict(sparse_window=(2, 3), sparse_topk=1)),
            ("window", dict(window_size=(1, 2, 2))),
        ]:
            model = CascadeVSRTransformer3DModel.from_pretrained(tmp_path / "full", attention_mode=mode, **options)
            assert model.config.attention_mode == mode
            assert all(spec.mode == mode for spec in model.attention_specs)
            for name, tensor in model.state_dict().items():
                torch.testing.assert_close(tensor, tiny_transformer.state_dict()[name], rtol=0, atol=0)
            out = model(**inputs).sample
            assert torch.isfinite(out).all() and not torch.allclose(out, reference, atol=1e-6)
            # topk covering every unit / windows covering the grid give back full attention exactly.
        covering = CascadeVSRTransformer3DModel.from_pretrained(
            tmp_path / "full", attention_mode="sparse_topk", sparse_window=(2, 3), sparse_topk=100
        )
        torch.testing.assert_close(covering(**inputs).sample, reference, rtol=1e-4, atol=1e-5)
        covering.save_pretrained(tmp_path / "sparse")
        back = CascadeVSRTransformer3DModel.from_pretrained(tmp_path / "sparse", attention_mode="full")
        torch.testing.assert_close(back(**inputs).sample, reference, rtol=1e-5, atol=1e-6)


def test_temporal_unit_scopes_full_attention_layers(tiny_transformer):
    """With temporal_unit, full-attention layers see only their unit: frames beyond both (shifted and
    unshifted) units of frame 0 cannot change its output through a 2-layer model."""
    model = CascadeVSRTransformer3DModel(**{**TINY_TRANSFORMER, "temporal_unit": 2})
    model.load_state_dict(tiny_transformer.state_dict())
    inputs = _inputs(batch=1, frames=6, height=4, width=4)
    with torch.no_grad():
        out = model(**inputs).sample
        # layer 0 units {0,1} {2,3} {4,5}; layer 1 (shifted by 1) {0} {1,2} {3,4} {5}: frames 4-5 reach 3-5 only
        inputs["hidden_states"][:, :, 4:] += 3.0
        changed = model(**inputs).sample
    torch.testing.assert_close(changed[:, :, :3], out[:, :, :3], rtol=0, atol=0)
    assert not torch.allclose(changed[:, :, 3], out[:, :, 3])


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(sparse_window=(0, 9)), "sparse_window"),
        (dict(sparse_topk=-1), "sparse_topk"),
        (dict(temporal_unit=0), "temporal_unit"),
        (dict(window_size=(1, 2)), "window_size"),
        (dict(window_reference=(45, -1)), "window_reference"),
        (dict(ffn_activation="relu"), "ffn_activation"),
    ],
)
def test_bad_attention_config_raises_value_error(change, match):
    with pytest.raises(ValueError, match=match):
        CascadeVSRTransformer3DModel(**{**TINY_TRANSFORMER, **change})


@pytest.mark.parametrize("activation", ["gelu-approximate", "gelu"])
def test_ffn_activation_is_the_named_gelu(tiny_transformer, activation):
    """The feed-forward layer against hand-written GELUs: tanh form 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    and erf form 0.5 x (1 + erf(x / sqrt(2))). Both load the same weights; they differ as functions."""
    model = CascadeVSRTransformer3DModel(**{**TINY_TRANSFORMER, "ffn_activation": activation})
    model.load_state_dict(tiny_transformer.state_dict())
    ffn = model.blocks[0].ffn
    x = torch.randn(2, 5, 24, dtype=torch.float64) * 2
    hidden = x @ ffn.net[0].proj.weight.double().T + ffn.net[0].proj.bias.double()
    if activation == "gelu":
        gelu = 0.5 * hidden * (1 + torch.erf(hidden / 2**0.5))
    else:
        gelu = 0.5 * hidden * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (hidden + 0.044715 * hidden**3)))
    reference = gelu @ ffn.net[2].weight.double().T + ffn.net[2].bias.double()
    with torch.no_grad():
        torch.testing.assert_close(ffn(x.float()).double(), reference, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# No host-device synchronisation in the forward and backward passes
# ---------------------------------------------------------------------------------------------------------------


class _FailOnHostDeviceTraffic(TorchDispatchMode):
    """Fails on every op that moves values between the host and the device: one that reads a tensor's value into
    Python (`bool()`, `int()`, `.item()`, `.tolist()`, data-dependent shapes) or copies a tensor between the CPU
    and the device (`.to(device)` of a host tensor). On CUDA each of these waits for the GPU to finish its queue."""

    READS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "unique", "_unique2"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in self.READS:
            raise AssertionError(f"aten.{name} reads a device value on the host")
        if name in ("_to_copy", "copy_"):
            tensors = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            devices = {t.device.type for t in tensors} | (
                {torch.device(kwargs["device"]).type} if kwargs.get("device") else set()
            )
            if len(devices) > 1:
                raise AssertionError(f"aten.{name} copies between {sorted(devices)}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("frames", [1, 7])
@pytest.mark.parametrize("size", [(13, 19), (16, 20)])  # grid (frames, 7, 10) or (frames, 8, 10)
@pytest.mark.parametrize("name", sorted(ATTENTION_CONFIGS))
def test_forward_and_backward_never_synchronise_with_the_device(name, size, frames):
    """There is no CPU counterpart of `torch.cuda.set_sync_debug_mode`, so the model runs on the "meta" device, which
    has shapes but no values: any Python `if` / `int()` / `bool()` / `.item()` on a device tensor fails there, and the
    dispatch mode above also catches host <-> device copies. Only host tensors (the CPU inputs of other tests) may have
    their values checked. Inputs: Python numbers for the per-sample values, a text mask, grids that cut into ragged and
    into whole units and windows (the sparse mode takes other paths when no key needs masking)."""
    with torch.device("meta"):
        model = CascadeVSRTransformer3DModel(**{**TINY_TRANSFORMER, **ATTENTION_CONFIGS[name]})
    shape = (2, 4, frames, *size)  # ragged and whole sparse units and windows
    inputs = dict(
        hidden_states=torch.empty(shape, device="meta", requires_grad=True),
        condition=torch.empty(shape, device="meta"),
        timestep=torch.empty(2, device="meta"),
        noise_aug_level=0.3,
        encoder_hidden_states=torch.empty(1, 5, 16, device="meta"),
        encoder_attention_mask=torch.ones(1, 5, dtype=torch.bool, device="meta"),
    )
    with _FailOnHostDeviceTraffic():
        out = model(**inputs, frame_offset=2.0).sample
        out.sum().backward()
        with torch.no_grad():  # the sparse gather writes in place without autograd
            inference = model(**{**inputs, "timestep": 500.0}).sample
    assert out.shape == inference.shape == inputs["hidden_states"].grad.shape == shape


# ---------------------------------------------------------------------------------------------------------------
# RoPE tables
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid, frame_offset", [((3, 4, 5), 0.0), ((2, 7, 9), 1000.0), ((1, 1, 6), 12345.5)])
def test_rope_tables_round_the_float64_angle_of_every_token_once(grid, frame_offset):
    """Reference: the angle of every (token, channel) in float64 from the token's coordinates, its cos / sin in float64
    and one rounding to float32. The per-axis tables must give exactly these numbers."""
    head_dim, theta = 32, 10000.0
    t_dim, s_dim = head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6)
    t, h, w = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in grid), indexing="ij")
    angles = []
    for pos, dim in ((t + frame_offset, t_dim), (h, s_dim), (w, s_dim)):
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append((pos.reshape(-1, 1) * freqs).repeat_interleave(2, dim=-1))
    angles = torch.cat(angles, dim=1)
    cos, sin = rope_cos_sin(grid, head_dim, theta, frame_offset)
    assert cos.dtype == sin.dtype == torch.float32
    assert torch.equal(cos, angles.cos().float()) and torch.equal(sin, angles.sin().float())


def test_rope_module_keeps_the_tables_of_the_last_grid_and_offset():
    rope = RotaryPositionEmbedding3D(12)
    first = rope((2, 3, 4), 0.0)
    assert rope((2, 3, 4), 0.0) is first  # the steps of a sampler at one size build it once
    for grid, offset in (((2, 3, 5), 0.0), ((2, 3, 4), 1.0)):
        other = rope(grid, offset)
        assert other is not first
        assert torch.equal(other, rope_rotation(*rope_cos_sin(grid, 12, frame_offset=offset)))
    assert not list(rope.parameters()) and not list(rope.buffers())


def test_rope_tables_built_under_inference_mode_do_not_break_a_later_backward(tiny_transformer):
    inputs = _inputs(batch=1, frames=2, height=6, width=6)
    with torch.inference_mode():
        tiny_transformer(**inputs)
    tiny_transformer(**inputs).sample.sum().backward()  # same grid: the inference-mode tables must not be reused
    assert tiny_transformer.blocks[0].attn1.to_q.weight.grad is not None


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(frame_offset=torch.tensor(1.0)), "frame_offset.*real number"),
        (dict(frame_offset=float("nan")), "frame_offset"),
        (dict(attention_kwargs={"scale": 0.5, "heads": 2}), "attention_kwargs.*only the key .scale.*heads"),
    ],
)
def test_bad_call_options_raise_value_errors(tiny_transformer, change, match):
    with pytest.raises(ValueError, match=match):
        tiny_transformer(**_inputs(batch=1, frames=1, height=4, width=4), **change)
