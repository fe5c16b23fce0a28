"""The conditional DiT of cascade-vsr: noisy HR latent + noise-augmented upsampled LR latent -> velocity."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionModuleMixin, FeedForward
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import PixArtAlphaTextProjection, TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm
from einops import rearrange

from cascade_vsr.core.flow import (
    NUM_TRAIN_TIMESTEPS,
    condition_prior,
    preconditioned_input,
    preconditioned_velocity,
    timestep_to_sigma,
)
from cascade_vsr.core.validation import check_latents, check_per_sample
from cascade_vsr.models.attention import (
    ATTENTION_BACKENDS,
    check_attention_mode,
    check_temporal_unit,
    check_topk,
    check_window,
    self_attention,
)

# ---------------------------------------------------------------------------------------------------------------
# 3D rotary position embedding
# ---------------------------------------------------------------------------------------------------------------


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Split an (even) head dim between the t, h and w axes: h and w get 1/3 each, t the rest."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"attention_head_dim must be even and >= 6 for 3D RoPE, got {head_dim}")
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def rope_cos_sin(
    grid: Sequence[int],
    head_dim: int,
    theta: float = 10000.0,
    frame_offset: float = 0.0,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the 3D RoPE angles for a (T, H, W) token grid, each of shape (T*H*W, head_dim).

    Channel pairs (2i, 2i+1) rotate together. Positions are token indices, so attention scores depend
    only on relative offsets: any T, H, W works without retraining, and `frame_offset` (streaming) is free.
    Angles are computed in float64 so that large offsets keep their precision.
    """
    num_frames, height, width = grid
    positions = (
        torch.arange(num_frames, device=device, dtype=torch.float64) + frame_offset,
        torch.arange(height, device=device, dtype=torch.float64),
        torch.arange(width, device=device, dtype=torch.float64),
    )
    angles = []
    for pos, dim in zip(positions, rope_axis_dims(head_dim)):
        inv_freq = theta ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim)
        angles.append(torch.outer(pos, inv_freq).repeat_interleave(2, dim=-1))
    t_angles, h_angles, w_angles = angles
    angles = torch.cat(
        [
            t_angles[:, None, None, :].expand(num_frames, height, width, -1),
            h_angles[None, :, None, :].expand(num_frames, height, width, -1),
            w_angles[None, None, :, :].expand(num_frames, height, width, -1),
        ],
        dim=-1,
    )
    angles = rearrange(angles, "t h w d -> (t h w) d")
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of x (B, heads, N, D) by the angles whose cos/sin are (N, D)."""
    x_float = x.float()
    pairs = rearrange(x_float, "... (d two) -> ... d two", two=2)
    rotated = rearrange(torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1), "... d two -> ... (d two)")
    return (x_float * cos + rotated * sin).type_as(x)


# ---------------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------------


class CascadeVSRAttnProcessor:
    """Projections, q/k RMSNorm and RoPE; self-attention goes through `self_attention` (per-layer mode).

    Full attention and text cross-attention go through diffusers' `dispatch_attention_fn`, so
    `model.set_attention_backend(...)` (flash, sage, ...) applies to them.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: CascadeVSRAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        grid: tuple[int, int, int] | None = None,
    ) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = rearrange(attn.to_q(hidden_states), "b n (h d) -> b n h d", h=attn.heads)
        key = rearrange(attn.to_k(context), "b n (h d) -> b n h d", h=attn.heads)
        value = rearrange(attn.to_v(context), "b n (h d) -> b n h d", h=attn.heads)
        query, key = attn.norm_q(query), attn.norm_k(key)

        plain_full = attn.attention_mode == "full" and attn.attention_options.get("temporal_unit") is None
        if encoder_hidden_states is not None or (plain_full and self._attention_backend):
            # Text cross-attention, or full self-attention on a user-selected diffusers backend.
            if rotary_emb is not None:
                query, key = (rearrange(x, "b n h d -> b h n d") for x in (query, key))
                query, key = apply_rope(query, *rotary_emb), apply_rope(key, *rotary_emb)
                query, key = (rearrange(x, "b h n d -> b n h d") for x in (query, key))
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend)
            out = rearrange(out, "b n h d -> b n (h d)")
        else:
            query, key, value = (rearrange(x, "b n h d -> b h n d") for x in (query, key, value))
            query, key = apply_rope(query, *rotary_emb), apply_rope(key, *rotary_emb)
            out = self_attention(
                query, key, value, grid, mode=attn.attention_mode, shift=attn.shift, **attn.attention_options
            )
            out = rearrange(out, "b h n d -> b n (h d)")
        return attn.to_out(out.type_as(hidden_states))


