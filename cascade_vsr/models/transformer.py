"""The conditional DiT of cascade-vsr: noisy HR latent + noise-augmented upsampled LR latent -> velocity."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin, FeedForward
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.embeddings import PixArtAlphaTextProjection, TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin, get_parameter_dtype
from diffusers.models.normalization import FP32LayerNorm
from diffusers.utils import apply_lora_scale
from einops import rearrange

from cascade_vsr.core.flow import (
    NUM_TRAIN_TIMESTEPS,
    condition_prior,
    preconditioned_input,
    preconditioned_velocity,
    timestep_to_sigma,
)
from cascade_vsr.core.validation import check_latents, check_per_sample
from cascade_vsr.models.attention import self_attention
from cascade_vsr.models.attention_spec import (
    DEFAULT_BACKEND,
    AttentionSpec,
    check_temporal_unit,
    check_topk,
    check_window,
    diffusers_backends,
    layer_attention_specs,
)
from cascade_vsr.models.causal_attention import (
    CausalContext,
    CausalKVCache,
    causal_self_attention,
    chunk_ids,
    chunk_visibility,
)
from cascade_vsr.models.loading import SafeLoadingMixin
from cascade_vsr.models.onednn import feed_forward, linear_projections, unhooked
from cascade_vsr.models.rope import (
    RotaryPositionEmbedding3D,
    apply_rope,
    check_frame_offset,
    rms_norm_rope,
    rope_axis_dims,
)

# ---------------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------------


def rename_legacy_output_projection(state_dict: dict[str, Any], prefix: str = "") -> None:
    """Rename, in place, the `to_out.weight` / `to_out.bias` keys of checkpoints saved before the attention's output
    projection became `to_out.0` (diffusers' layout). With a `prefix` (one attention layer's), only that layer's
    keys; without, every attention layer's."""
    for key in list(state_dict):
        head, _, leaf = key.rpartition(".")
        legacy = (head == f"{prefix}to_out") if prefix else (head == "to_out" or head.endswith(".to_out"))
        if legacy and leaf in ("weight", "bias"):
            state_dict[f"{head}.0.{leaf}"] = state_dict.pop(key)


class CascadeVSRAttnProcessor:
    """Projections, q/k RMSNorm and RoPE around the attention itself.

    Self-attention runs `self_attention` with the layer's `AttentionSpec` (its mode and backend). Cross-attention to
    the text runs diffusers' `dispatch_attention_fn` on `_attention_backend` (None: diffusers' default backend).
    Both are set by `CascadeVSRTransformer3DModel.set_attention_backend`.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: CascadeVSRAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: torch.Tensor | None = None,
        grid: tuple[int, int, int] | None = None,
        causal: CausalContext | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            projections = linear_projections(hidden_states, attn.to_q, attn.to_k, attn.to_v)
        else:
            projections = (attn.to_q(hidden_states), *linear_projections(encoder_hidden_states, attn.to_k, attn.to_v))
        query, key, value = (rearrange(x, "b n (h d) -> b n h d", h=attn.heads) for x in projections)

        if encoder_hidden_states is not None:  # text cross-attention: no positions on either side
            query, key = attn.norm_q(query), attn.norm_k(key)
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend)
            out = rearrange(out, "b n h d -> b n (h d)")
        else:
            if attn.spec is None or rotary_emb is None or grid is None:
                raise ValueError("self-attention needs the layer's `spec`, `rotary_emb` and the token `grid`")
            query, key, value = (rearrange(x, "b n h d -> b h n d") for x in (query, key, value))
            query, key = (
                normalize_and_rotate(attn.norm_q, query, rotary_emb),
                normalize_and_rotate(attn.norm_k, key, rotary_emb),
            )
            if causal is None:
                out = self_attention(query, key, value, grid, attn.spec)
            else:  # streaming: the cache adds the earlier chunks' keys and values to this chunk's
                out = causal_self_attention(
                    query, key, value, grid, causal.key_frames, causal.visibility, attn.spec, causal.cache, attn
                )
            out = rearrange(out, "b h n d -> b n (h d)")
        (out,) = linear_projections(out.type_as(hidden_states), attn.to_out[0])
        return attn.to_out[1](out)


def normalize_and_rotate(norm: nn.Module, x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """RMSNorm then RoPE of x (B, heads, N, D): fused (`rms_norm_rope`) for the plain `nn.RMSNorm`, through the
    module for anything wrapped or hooked."""
    if type(norm) is nn.RMSNorm and norm.eps is not None and unhooked(norm):
        return rms_norm_rope(x, norm, rotation)
    return apply_rope(norm(x), rotation)


class CascadeVSRAttention(nn.Module, AttentionModuleMixin):
    """Multi-head attention with per-head RMSNorm on queries and keys.

    `spec` (self-attention layers only; None for cross-attention) selects how self-attention is computed. It owns
    no parameters, so a checkpoint trained with one mode loads and runs with another.
    """

    _default_processor_cls = CascadeVSRAttnProcessor
    _available_processors = [CascadeVSRAttnProcessor]
    _supports_qkv_fusion = False

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float = 1e-6, spec: AttentionSpec | None = None):
        super().__init__()
        inner_dim = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner_dim)
        self.to_k = nn.Linear(dim, inner_dim)
        self.to_v = nn.Linear(dim, inner_dim)
        # diffusers' layout (projection, dropout): LoRA target names are then the standard "to_out.0".
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, dim), nn.Dropout(0.0)])
        self.norm_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps)
        self.spec = spec
        self.set_processor(CascadeVSRAttnProcessor())

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # `load_state_dict` of a checkpoint from before `to_out` became (projection, dropout).
        rename_legacy_output_projection(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: torch.Tensor | None = None,
        grid: tuple[int, int, int] | None = None,
        causal: CausalContext | None = None,
    ) -> torch.Tensor:
        return self.processor(self, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, grid, causal)

    def single_key_output(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Cross-attention to a single unmasked token, (B, 1, dim): the softmax over one key is exactly 1, so every
        query gets that token's projected value and the queries need not be computed."""
        value = self.to_v(encoder_hidden_states)
        return self.to_out[1](self.to_out[0](value))


