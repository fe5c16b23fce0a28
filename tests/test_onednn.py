"""The fused CPU paths of the transformer block against hand-written float64 references, and where they must fall
back to the modules."""

import pytest
import torch
import torch.nn as nn
from diffusers.models.attention import FeedForward
from peft import LoraConfig, inject_adapter_in_model

from cascade_vsr import CascadeVSRTransformer3DModel
from cascade_vsr.models import onednn
from cascade_vsr.models.onednn import feed_forward, fused_linear_applies, linear_projections
from cascade_vsr.models.transformer import modulated_layer_norm

from .conftest import TINY_TRANSFORMER, randomize_

requires_onednn = pytest.mark.skipif(onednn._onednn_linear() is None, reason="this torch build has no oneDNN linear")


def _erf_gelu(x):
    return 0.5 * x * (1 + torch.erf(x / 2**0.5))


def _tanh_gelu(x):
    return 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))


def _ffn(activation="gelu", dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    return FeedForward(24, inner_dim=40, activation_fn=activation).eval().to(dtype)


class _CountCalls:
    """Counts the calls of oneDNN's fused linear op made through `onednn`."""

    def __init__(self, monkeypatch):
        self.calls = []
        op = onednn._onednn_linear()

        def counted(*args):
            self.calls.append(args[3:])
            return op(*args)

        monkeypatch.setattr(onednn, "_onednn_linear", lambda: counted)


@requires_onednn
@pytest.mark.parametrize(
    ("activation", "reference_gelu", "algorithm"),
    [("gelu", _erf_gelu, "none"), ("gelu-approximate", _tanh_gelu, "tanh")],
)
def test_fused_feed_forward_matches_a_float64_reference_in_one_call_per_layer(
    monkeypatch, activation, reference_gelu, algorithm
):
    ffn = _ffn(activation)
    x = torch.randn(2, 37, 24, generator=torch.Generator().manual_seed(1)).bfloat16()
    up, down = ffn.net[0].proj, ffn.net[2]
    hidden = reference_gelu(x.double() @ up.weight.double().T + up.bias.double())
    reference = hidden @ down.weight.double().T + down.bias.double()
    counter = _CountCalls(monkeypatch)
    with torch.no_grad():
        out = feed_forward(ffn, x)
        module_out = ffn(x)
    # bias and GELU fused into the first product (the two GELUs differ below bfloat16's resolution: the call says which)
    assert counter.calls == [("gelu", [], algorithm), ("none", [], "")]
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    # bfloat16 rounds the hidden activations once (after the GELU) instead of twice (before and after)
    error, module_error = ((y.double() - reference).abs().max() for y in (out, module_out))
    assert error <= max(module_error, 1e-3) * 1.5, (error, module_error)


@requires_onednn
def test_linear_projections_match_a_float64_reference_in_one_call(monkeypatch):
    """Query, key and value projections of one input: one oneDNN call over the concatenated weights, each output the
    float64 product plus bias rounded once to bfloat16."""
    torch.manual_seed(0)
    layers = [nn.Linear(24, width).bfloat16() for width in (16, 16, 8)]
    x = torch.randn(2, 37, 24, generator=torch.Generator().manual_seed(1)).bfloat16()
    counter = _CountCalls(monkeypatch)
    with torch.no_grad():
        outputs = linear_projections(x, *layers)
    assert counter.calls == [("none", [], "")]
    for out, layer in zip(outputs, layers):
        reference = x.double() @ layer.weight.double().T + layer.bias.double()
        assert out.dtype == torch.bfloat16 and out.shape == (2, 37, layer.out_features)
        torch.testing.assert_close(out.double(), reference, rtol=2**-8, atol=1e-3)


def test_linear_projections_fall_back_to_the_modules(monkeypatch):
    """Autograd, a layer without bias among layers with one, and a LoRA-wrapped layer run each module, value for
    value."""
    counter = _CountCalls(monkeypatch) if onednn._onednn_linear() is not None else None
    torch.manual_seed(0)
    x = torch.randn(2, 7, 24).bfloat16()
    layers = [nn.Linear(24, 16).bfloat16(), nn.Linear(24, 16, bias=False).bfloat16()]
    for out, layer in zip(linear_projections(x, *layers), layers):  # grad mode is on
        torch.testing.assert_close(out, layer(x), rtol=0, atol=0)
    with torch.no_grad():
        for out, layer in zip(linear_projections(x, *layers), layers):
            torch.testing.assert_close(out, layer(x), rtol=0, atol=0)
        lora = inject_adapter_in_model(LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False), _ffn())
        lora.bfloat16()
        (out,) = linear_projections(x, lora.net[0].proj)
        torch.testing.assert_close(out, lora.net[0].proj(x), rtol=0, atol=0)
    if counter is not None:
        assert counter.calls == []