class CascadeVSRAttention(nn.Module, AttentionModuleMixin):
    """Multi-head attention with per-head RMSNorm on queries and keys.

    `attention_mode`, `shift` and `attention_options` only select how self-attention is computed; they own
    no parameters, so a checkpoint trained with one mode loads and runs with another.
    """

    _default_processor_cls = CascadeVSRAttnProcessor
    _available_processors = [CascadeVSRAttnProcessor]
    _supports_qkv_fusion = False

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        eps: float = 1e-6,
        attention_mode: str = "full",
        shift: bool = False,
        attention_options: dict[str, Any] | None = None,
    ):
        super().__init__()
        inner_dim = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner_dim)
        self.to_k = nn.Linear(dim, inner_dim)
        self.to_v = nn.Linear(dim, inner_dim)
        self.to_out = nn.Linear(inner_dim, dim)
        self.norm_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps)
        self.attention_mode = attention_mode
        self.shift = shift
        self.attention_options = dict(attention_options or {})
        self.set_processor(CascadeVSRAttnProcessor())

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        grid: tuple[int, int, int] | None = None,
    ) -> torch.Tensor:
        return self.processor(self, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, grid)


# ---------------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------------


class CascadeVSRTransformerBlock(nn.Module):
    """Self-attention, text cross-attention and feed-forward; AdaLN-zero modulation of self-attn and FFN."""

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        head_dim: int,
        eps: float = 1e-6,
        attention_mode: str = "full",
        shift: bool = False,
        attention_options: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = CascadeVSRAttention(dim, num_heads, head_dim, eps, attention_mode, shift, attention_options)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True)
        self.attn2 = CascadeVSRAttention(dim, num_heads, head_dim, eps)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = FeedForward(dim, inner_dim=ffn_dim, activation_fn="gelu-approximate")
        # Zero: with the zero-initialised shared time projection, every gate starts at 0 (AdaLN-zero),
        # so each block starts as the identity.
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 6, dim))

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        modulation: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        grid: tuple[int, int, int],
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = (
            self.scale_shift_table + modulation.float()
        ).unbind(dim=1)

        norm_hidden = self.norm1(hidden_states.float()) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        attn_out = self.attn1(norm_hidden.type_as(hidden_states), rotary_emb=rotary_emb, grid=grid)
        hidden_states = (hidden_states.float() + attn_out.float() * gate_msa[:, None]).type_as(hidden_states)

        cross_out = self.attn2(
            self.norm2(hidden_states),
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=encoder_attention_mask,
        )
        hidden_states = hidden_states + cross_out

        norm_hidden = self.norm3(hidden_states.float()) * (1 + scale_ffn[:, None]) + shift_ffn[:, None]
        ffn_out = self.ffn(norm_hidden.type_as(hidden_states))
        return (hidden_states.float() + ffn_out.float() * gate_ffn[:, None]).type_as(hidden_states)


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