def attends_to_one_token(encoder_hidden_states: torch.Tensor | None) -> bool:
    """Whether cross-attention has exactly one key (e.g. the null text embedding without a prompt) outside
    autograd. A text mask must keep at least one token per row (`_check_inputs`), so that key is always attended.
    With gradients the full path runs, so that every parameter takes part in every step (DDP)."""
    return not torch.is_grad_enabled() and encoder_hidden_states is not None and encoder_hidden_states.shape[1] == 1


# ---------------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------------

FFN_ACTIVATIONS = ("gelu-approximate", "gelu")


def modulated_layer_norm(
    norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """AdaLN: `norm(x) * (1 + scale) + shift` in float32, returned in `dtype`, for a LayerNorm without its own affine;
    `shift` / `scale` (B, 1, dim). With one sample the modulation is a per-channel affine, which the LayerNorm kernel
    applies in its own pass; a bfloat16 `x` on CPU goes in as it is (the kernel computes in float32 and rounds
    once)."""
    if x.shape[0] != 1 or norm.weight is not None:
        return torch.addcmul(shift, norm(x.float()), 1 + scale).to(dtype)
    weight, bias = (1 + scale).flatten(), shift.flatten()
    if x.dtype == dtype == torch.bfloat16 and x.device.type == "cpu":
        return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)
    return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps).to(dtype)


class CascadeVSRTransformerBlock(nn.Module):
    """Self-attention, text cross-attention and feed-forward; AdaLN-zero modulation of self-attn and FFN.

    Inside the block the residual stream is float32; the sublayers read it in the block's input dtype."""

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        head_dim: int,
        eps: float = 1e-6,
        spec: AttentionSpec | None = None,
        ffn_activation: str = "gelu-approximate",
    ):
        super().__init__()
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = CascadeVSRAttention(dim, num_heads, head_dim, eps, AttentionSpec() if spec is None else spec)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True)
        self.attn2 = CascadeVSRAttention(dim, num_heads, head_dim, eps)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = FeedForward(dim, inner_dim=ffn_dim, activation_fn=ffn_activation)
        # Zero: with the zero-initialised shared time projection, every gate starts at 0 (AdaLN-zero),
        # so each block starts as the identity.
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 6, dim))

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        modulation: torch.Tensor,
        rotary_emb: torch.Tensor,
        grid: tuple[int, int, int],
        causal: CausalContext | None = None,
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = (self.scale_shift_table + modulation.float())[
            :, :, None
        ].unbind(dim=1)  # each (B, 1, dim)

        # The residual stream stays float32 through the block and each sublayer reads it in the block's input dtype,
        # so a bfloat16 model rounds it once per block, not after every sublayer. addcmul(a, b, c) is a + b * c in
        # one pass over the tokens (gated residuals).
        dtype = hidden_states.dtype
        norm_hidden = modulated_layer_norm(self.norm1, hidden_states, shift_msa, scale_msa, dtype)
        attn_out = self.attn1(norm_hidden, rotary_emb=rotary_emb, grid=grid, causal=causal)
        residual = torch.addcmul(hidden_states.float(), attn_out.float(), gate_msa)

        if attends_to_one_token(encoder_hidden_states):
            cross_out = self.attn2.single_key_output(encoder_hidden_states)
        else:
            cross_out = self.attn2(
                self.norm2(residual).to(dtype),
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=encoder_attention_mask,
            )
        residual = residual + cross_out.float()

        norm_hidden = modulated_layer_norm(self.norm3, residual, shift_ffn, scale_ffn, dtype)
        ffn_out = feed_forward(self.ffn, norm_hidden)
        return torch.addcmul(residual, ffn_out.float(), gate_ffn).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


