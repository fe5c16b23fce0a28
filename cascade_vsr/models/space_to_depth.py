"""A lossless space-to-depth "autoencoder": pixel space as a latent space.

It lets the cascade stage run on pixels through exactly the same pipeline code as on a learned VAE's
latents: for demos, tests, and users without a learned VAE. Factor 4 turns RGB video (B, 3, T, H, W) into
48-channel latents (B, 48, T, H/4, W/4) with no temporal compression, and decoding inverts it exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange

from cascade_vsr.core.validation import check_latents


class SpaceToDepthAutoencoder(ModelMixin, ConfigMixin):
    r"""
    Pixel (un)shuffle with the `AutoencoderKL` API: `encode(x).latent_dist` and `decode(z).sample`.

    Args:
        in_channels (`int`): Channels of the video (3 for RGB).
        factor (`int`): Spatial factor; latents have `in_channels * factor**2` channels.
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, factor: int = 4):
        super().__init__()
        if in_channels <= 0 or factor <= 0:
            raise ValueError(f"`in_channels` and `factor` must be positive, got {in_channels=}, {factor=}")
        # No weights. One saved buffer so that .device / .dtype, save_pretrained and from_pretrained
        # (which expect a weights file) behave as for a learned VAE.
        self.register_buffer("anchor", torch.zeros(()))

    @property
    def dtype(self) -> torch.dtype:
        """float32, whatever dtype the module was cast to: it has no weights and moves values exactly, so the callers
        that cast the video or the latents to `vae.dtype` keep the clip at full precision (in bfloat16 a pixel near
        white moves by up to a quarter of a grey level, differently in every frame)."""
        return torch.float32

    @property
    def latent_channels(self) -> int:
        return self.config.in_channels * self.config.factor**2

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """(B, C, T, H, W) video in [-1, 1] -> a deterministic latent distribution of (B, C*f*f, T, H/f, W/f)."""
        check_latents(x, "x", channels=self.config.in_channels)
        factor = self.config.factor
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"`x` height and width must be multiples of factor={factor}, got {tuple(x.shape[-2:])}")
        batch = x.shape[0]
        latents = F.pixel_unshuffle(rearrange(x, "b c t h w -> (b t) c h w"), factor)
        latents = rearrange(latents, "(b t) c h w -> b c t h w", b=batch)
        posterior = DiagonalGaussianDistribution(
            torch.cat([latents, torch.zeros_like(latents)], dim=1), deterministic=True
        )
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """(B, C*f*f, T, h, w) latents -> (B, C, T, h*f, w*f) video."""
        check_latents(z, "z", channels=self.latent_channels)
        batch = z.shape[0]
        video = F.pixel_shuffle(rearrange(z, "b c t h w -> (b t) c h w"), self.config.factor)
        video = rearrange(video, "(b t) c h w -> b c t h w", b=batch)
        if not return_dict:
            return (video,)
        return DecoderOutput(sample=video)

    def forward(self, sample: torch.Tensor) -> DecoderOutput:
        return self.decode(self.encode(sample).latent_dist.mode())
