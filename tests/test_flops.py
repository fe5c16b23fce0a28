"""The analytic FLOP count against torch's FlopCounterMode on a tiny model."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cascade_vsr import CascadeVSRTransformer3DModel
from cascade_vsr.models.flops import transformer_flops

from .conftest import TINY_TRANSFORMER


def _measured_flops(model, latent_shape, text_len):
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(latent_shape, generator=g),
        condition=torch.randn(latent_shape, generator=g),
        timestep=torch.full((latent_shape[0],), 500.0),
        noise_aug_level=torch.full((latent_shape[0],), 0.4),
        encoder_hidden_states=torch.randn(latent_shape[0], text_len, model.config.text_dim, generator=g),
    )
    # CPU's fused SDPA kernel (_scaled_dot_product_flash_attention_for_cpu) has no FlopCounterMode formula;
    # the math backend runs QK^T and AV as plain bmm's, which it counts.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**inputs)
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "config,latent_shape",
    [
        (dict(attention_mode="full"), (2, 4, 3, 9, 13)),  # odd sizes: the patch pads to a (3, 5, 7) grid
        (dict(attention_mode="full", temporal_unit=2), (1, 4, 5, 6, 8)),
        (dict(attention_mode="sparse_topk", sparse_window=(2, 3), sparse_topk=2, temporal_unit=2), (1, 4, 5, 9, 13)),
        (dict(attention_mode="window", window_size=(2, 2, 3)), (1, 4, 3, 9, 13)),
        (dict(attention_mode=["window", "sparse_topk"], window_reference=(4, 6)), (1, 4, 3, 9, 13)),
    ],
)
def test_analytic_flops_equal_flop_counter(config, latent_shape):
    model = CascadeVSRTransformer3DModel(**{**TINY_TRANSFORMER, **config}).eval()
    expected = transformer_flops(model.config, latent_shape, text_len=7)
    assert expected["total"] == _measured_flops(model, latent_shape, text_len=7)


def test_flop_breakdown_is_consistent_and_modes_rank_as_expected():
    with torch.device("meta"):
        config = dict(CascadeVSRTransformer3DModel().config)
    shape = (1, 16, 5, 136, 240)  # 17 frames of 1088 x 1920 with Wan's VAE
    full = transformer_flops(config, shape, attention_mode="full")
    sparse = transformer_flops(config, shape, attention_mode="sparse_topk")
    window = transformer_flops(config, shape, attention_mode="window")
    for flops in (full, sparse, window):
        parts = ("embeddings", "linear", "self_attention", "topk_scoring", "cross_attention")
        assert flops["total"] == sum(flops[p] for p in parts)
    assert full["linear"] == sparse["linear"] == window["linear"]
    assert sparse["total"] < window["total"] < full["total"]
    assert sparse["attention"] <= 0.05 * sparse["total"]
    assert full["topk_scoring"] == window["topk_scoring"] == 0 < sparse["topk_scoring"]


def test_bad_flops_arguments():
    config = dict(CascadeVSRTransformer3DModel(**TINY_TRANSFORMER).config)
    with pytest.raises(ValueError, match="latent_shape"):
        transformer_flops(config, (1, 3, 2, 4, 4))
    with pytest.raises(ValueError, match="attention_mode"):
        transformer_flops(config, (1, 4, 2, 4, 4), attention_mode=["full"])
    with pytest.raises(ValueError, match="attention_mode"):
        transformer_flops(config, (1, 4, 2, 4, 4), attention_mode="swin")