class CascadeVSRTransformer3DModel(ModelMixin, ConfigMixin):
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
        text_dim (`int`): Width of the upstream text encoder's embeddings (4096 for T5-XXL).
        patch_size (`tuple[int, int, int]`): (t, h, w) patch; sizes it does not divide are padded and cropped.
        attention_mode (`str` or `list[str]`): Self-attention mode of every layer, or one per layer: `"full"`,
            `"sparse_topk"` (SimpleGVR sparse local attention) or `"window"` (SeedVR2 adaptive 3D windows).
            Modes own no parameters: a checkpoint loads with any mode (`from_pretrained(path, attention_mode=...)`).
            Odd layers shift (windows, temporal units).
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
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["CascadeVSRTransformerBlock"]
    _keep_in_fp32_modules = ["time_embedder", "noise_level_embedder", "scale_shift_table", "norm1", "norm3"]
    _skip_layerwise_casting_patterns = ["patch_embedding", "norm"]

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
        if len(patch_size) != 3 or any(p <= 0 for p in patch_size):
            raise ValueError(f"`patch_size` must be a (t, h, w) triple of positive ints, got {patch_size}")
        modes = [attention_mode] * num_layers if isinstance(attention_mode, str) else list(attention_mode)
        if len(modes) != num_layers:
            raise ValueError(f"`attention_mode` must be a string or a list of {num_layers} strings, got {len(modes)}")
        for i, mode in enumerate(modes):
            check_attention_mode(mode, f"attention_mode[{i}]")
        check_window(sparse_window, 2, "sparse_window")
        check_topk(sparse_topk, "sparse_topk")
        check_temporal_unit(temporal_unit, "temporal_unit")
        if window_size is not None:
            check_window(window_size, 3, "window_size")
        check_window(window_reference, 2, "window_reference")
        if condition_residual_std is not None and not condition_residual_std > 0:
            raise ValueError(f"`condition_residual_std` must be None or > 0, got {condition_residual_std!r}")

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

        self.blocks = nn.ModuleList(
            [
                CascadeVSRTransformerBlock(
                    inner_dim,
                    ffn_dim,
                    num_attention_heads,
                    attention_head_dim,
                    eps,
                    attention_mode=mode,
                    shift=bool(i % 2),
                    attention_options=self._attention_options(mode),
                )
                for i, mode in enumerate(modes)
            ]
        )

        self.norm_out = FP32LayerNorm(inner_dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 2, inner_dim))
        self.proj_out = nn.Linear(inner_dim, latent_channels * math.prod(patch_size))
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

        self.gradient_checkpointing = False

    def _attention_options(self, mode: str) -> dict[str, Any]:
        """Keyword options of `self_attention` for a layer of `mode`, read from the config."""
        config = self.config
        temporal_unit = config.temporal_unit
        if mode == "full":
            return {"temporal_unit": temporal_unit}
        if mode == "sparse_topk":
            return {"window": tuple(config.sparse_window), "topk": config.sparse_topk, "temporal_unit": temporal_unit}
        window = None if config.window_size is None else tuple(config.window_size)
        return {"window": window, "window_reference": tuple(config.window_reference)}

    def set_local_attention_backend(self, backend: str = "sdpa") -> None:
        """Run the `sparse_topk` and `window` layers on "sdpa" (default, differentiable everywhere) or "flex"
        (FlexAttention with a block mask, compiled on CUDA; forward only on CPU)."""
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"`backend` must be one of {ATTENTION_BACKENDS}, got {backend!r}")
        for block in self.blocks:
            if block.attn1.attention_mode != "full":
                block.attn1.attention_options["backend"] = backend

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
            if not encoder_attention_mask.bool().any(dim=1).all():
                raise ValueError("`encoder_attention_mask` must keep at least one text token in every row")

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
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        r"""
        Args:
            hidden_states (`torch.Tensor` of shape `(B, C, T, H, W)`): The noisy HR latent z_t.
            condition (`torch.Tensor` of shape `(B, C, T, H, W)`): The noise-augmented upsampled LR latent.
            timestep (`torch.Tensor` of shape `(B,)` or `(1,)`): Flow-matching timestep, sigma x 1000.
            noise_aug_level (`torch.Tensor` of shape `(B,)` or `(1,)`): Noise level s of the condition, in [0, 1].
            encoder_hidden_states (`torch.Tensor` of shape `(B, L, text_dim)`, *optional*): Text embeddings of
                the upstream text encoder; `None` uses the learned null embedding.
            encoder_attention_mask (`torch.Tensor` of shape `(B, L)`, *optional*): 1 for real text tokens.
            frame_offset (`float`): Added to every frame position of the RoPE (streaming inference).
            attention_kwargs (`dict`, *optional*): Reserved for LoRA scale and attention options.
            return_dict (`bool`): Return a `Transformer2DModelOutput` instead of a tuple.

        Returns:
            The predicted velocity `eps - z_0`, with the shape of `hidden_states`.
        """
        self._check_inputs(hidden_states, condition, encoder_hidden_states, encoder_attention_mask)
        batch_size, _, num_frames, height, width = hidden_states.shape
        timestep = check_per_sample(timestep, "timestep", batch_size).to(hidden_states.device)
        noise_aug_level = check_per_sample(noise_aug_level, "noise_aug_level", batch_size).to(hidden_states.device)

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
        x = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))
        grid = tuple(x.shape[2:])
        x = rearrange(x, "b d t h w -> b (t h w) d")
        rotary_emb = rope_cos_sin(
            grid, self.config.attention_head_dim, self.config.rope_theta, frame_offset, device=x.device
        )

        # 2. Conditioning: timestep + noise-level embedding -> shared AdaLN-zero modulation; text projection.
        time_features = self.time_proj(timestep.float())
        level_features = self.time_proj(noise_aug_level.float() * NUM_TRAIN_TIMESTEPS)
        temb = self.time_embedder(time_features.to(self.time_embedder.linear_1.weight.dtype))
        temb = temb + self.noise_level_embedder(level_features.to(temb.dtype))
        modulation = rearrange(self.modulation_proj(F.silu(temb)), "b (six d) -> b six d", six=6)

        if encoder_hidden_states is None:
            encoder_hidden_states = self.null_text_embeds(batch_size)
        text = self.text_embedder(encoder_hidden_states.to(self.text_embedder.linear_1.weight.dtype))
        text = text.to(x.dtype).expand(batch_size, -1, -1)
        text_mask = None
        if encoder_attention_mask is not None:
            text_mask = rearrange(encoder_attention_mask.bool(), "b l -> b 1 1 l").expand(batch_size, -1, -1, -1)

        # 3. Blocks
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, text, text_mask, modulation, rotary_emb, grid)
            else:
                x = block(x, text, text_mask, modulation, rotary_emb, grid)

        # 4. Output modulation, projection, unpatchify, crop the padding.
        shift, scale = (self.scale_shift_table + temb[:, None].float()).unbind(dim=1)
        x = (self.norm_out(x.float()) * (1 + scale[:, None]) + shift[:, None]).type_as(x)
        x = self.proj_out(x)
        t, h, w = grid
        output = rearrange(
            x, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)", t=t, h=h, w=w, pt=p_t, ph=p_h, pw=p_w
        )
        output = output[:, :, :num_frames, :height, :width]
        if self.config.condition_residual_std is not None:
            output = preconditioned_velocity(output, hidden_states, sigma, prior_mean, prior_std)
        output = output.to(hidden_states.dtype)

        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
