"""Upstream latent adapters: exact layout round trips, and (de)normalization equal to each upstream pipeline's
own lines in diffusers (checked against the pipelines' static helpers and decode methods where they exist)."""

from __future__ import annotations

import pytest
import torch
from diffusers import CogVideoXPipeline, LTXPipeline

from cascade_vsr import testing as tu
from cascade_vsr.pipelines.adapters import FAMILIES, get_adapter


@pytest.fixture(scope="module")
def vaes():
    return {
        "wan": tu.tiny_wan_vae(),
        "cogvideox": tu.tiny_cogvideox_vae(),
        "hunyuan_video": tu.tiny_hunyuan_vae(),
        "ltx_video": tu.tiny_ltx_vae(),
        "mochi": tu.tiny_mochi_vae(),
        "wan_z48": tu.tiny_wan_ti2v_vae(),  # Wan 2.2 TI2V
    }


def _model_latents(adapter, frames=3, height=4, width=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, adapter.latent_channels, frames, height, width, generator=generator)


def test_get_adapter_by_name_pipeline_and_vae(vaes):
    expected = {  # name: (channels, temporal, spatial) of the released models
        "wan": (16, 4, 8),
        "cogvideox": (16, 4, 8),
        "hunyuan_video": (16, 4, 8),
        "ltx_video": (128, 8, 32),
        "mochi": (12, 6, 8),
    }
    for name in FAMILIES:
        adapter = get_adapter(name)
        assert adapter.name == name
        geometry = (adapter.latent_channels, adapter.temporal_compression, adapter.spatial_compression)
        assert geometry == expected[name]
        assert get_adapter(vaes[name]).name == name
    assert get_adapter("wan_z48").latent_channels == 48 and get_adapter("wan_z48").spatial_compression == 16
    # From a VAE, the geometry comes from its config (the tiny test VAEs differ from the released ones).
    assert get_adapter(vaes["cogvideox"]).latent_channels == 4
    assert (
        get_adapter(vaes["ltx_video"]).spatial_compression,
        get_adapter(vaes["ltx_video"]).temporal_compression,
    ) == (4, 4)
    pipe = tu.tiny_cogvideox_pipeline()
    assert get_adapter(pipe).name == "cogvideox"
    pipe.vae = None
    assert get_adapter(pipe).name == "cogvideox"  # by pipeline class when loaded without a VAE


@pytest.mark.parametrize("bad", ["sdxl", 3, torch.nn.Linear(2, 2)])
def test_get_adapter_rejects_unknown_upstream(bad):
    with pytest.raises(ValueError, match="upstream"):
        get_adapter(bad)


@pytest.mark.parametrize("name", [*FAMILIES, "wan_z48"])
def test_layout_round_trip_is_exact(name):
    adapter = get_adapter(name)
    z = _model_latents(adapter, frames=2, height=3, width=5)
    upstream = adapter.from_model(z)
    shape = dict(latent_num_frames=2, latent_height=3, latent_width=5)
    assert torch.equal(adapter.to_model(upstream, **shape), z)
    assert torch.equal(adapter.from_model(adapter.to_model(upstream, **shape)), upstream)


def test_cogvideox_layout_matches_its_decode_path():
    adapter = get_adapter("cogvideox")
    z = _model_latents(adapter)
    assert adapter.from_model(z).shape == (2, 3, 16, 4, 6)
    assert torch.equal(adapter.from_model(z), z.permute(0, 2, 1, 3, 4))


@pytest.mark.parametrize("patch", [(1, 1), (2, 1), (2, 2)])
def test_ltx_packing_matches_ltx_pipeline(patch):
    patch_size, patch_size_t = patch
    adapter = get_adapter("ltx_video")
    adapter.patch_size, adapter.patch_size_t = patch_size, patch_size_t
    z = _model_latents(adapter, frames=2, height=4, width=6)
    packed = LTXPipeline._pack_latents(z, patch_size, patch_size_t)
    assert torch.equal(adapter.from_model(z), packed)
    unpacked = LTXPipeline._unpack_latents(
        packed, 2 // patch_size_t, 4 // patch_size, 6 // patch_size, patch_size, patch_size_t
    )
    assert torch.equal(adapter.to_model(packed, latent_num_frames=2, latent_height=4, latent_width=6), unpacked)
    # pixel sizes of the upstream call give the same grid: 9 frames -> 2, 128 x 192 px -> 4 x 6 latents
    assert torch.equal(adapter.to_model(packed, num_frames=9, height=128, width=192), z)


