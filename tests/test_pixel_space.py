"""The pipeline in pixel space through the lossless SpaceToDepthAutoencoder (issue 7's demo path)."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from cascade_vsr import CascadeVSRPipeline, CascadeVSRTransformer3DModel, LatentUpsampler3D, SpaceToDepthAutoencoder
from cascade_vsr.pipelines.adapters import SpaceToDepthAdapter, get_adapter
from tests.conftest import randomize_


def _pipe() -> CascadeVSRPipeline:
    torch.manual_seed(0)
    transformer = CascadeVSRTransformer3DModel(
        latent_channels=48,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=12,
        ffn_dim=32,
        text_dim=16,
        latent_space="space_to_depth",
    )
    upsampler = LatentUpsampler3D(latent_channels=48, hidden_channels=16, num_blocks=1)
    pipe = CascadeVSRPipeline(
        upsampler=randomize_(upsampler),
        transformer=randomize_(transformer, seed=1),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=SpaceToDepthAutoencoder(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_adapter_is_found_from_the_vae_and_by_name():
    vae = SpaceToDepthAutoencoder()
    for upstream in (vae, "space_to_depth"):
        adapter = get_adapter(upstream)
        assert isinstance(adapter, SpaceToDepthAdapter)
        assert (adapter.latent_channels, adapter.temporal_compression, adapter.spatial_compression) == (48, 1, 4)
    adapter.check_num_frames(6)  # no temporal compression: any frame count
    video = torch.rand(1, 3, 6, 16, 24) * 2 - 1
    torch.testing.assert_close(adapter.decode(vae, adapter.encode(vae, video)), video, rtol=0, atol=0)


def test_pipeline_on_pixels_video_and_latent_inputs_agree(tmp_path):
    pipe = _pipe()
    video = torch.rand(1, 4, 3, 16, 24)  # (B, T, C, H, W) in [0, 1], 4 frames (no 4k+1 rule)
    lr_latents = get_adapter(pipe.vae).encode(pipe.vae, video.permute(0, 2, 1, 3, 4) * 2 - 1)
    kwargs = dict(scale=2.0, num_inference_steps=2, output_type="pt")
    from_video = pipe(video=video, generator=torch.Generator().manual_seed(0), **kwargs).frames
    from_latents = pipe(lr_latents=lr_latents, generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert from_video.shape == (1, 4, 3, 32, 48)
    torch.testing.assert_close(from_video, from_latents)

    pipe.save_pretrained(tmp_path)
    reloaded = CascadeVSRPipeline.from_pretrained(tmp_path, local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    assert isinstance(reloaded.vae, SpaceToDepthAutoencoder)
    again = reloaded(lr_latents=lr_latents, generator=torch.Generator().manual_seed(0), **kwargs).frames
    # same weights, same noise; only the float32 summation order may differ (weights loaded into other memory)
    torch.testing.assert_close(again, from_latents)


def test_uint8_video_equals_the_same_frames_as_floats():
    pipe = _pipe()
    frames = torch.randint(0, 256, (1, 4, 3, 16, 24), dtype=torch.uint8)
    kwargs = dict(scale=2.0, num_inference_steps=1, output_type="pt")
    as_uint8 = pipe(video=frames, generator=torch.Generator().manual_seed(0), **kwargs).frames
    as_float = pipe(video=frames.float() / 255, generator=torch.Generator().manual_seed(0), **kwargs).frames
    torch.testing.assert_close(as_uint8, as_float, rtol=0, atol=0)
