"""The latent upsampler: LR latents of the base model -> HR-sized latents (SimpleGVR section 4.1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from einops import rearrange

from cascade_vsr.core.validation import check_latents, check_spatial_size
from cascade_vsr.models.loading import SafeLoadingMixin

RESIZE_MODES = ("bilinear", "bicubic")


def resize_frames(
    latents: torch.Tensor, size: tuple[int, int], mode: str = "bilinear", space_to_depth_factor: int = 1
) -> torch.Tensor:
    """Resize the spatial dims of (B, C, T, h, w) latents to `size`, frame by frame.

    Any target size works, including non-integer factors (64x112 -> 135x240). With `space_to_depth_factor`
    f > 1 the latents are pixel-unshuffled video (channels = C/f² colours x f² pixel phases): interpolating
    them channel by channel would blend the same phase of neighbouring f x f blocks, samples f pixels apart,
    which is not a resize of the picture. The resize then happens on the pixel grid: shuffle to pixels,
    interpolate to `size` x f, unshuffle.
    """
    batch = latents.shape[0]
    frames = rearrange(latents, "b c t h w -> (b t) c h w")
    factor = space_to_depth_factor
    if factor > 1:
        frames = F.pixel_shuffle(frames, factor)
    frames = F.interpolate(frames, size=(size[0] * factor, size[1] * factor), mode=mode, align_corners=False)
    if factor > 1:
        frames = F.pixel_unshuffle(frames, factor)
    return rearrange(frames, "(b t) c h w -> b c t h w", b=batch)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per frame, so that an output frame depends only on nearby input frames
    (through the convolutions) and chunked or streaming inference sees the same numbers."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch = hidden_states.shape[0]
        frames = super().forward(rearrange(hidden_states, "b c t h w -> (b t) c h w"))
        return rearrange(frames, "(b t) c h w -> b c t h w", b=batch)


class ResBlock3D(nn.Module):
    """Pre-activation residual block of two 3x3x3 convolutions."""

    def __init__(self, channels: int, num_groups: int = 8):
        super().__init__()
        self.norm1 = FrameGroupNorm(num_groups, channels)
        self.conv1 = nn.Conv3d(channels, channels, kernel_size=3, padding=1)
        self.norm2 = FrameGroupNorm(num_groups, channels)
        self.conv2 = nn.Conv3d(channels, channels, kernel_size=3, padding=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.conv1(F.silu(self.norm1(hidden_states)))
        hidden_states = self.conv2(F.silu(self.norm2(hidden_states)))
        return hidden_states + residual


@dataclass
class LatentUpsampler3DOutput(BaseOutput):
    r"""
    Output of [`LatentUpsampler3D`].

    Args:
        sample (`torch.Tensor` of shape `(B, C, T, H, W)`): The latents upsampled to the target latent size.
    """

    sample: torch.Tensor


class LatentUpsampler3D(SafeLoadingMixin, ModelMixin, ConfigMixin):
    r"""
    Upsamples base-model latents to any target latent size: 3D convs at LR, a base resize, 3D convs at HR.

    The output is `resize(x) + residual(x)`, where the residual branch ends in a zero-initialised
    convolution. A freshly initialised upsampler is therefore exactly a plain resize (bilinear in latent
    space; bicubic on the pixel grid for space-to-depth latents), so joint training with the transformer
    starts from a sane condition instead of noise. Frame count is kept.

    Args:
        latent_channels (`int`): Channels of the latent space (16 for Wan / CogVideoX / HunyuanVideo).
        hidden_channels (`int`): Width of the convolutional residual branch.
        num_blocks (`int`): Residual blocks before the resize (at LR, where they are cheap).
        num_groups (`int`): Groups of the GroupNorm layers; must divide `hidden_channels`.
        resize_mode (`str`): Interpolation of the base resize, "bilinear" or "bicubic".
        space_to_depth_factor (`int`): 1 for latents of a learned VAE. f > 1 for pixel-unshuffled video
            (`SpaceToDepthAutoencoder`, f = 4): the base resize then runs on the pixel grid.
    """

    _supports_gradient_checkpointing = True
    # Norms stay in the model's dtype under `enable_layerwise_casting` (fp8 storage would cost accuracy and save
    # nothing: they are tiny).
    _skip_layerwise_casting_patterns = ["norm"]

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 16,
        hidden_channels: int = 128,
        num_blocks: int = 2,
        num_groups: int = 8,
        resize_mode: str = "bilinear",
        space_to_depth_factor: int = 1,
    ):
        super().__init__()
        if latent_channels <= 0 or hidden_channels <= 0 or num_blocks < 0:
            raise ValueError(
                "latent_channels and hidden_channels must be positive and num_blocks >= 0, got "
                f"{latent_channels=}, {hidden_channels=}, {num_blocks=}"
            )
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"`resize_mode` must be one of {RESIZE_MODES}, got {resize_mode!r}")
        if space_to_depth_factor < 1 or latent_channels % space_to_depth_factor**2:
            raise ValueError(
                f"`space_to_depth_factor` must be >= 1 with factor**2 dividing latent_channels ({latent_channels}), "
                f"got {space_to_depth_factor!r}"
            )
        if hidden_channels % num_groups:
            raise ValueError(f"num_groups ({num_groups}) must divide hidden_channels ({hidden_channels})")

        self.conv_in = nn.Conv3d(latent_channels, hidden_channels, kernel_size=3, padding=1)
        self.lr_blocks = nn.ModuleList([ResBlock3D(hidden_channels, num_groups) for _ in range(num_blocks)])
        self.hr_norm = FrameGroupNorm(num_groups, hidden_channels)
        self.hr_conv = nn.Conv3d(hidden_channels, hidden_channels, kernel_size=3, padding=1)
        self.conv_out = nn.Conv3d(hidden_channels, latent_channels, kernel_size=3, padding=1)
        self.reset_residual()
        self.gradient_checkpointing = False

    @property
    def temporal_radius(self) -> int:
        """Latent frames on each side that an output frame depends on: one per 3x3x3 convolution in the chain
        (conv_in, two per residual block, hr_conv, conv_out); the norms are per frame."""
        return 3 + 2 * self.config.num_blocks

    def reset_residual(self) -> None:
        """Zero the residual branch's last convolution: the upsampler becomes exactly its base resize again."""
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(
        self, lr_latents: torch.Tensor, size: tuple[int, int], return_dict: bool = True
    ) -> LatentUpsampler3DOutput | tuple[torch.Tensor]:
        """Upsample (B, C, T, h, w) latents to (B, C, T, *size): a `LatentUpsampler3DOutput`, or with
        `return_dict=False` the tuple `(sample,)` (diffusers' model convention)."""
        check_latents(lr_latents, "lr_latents", channels=self.config.latent_channels)
        size = check_spatial_size(size, "size")

        base = resize_frames(
            lr_latents, size, self.config.resize_mode, space_to_depth_factor=self.config.space_to_depth_factor
        )

        hidden_states = self.conv_in(lr_latents)
        for block in self.lr_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(block, hidden_states)
            else:
                hidden_states = block(hidden_states)
        hidden_states = resize_frames(hidden_states, size)
        hidden_states = self.hr_conv(F.silu(self.hr_norm(hidden_states)))
        residual = self.conv_out(F.silu(hidden_states))
        sample = base + residual
        if not return_dict:
            return (sample,)
        return LatentUpsampler3DOutput(sample=sample)
