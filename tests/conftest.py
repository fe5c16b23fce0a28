"""Shared fixtures: tiny models with random weights, built from configs (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

from cascade_vsr import CascadeVSRTransformer3DModel, LatentUpsampler3D

TINY_TRANSFORMER = dict(
    latent_channels=4,
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=12,
    ffn_dim=32,
    text_dim=16,
)
TINY_UPSAMPLER = dict(latent_channels=4, hidden_channels=16, num_blocks=1)


def tiny_stage_folder(path, sampling: dict, num_layers: int = 2, seed: int = 0, **transformer_options):
    """A tiny random pixel-space stage folder with its own sampling settings (never the committed demo model); the
    upsampler is perturbed with `seed`, the transformer with `seed` + 1."""
    from cascade_vsr.training.trainer import export_pipeline

    torch.manual_seed(0)
    transformer = CascadeVSRTransformer3DModel(
        latent_channels=48,
        num_layers=num_layers,
        num_attention_heads=2,
        attention_head_dim=16,
        ffn_dim=64,
        text_dim=16,
        latent_space="space_to_depth",
        patch_size=(1, 1, 1),
        condition_residual_std=0.05,
        **transformer_options,
    )
    upsampler = LatentUpsampler3D(latent_channels=48, hidden_channels=16, num_blocks=1, space_to_depth_factor=4)
    upsampler, transformer = (
        randomize_(upsampler, std=0.01, seed=seed),
        randomize_(transformer, std=0.01, seed=seed + 1),
    )
    return export_pipeline(path, upsampler, transformer, sampling)


def randomize_(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter. The models start with zero-initialised output layers (AdaLN-zero,
    residual upsampler), where outputs are constant and most gradients are exactly zero by design;
    tests of numerics and connectivity need a generic point."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * std)
    return module


@pytest.fixture
def tiny_transformer() -> CascadeVSRTransformer3DModel:
    torch.manual_seed(0)
    return randomize_(CascadeVSRTransformer3DModel(**TINY_TRANSFORMER)).eval()


@pytest.fixture
def tiny_upsampler() -> LatentUpsampler3D:
    torch.manual_seed(0)
    return randomize_(LatentUpsampler3D(**TINY_UPSAMPLER)).eval()


@pytest.fixture(scope="session")
def pairs(tmp_path_factory):
    """A 4-clip pair dataset of the real bigbuckbunny clip (2 frames, 32x64 HR, text embeddings of width 16),
    shared read-only by the training tests (a test that changes it works on a copy)."""
    from ._pairs import build_pairs

    return build_pairs(tmp_path_factory.mktemp("pairs"), num_clips=4, num_frames=2, hr_size=(32, 64), text_dim=16)


@pytest.fixture(scope="module", params=["wan", "wan_z48"])
def wan_vae(request):
    """Tiny random VAEs of Wan 2.1 (z16) and Wan 2.2 TI2V (z48)."""
    from cascade_vsr import testing

    return {"wan": testing.tiny_wan_vae, "wan_z48": testing.tiny_wan_ti2v_vae}[request.param]()


def tiny_causal_transformer(
    mode: str | list[str] = "window", chunk: int = 2, cache: int = 1, channels: int = 4, **config
) -> CascadeVSRTransformer3DModel:
    """A tiny random block-causal transformer (`chunk` latent frames a chunk, `cache` cached chunks), eval mode."""
    torch.manual_seed(0)
    modes = [mode] if isinstance(mode, str) else mode
    defaults = {"window": dict(window_size=(4, 3, 3)), "sparse_topk": dict(sparse_window=(2, 3), sparse_topk=1)}
    options = {key: value for name in modes for key, value in defaults.get(name, {}).items()}
    model = CascadeVSRTransformer3DModel(
        latent_channels=channels,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=12,
        ffn_dim=32,
        text_dim=16,
        patch_size=(1, 1, 1),
        attention_mode=mode,
        causal_chunk_frames=chunk,
        causal_cache_chunks=cache,
        **{**options, **config},
    )
    return randomize_(model).eval()


def tiny_causal_stage(
    vae,
    sampling: dict | None = None,
    mode: str | list[str] = "window",
    chunk: int = 2,
    cache: int = 1,
    num_blocks: int = 1,
    **transformer_options,
):
    """A tiny random block-causal stage in the VAE's latent space (a space-to-depth upsampler resizes on pixels)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from cascade_vsr import CascadeVSRPipeline
    from cascade_vsr.pipelines.adapters import get_adapter

    adapter = get_adapter(vae)
    channels = adapter.latent_channels
    transformer = tiny_causal_transformer(
        mode, chunk, cache, channels, latent_space=adapter.name, **transformer_options
    )
    factor = adapter.spatial_compression if adapter.name == "space_to_depth" else 1
    upsampler = LatentUpsampler3D(
        latent_channels=channels, hidden_channels=16, num_blocks=num_blocks, space_to_depth_factor=factor
    )
    pipe = CascadeVSRPipeline(
        upsampler=randomize_(upsampler, seed=1).eval(),
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=vae,
        sampling=sampling,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