def _on_device(value: torch.Tensor | float, device: torch.device) -> torch.Tensor | float:
    """A Python int or float as a 0-dim tensor filled on `device`, of the dtype `torch.as_tensor` would give it (a
    copy from the host would synchronise); anything else passes unchanged."""
    if type(value) in (int, float):
        return torch.full((), value, device=device)
    return value


def _register_block_layout() -> None:
    """Tell diffusers' block caches (first-block cache, ...) what a `CascadeVSRTransformerBlock` returns: the hidden
    states alone (the text is not updated by the blocks). Done on first use, not at import: the registry imports
    every diffusers transformer."""
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

    TransformerBlockRegistry.register(
        CascadeVSRTransformerBlock,
        TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None),
    )


class CascadeVSRTransformer3DModel(
    SafeLoadingMixin, ModelMixin, ConfigMixin, PeftAdapterMixin, CacheMixin, AttentionMixin
):
    r"""
    Conditional video DiT of SimpleGVR: predicts the flow-matching velocity of the HR latent from the noisy HR
    latent concatenated (on channels) with the noise-augmented upsampled LR latent.

    The defaults are a ~1.07B-parameter configuration comparable to the paper's 1B base (1536 wide, 28 layers,
    12 heads of 128, FFN 6144, T5-XXL text width 4096, Wan-class 16-channel latents).

    Args:
        latent_channels (`int`): Channels of the latent space; the model reads 2x this (latent + condition).
        num_layers (`int`): Number of transformer blocks.
        num_attention_heads (`int`), attention_head_dim (`int`): Heads and their width (inner dim = product).
        ffn_dim (`int`): Hidden width of the feed-forward layers.
        ffn_activation (`str`): GELU of the feed-forward layers: `"gelu-approximate"` (tanh form, Wan's) or
            `"gelu"` (erf form; on CPU PyTorch's erf kernel is about 5x faster than its tanh kernel). It owns no
            weights, so a checkpoint loads with either, but the two are different functions (up to 5e-4 apart).
        text_dim (`int`): Width of the upstream text encoder's embeddings (4096 for T5-XXL).
        patch_size (`tuple[int, int, int]`): (t, h, w) patch; sizes it does not divide are padded and cropped.
        attention_mode (`str` or `list[str]`): Self-attention mode of every layer, or one per layer: `"full"`,
            `"sparse_topk"` (SimpleGVR sparse local attention) or `"window"` (SeedVR2 adaptive 3D windows).
            Odd layers shift (windows, temporal units). The model turns the attention fields of its config into one
            `AttentionSpec` per layer (`attention_specs`); specs own no parameters, so a checkpoint loads with any
            mode (`from_pretrained(path, attention_mode=...)`). Kernels: `set_attention_backend`.
        freq_dim (`int`): Width of the sinusoidal timestep / noise-level features.
        rope_theta (`float`): Base of the rotary frequencies.
        eps (`float`): Epsilon of the norms.
        latent_space (`str`, *optional*): Name of the upstream latent space the model was trained in
            (e.g. `"wan"`); the pipeline refuses an upstream of another space.
        sparse_window (`tuple[int, int]`): (h, w) tokens of a `sparse_topk` window unit (12 x 9 in the paper).
        sparse_topk (`int`): Other units each `sparse_topk` unit attends to (1 in the paper).
        temporal_unit (`int`, *optional*): Scope of `full` and `sparse_topk` attention in latent frames
            (SimpleGVR's interleaving temporal units, 5 in stage 3); odd layers shift the units by half a unit
            without wrap-around. `None`: all frames. `window` layers ignore it (their 3D window bounds time).
        window_size (`tuple[int, int, int]`, *optional*): (t, h, w) tokens of a `window` layer's 3D window;
            `None` uses SeedVR2's adaptive, resolution-consistent size (`adaptive_window_size`).
        condition_residual_std (`float`, *optional*): Typical std of (HR latent - upsampled LR latent). When set,
            the network sees the Gaussian posterior estimate of the clean latent instead of z_t
            (`flow.preconditioned_input`: zero at sigma = 1), its output is a residual around that posterior
            (`flow.preconditioned_velocity`), and the trainer weights the loss to match; a fresh model then
            samples around the condition instead of having to learn to pass it through. `None`: the plain
            velocity of the paper.
        window_reference (`tuple[int, int]`): (h, w) tokens of the training resolution the adaptive window is
            sized at (3 x 3 windows at that area; 45 x 80 = 720p with an 8x VAE and a 2x2 patch).
        causal_chunk_frames (`int`, *optional*): Block-causal self-attention (InfVSR): the latent frames are cut
            into chunks of this many, and the frames of a chunk attend to their chunk and to the previous
            `causal_cache_chunks` chunks only, in every layer and mode (`causal_attention`; a `window` layer keeps
            its spatial windows over all visible frames, a `sparse_topk` layer selects among their units). A
            forward over a clip is the offline form; `forward(..., kv_cache=CausalKVCache(m))` chunk by chunk is
            the streaming form, with the same result. Needs a temporal patch of 1 and no `temporal_unit`.
        causal_cache_chunks (`int`): Previous chunks each chunk sees (m).
        visual_guidance_frames (`int`, *optional*): Joint visual guidance (InfVSR): the condition of the clip's
            first this-many latent frames (of a stream: of its first chunk, kept in the `CausalKVCache`), average
            pooled to `visual_guidance_grid` tokens per frame and embedded, joins the text tokens of every
            cross-attention: one global reference for every chunk, against identity and colour drift.
        visual_guidance_grid (`tuple[int, int]`): (h, w) pooled tokens per key frame.

    diffusers integrations (the mixins do the work):
        - LoRA (`PeftAdapterMixin`): `add_adapter`, `load_lora_adapter`, `set_adapters`, `disable_lora`, `fuse_lora`,
          `unload_lora`; every attention layer has the standard target names `to_q`, `to_k`, `to_v`, `to_out.0`,
          and `attention_kwargs={"scale": s}` weighs the adapters in one call. To save a trained adapter:
          `CascadeVSRPipeline.save_lora_weights(dir, transformer_lora_layers=peft.utils.get_peft_model_state_dict(
          transformer), transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())` (the
          metadata keeps `lora_alpha`; without it a load assumes alpha = rank); `pipe.load_lora_weights(dir)` loads it.
        - attention processors (`AttentionMixin`): `attn_processors`, `set_attn_processor`.
        - caches (`CacheMixin`): `enable_cache(FirstBlockCacheConfig(threshold=...))`, `disable_cache()`; the
          pipeline's denoising loop runs each step in a `cache_context`.
        - `compile_repeated_blocks()` compiles each `CascadeVSRTransformerBlock` once (`_repeated_blocks`).
        - `enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)`: the patch
          embedding, the conditioning embedders and the norms stay in the model's dtype.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["CascadeVSRTransformerBlock"]
    _repeated_blocks = ["CascadeVSRTransformerBlock"]
    # The patch embedding reads the latents and the condition themselves: in float32 a bfloat16 stage sees the clip
    # unrounded (rounded, its values move by up to a quarter of a grey level, differently in every frame).
    _keep_in_fp32_modules = [
        "patch_embedding",
        "time_embedder",
        "noise_level_embedder",
        "scale_shift_table",
        "norm1",
        "norm3",
    ]
    # Kept in the model's dtype under `enable_layerwise_casting`, as in diffusers' Wan: the input patch embedding, the
    # timestep / noise-level / text conditioning and the norms (small layers that fp8 storage would hurt most).
    _skip_layerwise_casting_patterns = [
        "patch_embedding",
        "time_embedder",
        "noise_level_embedder",
        "modulation_proj",
        "text_embedder",
        "visual_guidance_embedder",
        "norm",
    ]

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 16,
        num_layers: int = 28,
        num_attention_heads: int = 12,
        attention_head_dim: int = 128,
        ffn_dim: int = 6144,
        text_dim: int = 4096,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        attention_mode: str | list[str] = "full",
        freq_dim: int = 256,
        rope_theta: float = 10000.0,
        eps: float = 1e-6,
        latent_space: str | None = None,
        sparse_window: tuple[int, int] = (12, 9),
        sparse_topk: int = 1,
        temporal_unit: int | None = None,
        window_size: tuple[int, int, int] | None = None,
        window_reference: tuple[int, int] = (45, 80),
        condition_residual_std: float | None = None,
        causal_chunk_frames: int | None = None,
        causal_cache_chunks: int = 1,
        visual_guidance_frames: int | None = None,
        visual_guidance_grid: tuple[int, int] = (4, 4),
        ffn_activation: str = "gelu-approximate",
    ):
        super().__init__()
        for name, value in dict(
            latent_channels=latent_channels,
            num_layers=num_layers,
            num_attention_heads=num_attention_heads,
            ffn_dim=ffn_dim,
            text_dim=text_dim,
        ).items():
            if value <= 0:
                raise ValueError(f"`{name}` must be a positive int, got {value}")
        rope_axis_dims(attention_head_dim)
        if ffn_activation not in FFN_ACTIVATIONS:
            raise ValueError(f"`ffn_activation` must be one of {FFN_ACTIVATIONS}, got {ffn_activation!r}")
        if len(patch_size) != 3 or any(p <= 0 for p in patch_size):
            raise ValueError(f"`patch_size` must be a (t, h, w) triple of positive ints, got {patch_size}")
        check_window(sparse_window, 2, "sparse_window")
        check_topk(sparse_topk, "sparse_topk")
        check_temporal_unit(temporal_unit, "temporal_unit")
        if window_size is not None:
            check_window(window_size, 3, "window_size")
        check_window(window_reference, 2, "window_reference")
        if condition_residual_std is not None and not condition_residual_std > 0:
            raise ValueError(f"`condition_residual_std` must be None or > 0, got {condition_residual_std!r}")
        if causal_chunk_frames is not None:
            if (
                isinstance(causal_chunk_frames, bool)
                or not isinstance(causal_chunk_frames, int)
                or causal_chunk_frames < 1
            ):
                raise ValueError(f"`causal_chunk_frames` must be None or an int >= 1, got {causal_chunk_frames!r}")
            if (
                isinstance(causal_cache_chunks, bool)
                or not isinstance(causal_cache_chunks, int)
                or causal_cache_chunks < 0
            ):
                raise ValueError(f"`causal_cache_chunks` must be an int >= 0, got {causal_cache_chunks!r}")
            if patch_size[0] != 1:
                raise ValueError(
                    f"`causal_chunk_frames` needs a temporal patch of 1, got patch_size={tuple(patch_size)}"
                )
            if temporal_unit is not None:
                raise ValueError(
                    "`causal_chunk_frames` and `temporal_unit` both bound attention in time: set one, got "
                    f"temporal_unit={temporal_unit}"
                )
        if visual_guidance_frames is not None:
            if (
                isinstance(visual_guidance_frames, bool)
                or not isinstance(visual_guidance_frames, int)
                or visual_guidance_frames < 1
            ):
                raise ValueError(
                    f"`visual_guidance_frames` must be None or an int >= 1, got {visual_guidance_frames!r}"
                )
            if causal_chunk_frames is not None and visual_guidance_frames > causal_chunk_frames:
                raise ValueError(
                    f"`visual_guidance_frames` ({visual_guidance_frames}) are the first chunk's key frames: at most "
                    f"causal_chunk_frames={causal_chunk_frames}"
                )
            check_window(visual_guidance_grid, 2, "visual_guidance_grid")
        specs = layer_attention_specs(
            attention_mode,
            num_layers,
            temporal_unit=temporal_unit,
            sparse_window=tuple(sparse_window),
            sparse_topk=sparse_topk,
            window_size=window_size,
            window_reference=tuple(window_reference),
        )

        inner_dim = num_attention_heads * attention_head_dim

        self.patch_embedding = nn.Conv3d(2 * latent_channels, inner_dim, kernel_size=patch_size, stride=patch_size)

        self.time_proj = Timesteps(freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedder = TimestepEmbedding(freq_dim, inner_dim)
        self.noise_level_embedder = TimestepEmbedding(freq_dim, inner_dim)
        self.modulation_proj = nn.Linear(inner_dim, 6 * inner_dim)
        nn.init.zeros_(self.modulation_proj.weight)
        nn.init.zeros_(self.modulation_proj.bias)

        self.text_embedder = PixArtAlphaTextProjection(text_dim, inner_dim, act_fn="gelu_tanh")
        # Learned "empty prompt" in the text encoder's space: the unconditional branch of CFG and the
        # 10% prompt dropout of training both use it.
        self.null_text_embedding = nn.Parameter(torch.randn(1, 1, text_dim) * 0.02)
        # Joint visual guidance (InfVSR): pooled condition tokens of the clip's first frames, read by the text
        # cross-attention of every block, the same for every chunk of a stream.
        self.visual_guidance_embedder = None
        if visual_guidance_frames is not None:
            self.visual_guidance_embedder = PixArtAlphaTextProjection(latent_channels, inner_dim, act_fn="gelu_tanh")

        self.rope = RotaryPositionEmbedding3D(attention_head_dim, rope_theta)
        self.blocks = nn.ModuleList(
            [
                CascadeVSRTransformerBlock(
                    inner_dim, ffn_dim, num_attention_heads, attention_head_dim, eps, spec, ffn_activation
                )
                for spec in specs
            ]
        )

        self.norm_out = FP32LayerNorm(inner_dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 2, inner_dim))
        self.proj_out = nn.Linear(inner_dim, latent_channels * math.prod(patch_size))
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

        self.gradient_checkpointing = False

    @property
    def attention_specs(self) -> tuple[AttentionSpec, ...]:
        """The self-attention spec of every layer: mode, shift, options and backend."""
        return tuple(block.attn1.spec for block in self.blocks)

    def set_attention_backend(self, backend: str) -> None:
        """Run the model's attention on `backend`, one name for every layer.

        - `"sdpa"` (the default): torch's `scaled_dot_product_attention` everywhere. The local modes run it over
          batched tiles (differentiable on every device); the text cross-attention goes to diffusers' default
          backend (torch's SDPA unless `DIFFUSERS_ATTN_BACKEND` says otherwise).
        - `"flex"`: FlexAttention everywhere. The local modes build a block mask from their windows or selection
          (compiled on CUDA; on CPU forward only); plain full and cross-attention use diffusers' "flex" backend.
        - any other diffusers backend ("native", "flash", "sage", ...; `AttentionBackendName`): plain full
          self-attention and the text cross-attention only.

        A backend that a layer's mode cannot use raises a ValueError naming the layers, their mode and the
        backends it accepts; nothing is changed then. Unlike `ModelMixin.set_attention_backend`, diffusers'
        process-wide default backend is left as it was: every layer here is given its backend explicitly.
        """
        name = backend.lower() if isinstance(backend, str) else backend
        if name not in (DEFAULT_BACKEND, *diffusers_backends()):
            raise ValueError(
                f"`backend` must be {DEFAULT_BACKEND!r} or one of diffusers' attention backends "
                f"{diffusers_backends()}, got {backend!r}"
            )
        refused: dict[str, tuple[list[int], tuple[str, ...]]] = {}
        for index, spec in enumerate(self.attention_specs):
            if name not in spec.accepted_backends:
                refused.setdefault(spec.label, ([], spec.accepted_backends))[0].append(index)
        if refused:
            details = "; ".join(
                f"layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))} ({label}, which accepts "
                f"{', '.join(repr(a) for a in accepted)})"
                for label, (layers, accepted) in refused.items()
            )
            raise ValueError(f"`backend` {name!r} cannot run the self-attention of {details}")

        if name == DEFAULT_BACKEND:
            super().reset_attention_backend()
        else:
            from diffusers.models.attention_dispatch import _AttentionBackendRegistry

            active, _ = _AttentionBackendRegistry.get_active_backend()
            try:  # checks the backend's requirements and sets the cross-attention processors
                super().set_attention_backend(name)
            finally:
                _AttentionBackendRegistry.set_active_backend(active)
        for block in self.blocks:
            block.attn1.spec = block.attn1.spec.with_backend(name)

    def reset_attention_backend(self) -> None:
        """Back to the default backend, `"sdpa"`."""
        self.set_attention_backend(DEFAULT_BACKEND)

    def enable_cache(self, config: Any) -> None:
        """diffusers' `CacheMixin.enable_cache` (e.g. `FirstBlockCacheConfig(threshold=...)`), with this model's block
        layout registered first so that the block hooks know what a block returns."""
        _register_block_layout()
        super().enable_cache(config)

    def _fix_state_dict_keys_on_load(self, state_dict: dict[str, Any]) -> None:
        # `from_pretrained` of a checkpoint from before `to_out` became (projection, dropout); the loader reads keys
        # straight into the parameters, bypassing `_load_from_state_dict`.
        super()._fix_state_dict_keys_on_load(state_dict)
        rename_legacy_output_projection(state_dict)

    def _add_visual_guidance(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        condition: torch.Tensor,
        kv_cache: CausalKVCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append the visual guidance tokens to the text tokens (and to their mask, visible)."""
        if kv_cache is not None and kv_cache.guidance is not None:
            key_frames = kv_cache.guidance
        else:
            count = min(self.config.visual_guidance_frames, condition.shape[2])
            key_frames = F.adaptive_avg_pool3d(
                condition[:, :, :count].float(), (count, *self.config.visual_guidance_grid)
            )
            if kv_cache is not None:  # the first chunk of a stream: every later chunk reuses its key frames
                kv_cache.guidance = key_frames
        tokens = rearrange(key_frames, "b c k h w -> b (k h w) c")
        tokens = self.visual_guidance_embedder(tokens.to(get_parameter_dtype(self.visual_guidance_embedder)))
        text = torch.cat([text, tokens.to(text.dtype)], dim=1)
        if text_mask is not None:
            visible = text_mask.new_ones(*text_mask.shape[:-1], tokens.shape[1])
            text_mask = torch.cat([text_mask, visible], dim=-1)
        return text, text_mask

    def null_text_embeds(self, batch_size: int, seq_len: int = 1) -> torch.Tensor:
        """The learned null prompt as (batch_size, seq_len, text_dim) encoder hidden states."""
        return self.null_text_embedding.expand(batch_size, seq_len, -1)

    def _check_inputs(
        self,
        hidden_states: torch.Tensor,
        condition: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        encoder_attention_mask: torch.Tensor | None,
    ) -> None:
        """Shapes and types of the inputs. Only host (CPU) tensors have their values checked (the text mask's rows):
        on an accelerator that check would read device memory and synchronise every forward pass."""
        channels = self.config.latent_channels
        check_latents(hidden_states, "hidden_states", channels=channels)
        check_latents(condition, "condition", channels=channels)
        if condition.shape != hidden_states.shape:
            raise ValueError(
                f"`condition` must have the shape of `hidden_states` {tuple(hidden_states.shape)}, "
                f"got {tuple(condition.shape)}"
            )
        batch_size = hidden_states.shape[0]
        if encoder_hidden_states is not None:
            if encoder_hidden_states.ndim != 3:
                raise ValueError(
                    "`encoder_hidden_states` must have shape (B, L, text_dim), "
                    f"got {tuple(encoder_hidden_states.shape)}"
                )
            if encoder_hidden_states.shape[0] not in (1, batch_size):
                raise ValueError(
                    f"`encoder_hidden_states` batch size must be 1 or {batch_size}, "
                    f"got {encoder_hidden_states.shape[0]}"
                )
            if encoder_hidden_states.shape[-1] != self.config.text_dim:
                raise ValueError(
                    f"`encoder_hidden_states` width must be the model's text_dim={self.config.text_dim}, "
                    f"got {encoder_hidden_states.shape[-1]}"
                )
        if encoder_attention_mask is not None:
            if encoder_hidden_states is None:
                raise ValueError("`encoder_attention_mask` needs `encoder_hidden_states`")
            expected = (encoder_hidden_states.shape[0], encoder_hidden_states.shape[1])
            if (
                encoder_attention_mask.ndim != 2
                or encoder_attention_mask.shape[1] != expected[1]
                or (encoder_attention_mask.shape[0] not in (1, expected[0]))
            ):
                raise ValueError(
                    f"`encoder_attention_mask` must have shape {expected} (B, L of encoder_hidden_states), "
                    f"got {tuple(encoder_attention_mask.shape)}"
                )
            # Reading the values of a device tensor would synchronise every forward pass: host tensors only.
            if encoder_attention_mask.device.type == "cpu" and not bool(
                encoder_attention_mask.bool().any(dim=1).all()
            ):
                raise ValueError("`encoder_attention_mask` must keep at least one text token in every row")

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        condition: torch.Tensor,
        timestep: torch.Tensor | float,
        noise_aug_level: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        frame_offset: float = 0.0,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        kv_cache: CausalKVCache | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        r"""
        Args:
            hidden_states (`torch.Tensor` of shape `(B, C, T, H, W)`): The noisy HR latent z_t.
            condition (`torch.Tensor` of shape `(B, C, T, H, W)`): The noise-augmented upsampled LR latent.
            timestep (`torch.Tensor` of shape `(B,)` or `(1,)`): Flow-matching timestep, sigma x 1000.
            noise_aug_level (`torch.Tensor` of shape `(B,)` or `(1,)`): Noise level s of the condition, in [0, 1].
            encoder_hidden_states (`torch.Tensor` of shape `(B, L, text_dim)`, *optional*): Text embeddings of
                the upstream text encoder; `None` uses the learned null embedding.
            encoder_attention_mask (`torch.Tensor` of shape `(B, L)`, *optional*): 1 for real text tokens; every
                row keeps at least one (checked for CPU tensors only, see `_check_inputs`).
            frame_offset (`float`): Added to every frame position of the RoPE (streaming inference).
            attention_kwargs (`dict`, *optional*): diffusers' calling convention. The only key is `"scale"`, the
                weight of the loaded LoRA adapters in this call (`apply_lora_scale`); no other per-call attention
                options exist (backends: `set_attention_backend`), so any other key is an error.
            return_dict (`bool`): Return a `Transformer2DModelOutput` instead of a tuple.
            kv_cache (`CausalKVCache`, *optional*): Streaming of a block-causal model (`causal_chunk_frames`):
                `hidden_states` are the next chunks (their latent frames cut into chunks of `causal_chunk_frames`;
                only the stream's last chunk may be shorter), their frame positions continue from
                `kv_cache.frames_seen` (plus `frame_offset`), each chunk attends to itself and the `m` chunks before
                it (cached or in this call), and the cache then holds the last `m` chunks' keys and values
                (`kv_cache.advance()` is called here). Several chunks per call give the numbers of one per call, with
                less fixed cost per frame.

        Returns:
            The predicted velocity `eps - z_0`, with the shape of `hidden_states`.
        """
        self._check_inputs(hidden_states, condition, encoder_hidden_states, encoder_attention_mask)
        check_frame_offset(frame_offset)
        chunk_frames = self.config.causal_chunk_frames
        if kv_cache is not None:
            if chunk_frames is None:
                raise ValueError("`kv_cache` streams a block-causal model: this one has no `causal_chunk_frames`")
            if not isinstance(kv_cache, CausalKVCache) or kv_cache.cache_chunks != self.config.causal_cache_chunks:
                raise ValueError(
                    f"`kv_cache` must be a CausalKVCache({self.config.causal_cache_chunks}) (the model's "
                    f"causal_cache_chunks), got {kv_cache!r}"
                )
            if torch.is_grad_enabled():
                raise ValueError(
                    "`kv_cache` streams inference (the cache is written in place): run the forward under "
                    "torch.no_grad() or torch.inference_mode()"
                )
            frame_offset = frame_offset + kv_cache.frames_seen
        if attention_kwargs:  # `scale` was taken by `apply_lora_scale`
            raise ValueError(
                f"`attention_kwargs` takes only the key 'scale' (LoRA weight), got {sorted(attention_kwargs)}"
            )
        batch_size, _, num_frames, height, width = hidden_states.shape
        device = hidden_states.device
        timestep = check_per_sample(
            _on_device(timestep, device), "timestep", batch_size, bounds=(0, NUM_TRAIN_TIMESTEPS)
        ).to(device)
        level = _on_device(noise_aug_level, device)
        noise_aug_level = check_per_sample(level, "noise_aug_level", batch_size, bounds=(0, 1)).to(device)

        # 1. Patchify, padding sizes that the patch does not divide.
        p_t, p_h, p_w = self.config.patch_size
        pad_t, pad_h, pad_w = (-num_frames) % p_t, (-height) % p_h, (-width) % p_w
        network_input = hidden_states
        if self.config.condition_residual_std is not None:
            sigma = timestep_to_sigma(timestep)
            prior_mean, prior_std = condition_prior(condition, noise_aug_level, self.config.condition_residual_std)
            network_input = preconditioned_input(hidden_states, sigma, prior_mean, prior_std).to(hidden_states.dtype)
        x = torch.cat([network_input, condition.to(hidden_states.dtype)], dim=1)
        x = F.pad(x, (0, pad_w, 0, pad_h, 0, pad_t))
        # Each input goes in the dtype its layer computes in: under `enable_layerwise_casting` that is the compute
        # dtype, not the (fp8) dtype the weights are stored in. Channels-last, the patch embedding writes its output
        # token-major, as the blocks read it, and oneDNN runs it as one matrix product instead of a strided one.
        x = x.to(get_parameter_dtype(self.patch_embedding)).contiguous(memory_format=torch.channels_last_3d)
        x = self.patch_embedding(x)
        grid = tuple(x.shape[2:])
        # Token-major in memory (a view after the channels-last embedding): element-wise ops take the layout of their
        # first input, so a transposed stream would make every norm and linear layer of every block copy it first.
        # The blocks compute in the model's dtype (the embedding may be kept in float32).
        x = rearrange(x, "b d t h w -> b (t h w) d").to(self.dtype).contiguous()
        rotary_emb = self.rope(grid, frame_offset, device=x.device)
        causal = None
        if kv_cache is not None:
            visibility, key_frames = kv_cache.visibility(grid[0], chunk_frames)
            causal = CausalContext(visibility, key_frames, kv_cache)
        elif chunk_frames is not None:
            chunks = chunk_ids(grid[0], chunk_frames)
            causal = CausalContext(chunk_visibility(chunks, chunks, self.config.causal_cache_chunks), grid[0])

        # 2. Conditioning: timestep + noise-level embedding -> shared AdaLN-zero modulation; text projection.
        time_features = self.time_proj(timestep.float())
        level_features = self.time_proj(noise_aug_level.float() * NUM_TRAIN_TIMESTEPS)
        temb = self.time_embedder(time_features.to(get_parameter_dtype(self.time_embedder)))
        temb = temb + self.noise_level_embedder(level_features.to(get_parameter_dtype(self.noise_level_embedder)))
        modulation = self.modulation_proj(F.silu(temb).to(get_parameter_dtype(self.modulation_proj)))
        modulation = rearrange(modulation, "b (six d) -> b six d", six=6)

        if encoder_hidden_states is None:
            encoder_hidden_states = self.null_text_embeds(batch_size)
        text = self.text_embedder(encoder_hidden_states.to(get_parameter_dtype(self.text_embedder)))
        text = text.to(x.dtype).expand(batch_size, -1, -1)
        text_mask = None
        if encoder_attention_mask is not None:
            text_mask = rearrange(encoder_attention_mask.bool(), "b l -> b 1 1 l").expand(batch_size, -1, -1, -1)
        if self.visual_guidance_embedder is not None:
            text, text_mask = self._add_visual_guidance(text, text_mask, condition, kv_cache)

        # 3. Blocks
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, text, text_mask, modulation, rotary_emb, grid, causal)
            else:
                x = block(x, text, text_mask, modulation, rotary_emb, grid, causal)

        # 4. Output modulation, projection, unpatchify, crop the padding.
        shift, scale = (self.scale_shift_table + temb[:, None].float()).unbind(dim=1)
        x = self.proj_out(torch.addcmul(shift[:, None], self.norm_out(x.float()), 1 + scale[:, None]).type_as(x))
        t, h, w = grid
        output = rearrange(
            x, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)", t=t, h=h, w=w, pt=p_t, ph=p_h, pw=p_w
        )
        output = output[:, :, :num_frames, :height, :width]
        if self.config.condition_residual_std is not None:
            output = preconditioned_velocity(output, hidden_states, sigma, prior_mean, prior_std)
        output = output.to(hidden_states.dtype)
        if kv_cache is not None:
            kv_cache.advance()

        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
