"""Tiny upstream text-to-video pipelines with random weights, built from configs (nothing is downloaded).

Used by the tests and the notebooks to exercise the adapters and the cascade stage on every family's real
latent format. The models are far too small to generate anything meaningful; only formats and data flow
matter here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def tiny_t5(d_model: int = 32, seed: int = 0):
    """A T5 encoder with a byte-level tokenizer (ByT5Tokenizer needs no vocabulary file)."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    _seeded(seed)
    config = T5Config(
        vocab_size=384, d_model=d_model, d_kv=8, d_ff=37, num_layers=1, num_heads=4, relative_attention_num_buckets=8
    )
    return T5EncoderModel(config).eval(), ByT5Tokenizer()


def tiny_wan_vae(seed: int = 0):
    from diffusers import AutoencoderKLWan

    _seeded(seed)
    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()


def _tiny_wan_transformer(channels: int = 16):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=channels,
        out_channels=channels,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()


def tiny_wan_pipeline(dtype: torch.dtype = torch.float32, seed: int = 0, scheduler=None):
    """WanPipeline (Wan 2.1): 16-channel latents, compression (4, 8, 8), text width 32."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    vae = tiny_wan_vae(seed)
    _seeded(seed)
    transformer = _tiny_wan_transformer()
    text_encoder, tokenizer = tiny_t5(32, seed)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    return pipe.to(dtype=dtype)


def tiny_wan22_pipeline(seed: int = 0):
    """WanPipeline as Wan 2.2 A14B: two experts, `transformer` for the high-noise part of the schedule and
    `transformer_2` below `boundary_ratio`; the Wan 2.1 latent space."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    vae = tiny_wan_vae(seed)
    _seeded(seed)
    transformer, transformer_2 = _tiny_wan_transformer(), _tiny_wan_transformer()
    text_encoder, tokenizer = tiny_t5(32, seed)
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        transformer_2=transformer_2,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        boundary_ratio=0.875,
    )


def tiny_wan_ti2v_vae(seed: int = 0):
    """Wan 2.2 TI2V's VAE geometry: 48 channels, 2x2 patchified pixels, compression (4, 16, 16)."""
    from diffusers import AutoencoderKLWan

    _seeded(seed)
    return AutoencoderKLWan(
        base_dim=3,
        z_dim=48,
        in_channels=12,
        out_channels=12,
        is_residual=True,
        patch_size=2,
        latents_mean=[round(-0.5 + i / 48, 4) for i in range(48)],  # not 0 / 1: the normalization is visible
        latents_std=[round(0.5 + i / 32, 4) for i in range(48)],
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        temperal_downsample=[False, True, True],
    ).eval()


def tiny_wan_ti2v_pipeline(seed: int = 0):
    """WanPipeline as Wan 2.2 TI2V 5B: the 48-channel latent space ("wan_z48"), per-token timesteps."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    vae = tiny_wan_ti2v_vae(seed)
    _seeded(seed)
    transformer = _tiny_wan_transformer(48)
    text_encoder, tokenizer = tiny_t5(32, seed)
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        expand_timesteps=True,
    )


def tiny_cogvideox_vae(seed: int = 0):
    from diffusers import AutoencoderKLCogVideoX

    _seeded(seed)
    return AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    ).eval()


def tiny_cogvideox_pipeline(seed: int = 0):
    """CogVideoXPipeline: 4-channel (B, T, C, h, w) latents, compression (4, 8, 8), text width 32."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    vae = tiny_cogvideox_vae(seed)
    _seeded(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=32,
        num_layers=1,
        sample_width=4,
        sample_height=4,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=16,
    ).eval()
    text_encoder, tokenizer = tiny_t5(32, seed)
    return CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(),
    )


def tiny_hunyuan_vae(seed: int = 0):
    from diffusers import AutoencoderKLHunyuanVideo

    _seeded(seed)
    return AutoencoderKLHunyuanVideo(
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
    ).eval()


