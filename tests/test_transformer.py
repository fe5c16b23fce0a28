import json

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from cascade_vsr import CascadeVSRTransformer3DModel, LatentUpsampler3D
from cascade_vsr.models.transformer import apply_rope, rope_cos_sin

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
    up = tiny_upsampler(lr, size=(17, 31))  # 1.89x and 1.94x
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
    inputs["condition"] = upsampler(lr, size=(11, 17))
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
        torch.testing.assert_close(upsampler(lr, size=(6, 10)), tiny_upsampler(lr, size=(6, 10)))


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
    out = apply_rope(x.float(), cos, sin).double()
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


def test_self_attention_matches_naive_dense_reference(tiny_transformer):
    """The block's self-attention against a hand-written projection + RoPE + softmax."""
    attn = tiny_transformer.blocks[0].attn1
    grid = (2, 3, 4)
    x = torch.randn(2, 24, 24)
    cos, sin = rope_cos_sin(grid, 12)
    with torch.no_grad():
        out = attn(x, rotary_emb=(cos, sin), grid=grid)

        def heads(t):
            return rearrange(t, "b n (h d) -> b h n d", h=2)

        def rms(t, weight):
            return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

        q = apply_rope(rms(heads(x @ attn.to_q.weight.T + attn.to_q.bias), attn.norm_q.weight), cos, sin)
        k = apply_rope(rms(heads(x @ attn.to_k.weight.T + attn.to_k.bias), attn.norm_k.weight), cos, sin)
        v = heads(x @ attn.to_v.weight.T + attn.to_v.bias)
        weights = torch.softmax(q @ k.transpose(-1, -2) / 12**0.5, dim=-1)
        reference = rearrange(weights @ v, "b h n d -> b n (h d)") @ attn.to_out.weight.T + attn.to_out.bias
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


def test_patch_padding_is_cropped_and_does_not_leak_across_the_crop(tiny_transformer):
    """Odd sizes are padded inside; the output has exactly the input size and is finite."""
    inputs = _inputs(batch=1, frames=3, height=7, width=9)
    out = tiny_transformer(**inputs).sample
    assert out.shape == inputs["hidden_states"].shape
    loss = F.mse_loss(out, torch.zeros_like(out))
    loss.backward()


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


def test_attention_options_come_from_the_config():
    model = CascadeVSRTransformer3DModel(
        **{**TINY_TRANSFORMER, "attention_mode": ["sparse_topk", "window"], "sparse_window": (6, 5)},
        sparse_topk=3,
        temporal_unit=4,
    )
    first, second = (block.attn1 for block in model.blocks)
    assert first.attention_options == {"window": (6, 5), "topk": 3, "temporal_unit": 4} and not first.shift
    assert second.attention_options == {"window": None, "window_reference": (45, 80)} and second.shift
    model.set_local_attention_backend("flex")
    assert first.attention_options["backend"] == "flex" == second.attention_options["backend"]
    with pytest.raises(ValueError, match="backend"):
        model.set_local_attention_backend("cuda")


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
            assert all(block.attn1.attention_mode == mode for block in model.blocks)
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
    ],
)
def test_bad_attention_config_raises_value_error(change, match):
    with pytest.raises(ValueError, match=match):
        CascadeVSRTransformer3DModel(**{**TINY_TRANSFORMER, **change})