def test_ltx_packed_latents_need_their_grid():
    adapter = get_adapter("ltx_video")
    packed = adapter.from_model(_model_latents(adapter, frames=2, height=4, width=6))
    with pytest.raises(ValueError, match="num_frames"):
        adapter.to_model(packed)
    with pytest.raises(ValueError, match="lr_latents"):
        adapter.to_model(packed, latent_num_frames=2, latent_height=4, latent_width=5)


@pytest.mark.parametrize("name", [*FAMILIES, "wan_z48"])
def test_normalization_round_trip(vaes, name):
    vae = vaes[name]
    adapter = get_adapter(vae)
    if name in ("ltx_video",):  # fresh LTX VAEs have mean 0 / std 1: make the check non-trivial
        with torch.no_grad():
            vae.latents_mean.copy_(torch.linspace(-1, 1, adapter.latent_channels))
            vae.latents_std.copy_(torch.linspace(0.5, 2, adapter.latent_channels))
    z = _model_latents(adapter)
    raw = adapter.to_vae(z, vae)
    assert not torch.allclose(raw, z)
    torch.testing.assert_close(adapter.from_vae(raw, vae), z, rtol=1e-5, atol=1e-5)


def test_denormalization_equals_upstream_lines(vaes):
    # Wan (pipeline_wan.py): latents / (1 / std) + mean
    vae = vaes["wan"]
    z = _model_latents(get_adapter(vae))
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    assert torch.equal(get_adapter(vae).to_vae(z, vae), z / (1.0 / std) + mean)
    # LTX: the pipeline's own static helper
    vae = vaes["ltx_video"]
    z = _model_latents(get_adapter(vae))
    expected = LTXPipeline._denormalize_latents(z, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    assert torch.equal(get_adapter(vae).to_vae(z, vae), expected)
    # HunyuanVideo: / 0.476986 (its scaling factor)
    vae = vaes["hunyuan_video"]
    z = _model_latents(get_adapter(vae))
    assert torch.equal(get_adapter(vae).to_vae(z, vae), z / 0.476986)
    # Mochi: * std / scaling_factor + mean
    vae = vaes["mochi"]
    z = _model_latents(get_adapter(vae))
    mean = torch.tensor(vae.config.latents_mean).view(1, 12, 1, 1, 1).float()
    std = torch.tensor(vae.config.latents_std).view(1, 12, 1, 1, 1).float()
    torch.testing.assert_close(get_adapter(vae).to_vae(z, vae), z * std / vae.config.scaling_factor + mean)


@torch.no_grad()
def test_cogvideox_decode_equals_pipeline_decode_latents():
    pipe = tu.tiny_cogvideox_pipeline()
    adapter = get_adapter(pipe)
    z = _model_latents(adapter, frames=2, height=2, width=2)
    assert isinstance(pipe, CogVideoXPipeline)
    expected = pipe.decode_latents(adapter.from_model(z))
    assert torch.equal(adapter.decode(pipe.vae, z), expected)


@pytest.mark.parametrize("name", [*FAMILIES, "wan_z48"])
@torch.no_grad()
def test_encode_decode_shapes_and_frame_rule(vaes, name):
    vae = vaes[name]
    adapter = get_adapter(vae)
    tc, sc = adapter.temporal_compression, adapter.spatial_compression
    num_frames = 2 * tc + 1  # 3 latent frames (CogVideoX's decoder needs an odd latent count)
    video = torch.rand(1, 3, num_frames, 2 * sc, 3 * sc) * 2 - 1
    latents = adapter.encode(vae, video)
    assert latents.shape == (1, adapter.latent_channels, 3, 2, 3)
    decoded = adapter.decode(vae, latents)
    assert decoded.shape == (1, 3, num_frames, 2 * sc, 3 * sc)
    with pytest.raises(ValueError, match="video frames"):
        adapter.encode(vae, video[:, :, :2])
    with pytest.raises(ValueError, match="video"):
        adapter.encode(vae, video[:, :1])


@pytest.mark.parametrize("num_frames, ok", [(1, True), (5, True), (9, True), (4, False), (0, False), (6, False)])
def test_check_num_frames(num_frames, ok):
    adapter = get_adapter("wan")
    if ok:
        assert adapter.check_num_frames(num_frames) == num_frames
        assert adapter.num_pixel_frames(adapter.num_latent_frames(num_frames)) == num_frames
    else:
        with pytest.raises(ValueError, match="4k\\+1"):
            adapter.check_num_frames(num_frames)


def test_to_model_rejects_wrong_channels():
    with pytest.raises(ValueError, match="16 channels"):
        get_adapter("wan").to_model(torch.zeros(1, 4, 2, 3, 3))
    with pytest.raises(ValueError, match="C=16"):
        get_adapter("cogvideox").to_model(torch.zeros(1, 16, 2, 3, 3))