def tiny_hunyuan_pipeline(seed: int = 0):
    """HunyuanVideoPipeline: 4-channel latents, compression (4, 8, 8), Llama text width 16, CLIP pooled 8.

    Both tokenizers are byte-level ByT5 ones (Llama's and CLIP's need vocabulary files); the pipeline's own
    prompt template and encoding run on them unchanged.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
    from transformers import ByT5Tokenizer, CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    vae = tiny_hunyuan_vae(seed)
    _seeded(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    ).eval()
    text_encoder = LlamaModel(
        LlamaConfig(
            hidden_size=16,
            intermediate_size=37,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_hidden_layers=2,
            vocab_size=1000,
        )
    ).eval()
    text_encoder_2 = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=8,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=1000,
            projection_dim=8,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
    ).eval()
    return HunyuanVideoPipeline(
        text_encoder=text_encoder,
        tokenizer=ByT5Tokenizer(),
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=text_encoder_2,
        tokenizer_2=ByT5Tokenizer(),
    )


def hunyuan_prompt_embeds(batch_size: int = 1, seq_len: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random upstream text conditioning of the tiny HunyuanVideo pipeline."""
    generator = torch.Generator().manual_seed(seed)
    return dict(
        prompt_embeds=torch.randn(batch_size, seq_len, 16, generator=generator),
        pooled_prompt_embeds=torch.randn(batch_size, 8, generator=generator),
        prompt_attention_mask=torch.ones(batch_size, seq_len, dtype=torch.int64),
    )


def tiny_ltx_vae(seed: int = 0):
    from diffusers import AutoencoderKLLTXVideo

    _seeded(seed)
    return AutoencoderKLLTXVideo(
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4,
        upsample_factor=(1,) * 4,
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    ).eval()


def tiny_ltx_pipeline(seed: int = 0):
    """LTXPipeline: 8-channel packed latents, compression (4, 4, 4), text width 32."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    vae = tiny_ltx_vae(seed)
    _seeded(seed)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=1,
        caption_channels=32,
    ).eval()
    text_encoder, tokenizer = tiny_t5(32, seed)
    return LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def tiny_mochi_vae(seed: int = 0):
    from diffusers import AutoencoderKLMochi

    _seeded(seed)
    return AutoencoderKLMochi(
        latent_channels=12,
        out_channels=3,
        encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32),
        layers_per_block=(1, 1, 1, 1, 1),
    ).eval()


def tiny_mochi_pipeline(seed: int = 0):
    """MochiPipeline: 12-channel latents, compression (6, 8, 8), text width 32, inverted sigmas (as released)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel

    vae = tiny_mochi_vae(seed)
    _seeded(seed)
    transformer = MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        pooled_projection_dim=16,
        in_channels=12,
        qk_norm="rms_norm",
        text_embed_dim=32,
        time_embed_dim=4,
        activation_fn="swiglu",
        max_sequence_length=16,
    ).eval()
    text_encoder, tokenizer = tiny_t5(32, seed)
    return MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


@dataclass(frozen=True)
class TinyUpstream:
    """A tiny upstream pipeline of one family and what fits it: the stage's text width (its text encoder's), a
    valid pixel frame count and an LR size its `check_inputs` accepts."""

    build: Callable[[], Any]
    latent_space: str
    text_dim: int
    num_frames: int
    lr_size: tuple[int, int] = (32, 32)
    call_kwargs: dict = field(default_factory=dict)  # what every call of the upstream needs besides the defaults


TINY_UPSTREAMS = {
    "wan": TinyUpstream(tiny_wan_pipeline, "wan", 32, 5),
    "wan2.2": TinyUpstream(tiny_wan22_pipeline, "wan", 32, 5),
    "wan2.2-ti2v": TinyUpstream(tiny_wan_ti2v_pipeline, "wan_z48", 32, 5),
    # CogVideoX's transformer is built for a fixed text length; it decodes odd latent counts to 4k + 1 frames
    "cogvideox": TinyUpstream(tiny_cogvideox_pipeline, "cogvideox", 32, 9, call_kwargs=dict(max_sequence_length=16)),
    "hunyuan_video": TinyUpstream(tiny_hunyuan_pipeline, "hunyuan_video", 16, 5),
    "ltx_video": TinyUpstream(tiny_ltx_pipeline, "ltx_video", 32, 5),
    "mochi": TinyUpstream(tiny_mochi_pipeline, "mochi", 32, 7),
}
