"""The adversarial post-training discriminator: starts from the transformer, reads its blocks, saves and loads."""

from __future__ import annotations

import pytest
import torch

from cascade_vsr.models.discriminator import CascadeVSRDiscriminator, default_head_layers
from cascade_vsr.models.transformer import CascadeVSRTransformer3DModel

from .conftest import TINY_TRANSFORMER, randomize_


@pytest.fixture
def transformer():
    torch.manual_seed(0)
    return randomize_(CascadeVSRTransformer3DModel(**{**TINY_TRANSFORMER, "num_layers": 3}), std=0.1)


def inputs(batch: int = 2):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 4, 2, 4, 6, generator=generator)
    condition = torch.randn(batch, 4, 2, 4, 6, generator=generator)
    return sample, condition


def test_default_head_layers_follow_seedvr2_depths():
    assert default_head_layers(36) == (16, 26, 36)
    assert default_head_layers(5) == (2, 4, 5)
    assert default_head_layers(1) == (1,)


def test_discriminator_starts_from_the_transformer_and_reads_its_block_outputs(transformer):
    discriminator = CascadeVSRDiscriminator.from_transformer(transformer, head_layers=(1, 3))
    trunk_state, state = discriminator.trunk.state_dict(), transformer.state_dict()
    assert trunk_state.keys() == state.keys() and all(torch.equal(trunk_state[k], state[k]) for k in state)

    sample, condition = inputs()
    expected = {}
    hooks = [
        transformer.blocks[i].register_forward_hook(lambda m, a, out, i=i: expected.__setitem__(i + 1, out))
        for i in (0, 2)
    ]
    transformer(sample, condition, timestep=0.0, noise_aug_level=0.1)
    for hook in hooks:
        hook.remove()
    out = discriminator(sample, condition, timestep=0.0, noise_aug_level=0.1)
    assert out.logits.shape == (2, 2)
    for features, layer in zip(out.features, (1, 3)):
        torch.testing.assert_close(features, expected[layer])
    # each head's logit is its own function of its features (an independent recomputation)
    head = discriminator.heads[1]
    queries = head.queries.expand(2, -1, -1)
    keys = head.norm_tokens(out.features[1])
    attended = head.attention(queries, keys, keys)[0]
    torch.testing.assert_close(out.logits[:, 1], head.proj(head.norm_out(queries + attended)).mean(dim=(1, 2)))
    # the hooks are removed after the call
    assert all(not block._forward_hooks for block in discriminator.trunk.blocks)


def test_logits_are_per_sample(transformer):
    discriminator = CascadeVSRDiscriminator.from_transformer(transformer)
    sample, condition = inputs()
    both = discriminator(sample, condition, timestep=0.0, noise_aug_level=0.1).logits
    first = discriminator(sample[:1], condition[:1], timestep=0.0, noise_aug_level=0.1).logits
    torch.testing.assert_close(both[:1], first, atol=1e-5, rtol=1e-5)


def test_save_and_load(transformer, tmp_path):
    discriminator = CascadeVSRDiscriminator.from_transformer(transformer, head_layers=(2, 3), num_queries=2)
    discriminator.save_pretrained(tmp_path)
    loaded = CascadeVSRDiscriminator.from_pretrained(tmp_path)
    assert loaded.head_layers == (2, 3)
    sample, condition = inputs()
    torch.testing.assert_close(
        loaded(sample, condition, 0.0, 0.1).logits, discriminator(sample, condition, 0.0, 0.1).logits
    )


@pytest.mark.parametrize(
    "kwargs, match", [(dict(head_layers=(0,)), "head_layers"), (dict(num_queries=0), "num_queries")]
)
def test_bad_arguments(transformer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        CascadeVSRDiscriminator.from_transformer(transformer, **kwargs)