def test_fused_paths_fall_back_to_the_modules(monkeypatch):
    """Autograd, float32, a hooked layer, dropout in training mode and a LoRA-wrapped layer all run the modules, value
    for value."""
    counter = _CountCalls(monkeypatch) if onednn._onednn_linear() is not None else None
    ffn = _ffn()
    x = torch.randn(2, 7, 24).bfloat16()
    assert not fused_linear_applies(x, ffn.net[2])  # grad mode is on
    torch.testing.assert_close(feed_forward(ffn, x), ffn(x), rtol=0, atol=0)

    with torch.no_grad():
        ffn32 = _ffn(dtype=torch.float32)
        torch.testing.assert_close(feed_forward(ffn32, x.float()), ffn32(x.float()), rtol=0, atol=0)

        hooked = _ffn()
        hooked.net[2].register_forward_hook(lambda module, args, out: out * 2)
        assert not fused_linear_applies(x, hooked.net[2])
        torch.testing.assert_close(feed_forward(hooked, x), hooked(x), rtol=0, atol=0)

        dropping = FeedForward(24, inner_dim=40, activation_fn="gelu", dropout=0.5).train().bfloat16()
        torch.manual_seed(0)
        expected = dropping(x)
        torch.manual_seed(0)
        torch.testing.assert_close(feed_forward(dropping, x), expected, rtol=0, atol=0)

        lora = inject_adapter_in_model(LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False), _ffn())
        lora.bfloat16()
        assert not fused_linear_applies(x, lora.net[0].proj)
        torch.testing.assert_close(feed_forward(lora, x), lora(x), rtol=0, atol=0)
    if counter is not None:
        assert counter.calls == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
def test_modulated_layer_norm_matches_the_adaln_formula(batch, dtype):
    """norm(x) * (1 + scale) + shift, the norm written out in float64 and rounded once to `dtype`; one sample takes
    the fused LayerNorm (in bfloat16 straight from the bfloat16 input)."""
    g = torch.Generator().manual_seed(batch)
    x = (torch.randn(batch, 11, 16, generator=g) * 3 + 1).to(dtype)
    shift, scale = torch.randn(batch, 1, 16, generator=g), torch.randn(batch, 1, 16, generator=g)
    x64 = x.double()
    normed = (x64 - x64.mean(-1, keepdim=True)) / torch.sqrt(x64.var(-1, unbiased=False, keepdim=True) + 1e-6)
    reference = normed * (1 + scale.double()) + shift.double()
    norm = nn.LayerNorm(16, eps=1e-6, elementwise_affine=False)
    out = modulated_layer_norm(norm, x, shift, scale, dtype)
    assert out.dtype == dtype
    bfloat16_rounding = 2**-8 * reference.abs().max().item()
    torch.testing.assert_close(
        out.double(), reference, rtol=0, atol=1e-5 if dtype == torch.float32 else bfloat16_rounding
    )
    # float32 input, bfloat16 output (the block's second norm reads its float32 residual)
    torch.testing.assert_close(
        modulated_layer_norm(norm, x.float(), shift, scale, torch.bfloat16).double(),
        reference,
        rtol=0,
        atol=2**-8 * 12,
    )


@requires_onednn
def test_bfloat16_model_with_the_fused_paths_stays_close_to_float32():
    """The whole model in bfloat16 (fused where they apply) against the same weights in float32."""
    model = randomize_(CascadeVSRTransformer3DModel(**TINY_TRANSFORMER)).eval()
    g = torch.Generator().manual_seed(0)
    hidden, condition = torch.randn(1, 4, 3, 8, 10, generator=g), torch.randn(1, 4, 3, 8, 10, generator=g)
    with torch.no_grad():
        reference = model(hidden, condition, 500.0, 0.1).sample
        model.bfloat16()
        out = model(hidden.bfloat16(), condition.bfloat16(), 500.0, 0.1).sample.float()
    assert (out - reference).norm() / reference.norm() < 0.03
