"""Adapters between the latent formats of upstream text-to-video pipelines and the model's latent space.

Every upstream pipeline of diffusers returns, with `output_type="latent"`, the latents its own transformer
works on, in its own layout: Wan, HunyuanVideo and Mochi return (B, C, T, h, w), CogVideoX (B, T, C, h, w)
and LTX-Video packed tokens (B, S, D). The model space of cascade-vsr is that family's normalized latent in
the (B, C, T, h, w) layout, so `to_model` / `from_model` are pure layout changes (exact round trips), while
`to_vae` / `from_vae` apply the family's (de)normalization with exactly the operations of the upstream
pipeline's decode path (diffusers 0.42), so that decoding through an adapter gives the upstream's pixels.

`stream_decoder` decodes a latent stream chunk by chunk with the numbers of one whole-clip decode: statelessly
where every latent frame decodes on its own (space-to-depth), and for Wan by carrying its VAE's causal-conv cache
from chunk to chunk; the other families' VAEs refuse (their decoders see across chunk boundaries). `stream_encoder`
is its counterpart for pixel frames: pieces of any length in, the latents of one whole-clip `encode` out.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from einops import rearrange

from cascade_vsr.core.validation import check_latents

# Upstream text-to-video families; `space_to_depth` (pixel space, see SpaceToDepthAdapter) is a latent space too.
FAMILIES = ("wan", "cogvideox", "hunyuan_video", "ltx_video", "mochi")

# VAE class name -> family; the VAE defines a latent space, so it identifies the family.
_VAE_FAMILIES = {
    "AutoencoderKLWan": "wan",
    "AutoencoderKLCogVideoX": "cogvideox",
    "AutoencoderKLHunyuanVideo": "hunyuan_video",
    "AutoencoderKLLTXVideo": "ltx_video",
    "AutoencoderKLMochi": "mochi",
    "SpaceToDepthAutoencoder": "space_to_depth",
}
# Pipeline class name prefix -> family, for pipelines loaded without a VAE.
_PIPELINE_PREFIXES = {
    "Wan": "wan",
    "CogVideoX": "cogvideox",
    "HunyuanVideo": "hunyuan_video",
    "LTX": "ltx_video",
    "Mochi": "mochi",
}


def _retrieve_latents(encoder_output: Any, generator: torch.Generator | None, sample: bool) -> torch.Tensor:
    """The posterior mode (deterministic, diffusers' "argmax") or a sample of a VAE encoding."""
    if hasattr(encoder_output, "latent_dist"):
        dist = encoder_output.latent_dist
        return dist.sample(generator) if sample else dist.mode()
    if hasattr(encoder_output, "latents"):
        return encoder_output.latents
    raise ValueError(f"cannot read latents from a VAE encoder output of type {type(encoder_output).__name__}")


def _channel_vector(values: Any, like: torch.Tensor) -> torch.Tensor:
    """Per-channel statistics as a (1, C, 1, 1, 1) tensor on the device and dtype of `like`."""
    return torch.as_tensor(values).view(1, -1, 1, 1, 1).to(like.device, like.dtype)


class StreamDecoder(Protocol):
    """Decodes a latent stream chunk after chunk, carrying whatever state the VAE needs between chunks."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The next model-space chunk (B, C, Tc, h, w), any Tc >= 1 -> the pixel frames (B, 3, T', H, W) it
        completes, in about [-1, 1]; concatenated over the stream, they are the whole clip's decode."""
        ...


class ChunkDecoder:
    """Stateless: each chunk through `adapter.decode`, exact only where every latent frame decodes on its own."""

    def __init__(self, adapter: LatentAdapter, vae: Any):
        self.adapter, self.vae = adapter, vae

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.adapter.decode(self.vae, latents)


class WanStreamDecoder:
    """Wan's causal VAE, chunk by chunk, exactly as one `vae.decode` of the whole clip.

    `AutoencoderKLWan._decode` already runs its decoder one latent frame at a time, each causal convolution
    reading the last input frames of the previous call from a feature cache (`feat_cache`, indexed by
    `feat_idx`); the first latent frame is decoded with `first_chunk=True` (one pixel frame, not four). This keeps
    its own such cache from chunk to chunk (the VAE's is cleared by every `vae.decode`, so whole-clip decodes in
    between do not disturb the stream). Then, like `_decode`: unpatchify (Wan 2.2's 48-channel VAE, `patch_size`)
    and clamp to [-1, 1]. Spatial tiling is not streamed.
    """

    def __init__(self, adapter: LatentAdapter, vae: Any):
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        self.adapter, self.vae = adapter, vae
        # One slot per causal convolution of the decoder, as `AutoencoderKLWan.clear_cache` sizes its own.
        self.feat_cache: list[Any] = [None] * sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        self.first_chunk = True

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        from diffusers.utils.accelerate_utils import apply_forward_hook

        check_latents(latents, "latents", channels=self.adapter.latent_channels)
        vae = self.vae
        tiled_height = latents.shape[3] > vae.tile_sample_min_height // vae.spatial_compression_ratio
        tiled_width = latents.shape[4] > vae.tile_sample_min_width // vae.spatial_compression_ratio
        if vae.use_tiling and (tiled_height or tiled_width):  # `_decode`'s test for `tiled_decode`
            raise ValueError(
                "a tiled Wan VAE decode (`enable_vae_tiling`) is not streamed: call `disable_vae_tiling()` or use "
                "output_type='latent'"
            )
        raw = self.adapter.to_vae(latents.to(vae.device, vae.dtype), vae)
        # `apply_forward_hook`: with model CPU offload, moves the VAE to the device as `vae.decode` does.
        return apply_forward_hook(self._decode_raw)(vae, raw)

    def _decode_raw(self, vae: Any, raw: torch.Tensor) -> torch.Tensor:
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        x = vae.post_quant_conv(raw)  # a 1x1x1 convolution: per frame
        frames = []
        for i in range(x.shape[2]):
            frames.append(
                vae.decoder(x[:, :, i : i + 1], feat_cache=self.feat_cache, feat_idx=[0], first_chunk=self.first_chunk)
            )
            self.first_chunk = False
        out = torch.cat(frames, dim=2)
        if vae.config.patch_size is not None:
            out = unpatchify(out, patch_size=vae.config.patch_size)
        return torch.clamp(out, min=-1.0, max=1.0)


class StreamEncoder(Protocol):
    """Encodes a pixel-frame stream piece after piece, carrying whatever state the VAE needs between pieces."""

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """The next pixel frames (B, 3, Tp, H, W) in [-1, 1], any Tp >= 1 -> the model-space latents
        (B, C, T', h, w) that the frames received so far complete, posterior modes. T' may be 0: then an empty
        tensor (never None), so that `torch.cat` over a stream's outputs is the whole clip's `adapter.encode`."""
        ...

    def finish(self) -> torch.Tensor:
        """End of the stream: the latents still pending (an empty (B, C, 0, h, w) tensor for these encoders, which
        return every latent as soon as its frames have arrived); a ValueError if the frames received are not a
        clip that the VAE encodes (Wan: 4k+1 frames)."""
        ...


class _PieceChecks:
    """Shared by the stream encoders: each piece is checked, and keeps the batch and size of the first."""

    def __init__(self, adapter: LatentAdapter, vae: Any):
        self.adapter, self.vae = adapter, vae
        self.frames_received = 0
        self.finished = False
        self._size: tuple[int, int, int] | None = None  # (B, H, W) of the first piece
        self._empty: torch.Tensor | None = None  # a (B, C, 0, h, w) latent tensor, once one latent is known

    def _check_piece(self, frames: torch.Tensor) -> None:
        if self.finished:
            raise ValueError("this stream is finished: start another with `adapter.stream_encoder(vae)`")
        check_latents(frames, "frames", channels=3, layout="(B, 3, T, H, W)")
        self._check_vae(frames)
        size = (frames.shape[0], *frames.shape[3:])
        if self._size is None:
            self._size = size
        elif size != self._size:
            raise ValueError(
                f"`frames` must keep the batch and size (B, H, W) = {self._size} of the stream's first piece, got "
                f"{tuple(frames.shape)}"
            )

    def _check_vae(self, frames: torch.Tensor) -> None:
        """What the VAE's settings refuse to stream."""

    def _finish(self) -> torch.Tensor:
        if self._empty is None:
            raise ValueError("the stream received no frames: nothing to encode")
        self.finished = True
        return self._empty


class ChunkEncoder(_PieceChecks):
    """Stateless: each piece through `adapter.encode`, exact only where every frame encodes on its own."""

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        self._check_piece(frames)
        latents = self.adapter.encode(self.vae, frames)
        self.frames_received += frames.shape[2]
        self._empty = latents[:, :, :0]
        return latents

    def finish(self) -> torch.Tensor:
        return self._finish()


class WanStreamEncoder(_PieceChecks):
    """Wan's causal VAE, piece by piece, exactly as one `adapter.encode` of the whole clip (posterior mode).

    `AutoencoderKLWan._encode` runs its encoder on the first frame alone, then on groups of 4 frames, each causal
    convolution reading the last input frames of the previous group from a feature cache (`feat_cache` indexed by
    `feat_idx`); the groups matter (the stride-2 temporal convolutions and Wan 2.2's `AvgDown3D`, which pads each
    call's frames to its factor, assume whole groups). This buffers the frames of an incomplete group (at most 3)
    and encodes the same groups with its own such cache (the VAE's is cleared by every `vae.encode`, so whole-clip
    encodes in between do not disturb the stream). Like `_encode`: patchify first (Wan 2.2's 48-channel VAE,
    `patch_size`; per frame), then `quant_conv` (a 1x1x1 convolution) and the posterior's mode, normalized by
    `from_vae`.

    A clip of 4k+1 frames (what `adapter.encode` accepts) ends on a complete group; `finish()` refuses any other
    length (1 to 3 frames left over) rather than drop them as `AutoencoderKLWan.encode` silently would. Spatial
    tiling is not streamed; `enable_slicing` is not applied (the batch is encoded together).
    """

    group_frames = 4  # `AutoencoderKLWan._encode`: frame 0 alone, then frames 1 + 4 (i - 1) .. 1 + 4 i

    def __init__(self, adapter: LatentAdapter, vae: Any):
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        super().__init__(adapter, vae)
        # One slot per causal convolution of the encoder, as `AutoencoderKLWan.clear_cache` sizes its own.
        self.feat_cache: list[Any] = [None] * sum(isinstance(m, WanCausalConv3d) for m in vae.encoder.modules())
        self.pending: torch.Tensor | None = None  # frames of the incomplete group, (B, 3, 0..3, H, W)
        self.frames_encoded = 0

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        from diffusers.utils.accelerate_utils import apply_forward_hook

        vae = self.vae
        self._check_piece(frames)
        self.frames_received += frames.shape[2]
        frames = frames.to(vae.device, vae.dtype)
        pending = frames if self.pending is None else torch.cat([self.pending, frames], dim=2)
        groups = []
        while pending.shape[2] >= (size := 1 if self.frames_encoded == 0 else self.group_frames):
            groups.append(pending[:, :, :size])
            pending = pending[:, :, size:]
            self.frames_encoded += size
        self.pending = pending
        if not groups:
            return self._empty
        # `apply_forward_hook`: with model CPU offload, moves the VAE to the device as `vae.encode` does.
        latents = apply_forward_hook(self._encode_groups)(vae, groups)
        self._empty = latents[:, :, :0]
        return latents

    def _check_vae(self, frames: torch.Tensor) -> None:
        vae = self.vae
        height, width = frames.shape[3:]
        if vae.use_tiling and (width > vae.tile_sample_min_width or height > vae.tile_sample_min_height):
            raise ValueError(  # `_encode`'s test for `tiled_encode`
                "a tiled Wan VAE encode (`enable_vae_tiling`) is not streamed: call `disable_vae_tiling()` or encode "
                "the whole clip"
            )

    def _encode_groups(self, vae: Any, groups: list[torch.Tensor]) -> torch.Tensor:
        from diffusers.models.autoencoders.autoencoder_kl_wan import patchify
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        out = []
        for group in groups:
            if vae.config.patch_size is not None:
                group = patchify(group, patch_size=vae.config.patch_size)
            out.append(vae.encoder(group, feat_cache=self.feat_cache, feat_idx=[0]))
        raw = DiagonalGaussianDistribution(vae.quant_conv(torch.cat(out, dim=2))).mode()
        return self.adapter.from_vae(raw, vae)

    def finish(self) -> torch.Tensor:
        left = 0 if self.pending is None else self.pending.shape[2]
        if left:
            tc = self.group_frames
            raise ValueError(
                f"the stream ended {left} frame(s) after its last complete group of {tc}: the {self.adapter.name} "
                f"VAE encodes {tc}k+1 frames (1, {tc + 1}, {2 * tc + 1}, ...), got {self.frames_received}"
            )
        return self._finish()


class LatentAdapter:
    """Base adapter: (B, C, T, h, w) layout, scaling by `scaling_factor` (HunyuanVideo's convention).

    Attributes:
        name: the latent-space name stored in `CascadeVSRTransformer3DModel.config.latent_space`.
        latent_channels, temporal_compression, spatial_compression: the VAE's geometry.
        latent_ndim: rank of the upstream's batched latent output (5; 3 for packed tokens).
    """

    name = "base"
    default_scaling_factor = 1.0
    latent_ndim = 5
    # Whether the VAE decodes every latent frame on its own (no temporal context), so chunks decode statelessly.
    per_frame_decode = False
    # Whether the VAE encodes every pixel frame on its own, so pieces of a frame stream encode statelessly.
    per_frame_encode = False

    def __init__(
        self,
        latent_channels: int = 16,
        temporal_compression: int = 4,
        spatial_compression: int = 8,
        name: str | None = None,
    ):
        self.latent_channels = int(latent_channels)
        self.temporal_compression = int(temporal_compression)
        self.spatial_compression = int(spatial_compression)
        if name is not None:
            self.name = name

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, latent_channels={self.latent_channels}, "
            f"temporal_compression={self.temporal_compression}, spatial_compression={self.spatial_compression})"
        )

    @classmethod
    def for_vae(cls, vae: Any) -> LatentAdapter:
        """An adapter whose geometry is read from a VAE instance of the family."""
        return cls(
            latent_channels=vae.config.latent_channels,
            temporal_compression=vae.temporal_compression_ratio,
            spatial_compression=vae.spatial_compression_ratio,
        )

    # -- geometry ------------------------------------------------------------------------------------------

    def check_num_frames(self, num_frames: int, name: str = "num_frames") -> int:
        """Pixel frame counts of causal video VAEs are `k * temporal_compression + 1`."""
        tc = self.temporal_compression
        if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % tc:
            raise ValueError(
                f"`{name}` must be {tc}k+1 frames for the {self.name} VAE (1, {tc + 1}, {2 * tc + 1}, ...), "
                f"got {num_frames}"
            )
        return num_frames

    def num_latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.temporal_compression + 1

    def num_pixel_frames(self, num_latent_frames: int) -> int:
        return (num_latent_frames - 1) * self.temporal_compression + 1

    # -- layout: upstream `output_type="latent"` <-> model space ---------------------------------------------

    def to_model(self, latents: torch.Tensor, vae: Any = None, **shape: Any) -> torch.Tensor:
        """What the upstream pipeline returns with `output_type="latent"` -> (B, C, T, h, w) model space."""
        check_latents(latents, "lr_latents", channels=self.latent_channels, layout="(B, C, T, h, w)")
        return latents

    def from_model(self, latents: torch.Tensor, vae: Any = None) -> torch.Tensor:
        """Inverse of `to_model`: model space -> the upstream pipeline's latent output format."""
        check_latents(latents, "latents", channels=self.latent_channels)
        return latents

    # -- normalization: model space <-> raw VAE latents -------------------------------------------------------

    def _scaling_factor(self, vae: Any) -> float:
        return vae.config.scaling_factor if vae is not None else self.default_scaling_factor

    def to_vae(self, latents: torch.Tensor, vae: Any) -> torch.Tensor:
        """Model-space latents -> raw latents that `vae.decode` expects (the upstream's decode lines)."""
        return latents / self._scaling_factor(vae)

    def from_vae(self, latents: torch.Tensor, vae: Any) -> torch.Tensor:
        """Raw `vae.encode` latents -> model space (the family's image/video-to-video encode lines)."""
        return latents * self._scaling_factor(vae)

    # -- pixels ----------------------------------------------------------------------------------------------

    def encode(
        self, vae: Any, video: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False
    ) -> torch.Tensor:
        """Video (B, 3, T, H, W) in [-1, 1] -> model-space latents (B, C, T', h, w). Uses the posterior mode
        unless `sample` (then `generator` makes it reproducible)."""
        check_latents(video, "video", channels=3, layout="(B, 3, T, H, W)")
        self.check_num_frames(video.shape[2], "video frames")
        raw = _retrieve_latents(vae.encode(video.to(vae.device, vae.dtype)), generator, sample)
        return self.from_vae(raw, vae)

    def _vae_decode(self, vae: Any, raw: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return vae.decode(raw, return_dict=False)[0]

    def decode(self, vae: Any, latents: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Model-space latents (B, C, T, h, w) -> video (B, 3, T', H, W) in about [-1, 1]."""
        check_latents(latents, "latents", channels=self.latent_channels)
        raw = self.to_vae(latents.to(vae.device, vae.dtype), vae)
        return self._vae_decode(vae, raw, **kwargs)

    def stream_decoder(self, vae: Any) -> StreamDecoder:
        """A fresh decoder of one latent stream (`StreamDecoder`), giving the frames of one whole-clip `decode`.

        Stateless per chunk only where decoding is per frame: no temporal compression and no temporal context (a
        causal VAE's decoder reads earlier latent frames, so decoding chunks apart would differ at every seam)."""
        if self.per_frame_decode and self.temporal_compression == 1:
            return ChunkDecoder(self, vae)
        raise ValueError(
            f"the {self.name} VAE decodes with temporal context across latent frames, so a stream of its latents "
            "cannot be decoded chunk by chunk exactly: use output_type='latent' and decode the whole clip"
        )

    def stream_encoder(self, vae: Any) -> StreamEncoder:
        """A fresh encoder of one pixel-frame stream (`StreamEncoder`), giving the latents of one whole-clip
        `encode` (posterior mode). Stateless per piece only where encoding is per frame (no temporal compression,
        no temporal context)."""
        if self.per_frame_encode and self.temporal_compression == 1:
            return ChunkEncoder(self, vae)
        raise ValueError(
            f"the {self.name} VAE encodes with temporal context across frames, so a stream of frames cannot be "
            "encoded piece by piece exactly: encode the whole clip (`adapter.encode`)"
        )


class WanAdapter(LatentAdapter):
    """Wan 2.1 / 2.2: WanPipeline returns latents normalized with the VAE's latents_mean / latents_std."""

    name = "wan"

    @classmethod
    def for_vae(cls, vae: Any) -> WanAdapter:
        z_dim = vae.config.z_dim
        # Wan 2.2 TI2V's 48-channel VAE is another latent space than Wan 2.1's 16-channel one.
        return cls(
            latent_channels=z_dim,
            temporal_compression=vae.config.scale_factor_temporal,
            spatial_compression=vae.config.scale_factor_spatial,
            name="wan" if z_dim == 16 else f"wan_z{z_dim}",
        )

    def to_vae(self, latents: torch.Tensor, vae: Any) -> torch.Tensor:
        # pipeline_wan.py: latents_std = 1.0 / std; latents = latents / latents_std + latents_mean
        latents_mean = _channel_vector(vae.config.latents_mean, latents)
        latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(
            latents.device, latents.dtype
        )
        return latents / latents_std + latents_mean

    def from_vae(self, latents: torch.Tensor, vae: Any) -> torch.Tensor:
        # pipeline_wan_video2video.py: (latents - latents_mean) * latents_std, with latents_std = 1.0 / std
        latents_mean = _channel_vector(vae.config.latents_mean, latents)
        latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(
            latents.device, latents.dtype
        )
        return (latents - latents_mean) * latents_std

    def stream_decoder(self, vae: Any) -> WanStreamDecoder:
        """Wan's decoder carries its causal-conv cache from chunk to chunk: exactly the whole-clip decode."""
        return WanStreamDecoder(self, vae)

    def stream_encoder(self, vae: Any) -> WanStreamEncoder:
        """Wan's encoder carries its causal-conv cache from group to group: exactly the whole-clip encode."""
        return WanStreamEncoder(self, vae)


class CogVideoXAdapter(LatentAdapter):
    """CogVideoX: (B, T, C, h, w) latents times scaling_factor (1.15258426 for 2b, 0.7 for 5b).

    Its decoder maps an odd latent count T to 4(T - 1) + 1 frames (49 frames <-> 13 latents) and an even one
    to 4T frames.
    """

    name = "cogvideox"
    default_scaling_factor = 1.15258426

    @classmethod
    def for_vae(cls, vae: Any) -> CogVideoXAdapter:
        return cls(
            latent_channels=vae.config.latent_channels,
            temporal_compression=vae.config.temporal_compression_ratio,
            spatial_compression=2 ** (len(vae.config.block_out_channels) - 1),
        )

    def to_model(self, latents: torch.Tensor, vae: Any = None, **shape: Any) -> torch.Tensor:
        check_latents(latents, "lr_latents", layout="(B, T, C, h, w) (CogVideoX's latent output)")
        if latents.shape[2] != self.latent_channels:
            raise ValueError(
                f"`lr_latents` of CogVideoX must have shape (B, T, C, h, w) with C={self.latent_channels}, "
                f"got {tuple(latents.shape)}"
            )
        return rearrange(latents, "b t c h w -> b c t h w")

    def from_model(self, latents: torch.Tensor, vae: Any = None) -> torch.Tensor:
        check_latents(latents, "latents", channels=self.latent_channels)
        return rearrange(latents, "b c t h w -> b t c h w")

    def to_vae(self, latents: torch.Tensor, vae: Any) -> torch.Tensor:
        # pipeline_cogvideox.py decode_latents: latents = 1 / self.vae_scaling_factor_image * latents
        return 1 / self._scaling_factor(vae) * latents

    def _vae_decode(self, vae: Any, raw: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return vae.decode(raw).sample


class HunyuanVideoAdapter(LatentAdapter):
    """HunyuanVideo: (B, C, T, h, w) latents times scaling_factor 0.476986."""

    name = "hunyuan_video"
    default_scaling_factor = 0.476986

    def to_vae(self, latents: torch.Tensor, vae: Any) -> torch.Tensor:
        # pipeline_hunyuan_video.py: latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        return latents.to(vae.dtype) / vae.config.scaling_factor


class MochiAdapter(LatentAdapter):
    """Mochi: (B, C, T, h, w) latents normalized with latents_mean / latents_std and scaling_factor."""

    name = "mochi"

    def __init__(
        self,
        latent_channels: int = 12,
        temporal_compression: int = 6,
        spatial_compression: int = 8,
        name: str | None = None,
    ):
        super().__init__(latent_channels, temporal_compression, spatial_compression, name)

    @staticmethod
    def _has_stats(vae: Any) -> bool:
        return (
            getattr(vae.config, "latents_mean", None) is not None
            and getattr(vae.config, "latents_std", None) is not None
        )

    def to_vae(self, latents: torch.Tensor, vae: Any) -> torch.Tensor:
        # pipeline_mochi.py: latents * latents_std / scaling_factor + latents_mean (or / scaling_factor only)
        if self._has_stats(vae):
            latents_mean = _channel_vector(vae.config.latents_mean, latents)
            latents_std = _channel_vector(vae.config.latents_std, latents)
            return latents * latents_std / vae.config.scaling_factor + latents_mean
        return latents / vae.config.scaling_factor

    def from_vae(self, latents: torch.Tensor, vae: Any) -> torch.Tensor:
        if self._has_stats(vae):
            latents_mean = _channel_vector(vae.config.latents_mean, latents)
            latents_std = _channel_vector(vae.config.latents_std, latents)
            return (latents - latents_mean) * vae.config.scaling_factor / latents_std
        return latents * vae.config.scaling_factor


class LTXVideoAdapter(LatentAdapter):
    """LTX-Video: packed tokens (B, S, D) of latents normalized with the VAE's latents_mean / latents_std
    buffers and scaling_factor; 128 channels, compression (8, 32, 32), frames 8k+1.

    Packed latents do not carry their grid: `to_model` needs it, as latent sizes (`latent_num_frames`,
    `latent_height`, `latent_width`) or as the pixel sizes given to the upstream (`num_frames`, `height`,
    `width`). The transformer patch is (1, 1, 1) in every released LTX-Video model.
    """

    name = "ltx_video"
    latent_ndim = 3

    def __init__(
        self,
        latent_channels: int = 128,
        temporal_compression: int = 8,
        spatial_compression: int = 32,
        name: str | None = None,
        patch_size: int = 1,
        patch_size_t: int = 1,
    ):
        super().__init__(latent_channels, temporal_compression, spatial_compression, name)
        self.patch_size, self.patch_size_t = patch_size, patch_size_t

    def latent_grid(self, **shape: Any) -> tuple[int, int, int]:
        """(T, h, w) of the latent grid from latent or pixel sizes."""
        if all(shape.get(k) is not None for k in ("latent_num_frames", "latent_height", "latent_width")):
            return int(shape["latent_num_frames"]), int(shape["latent_height"]), int(shape["latent_width"])
        if all(shape.get(k) is not None for k in ("num_frames", "height", "width")):
            return (
                self.num_latent_frames(int(shape["num_frames"])),
                int(shape["height"]) // self.spatial_compression,
                int(shape["width"]) // self.spatial_compression,
            )
        raise ValueError(
            "packed LTX-Video `lr_latents` (B, S, D) need their grid: pass `num_frames`, `height` and `width` "
            "(pixel sizes of the upstream call) or `latent_num_frames`, `latent_height` and `latent_width`, "
            f"got {sorted(shape)}"
        )

    def to_model(self, latents: torch.Tensor, vae: Any = None, **shape: Any) -> torch.Tensor:
        check_latents(latents, "lr_latents", ndim=3, layout="(B, S, D) (LTX-Video's packed latent output)")
        num_frames, height, width = self.latent_grid(**shape)
        p, pt = self.patch_size, self.patch_size_t
        expected = (num_frames // pt * (height // p) * (width // p), self.latent_channels * pt * p * p)
        if tuple(latents.shape[1:]) != expected:
            raise ValueError(
                f"`lr_latents` must have shape (B, {expected[0]}, {expected[1]}) for a latent grid "
                f"{(num_frames, height, width)}, got {tuple(latents.shape)}"
            )
        # pipeline_ltx.py _unpack_latents: (B, S, D) -> (B, C, F, H, W), D = (C, p_t, p, p)
        return rearrange(
            latents,
            "b (t h w) (c pt ph pw) -> b c (t pt) (h ph) (w pw)",
            t=num_frames // pt,
            h=height // p,
            w=width // p,
            pt=pt,
            ph=p,
            pw=p,
        )

    def from_model(self, latents: torch.Tensor, vae: Any = None) -> torch.Tensor:
        check_latents(latents, "latents", channels=self.latent_channels)
        p, pt = self.patch_size, self.patch_size_t
        # pipeline_ltx.py _pack_latents
        return rearrange(latents, "b c (t pt) (h ph) (w pw) -> b (t h w) (c pt ph pw)", pt=pt, ph=p, pw=p)

    def to_vae(self, latents: torch.Tensor, vae: Any) -> torch.Tensor:
        # pipeline_ltx.py _denormalize_latents: latents * latents_std / scaling_factor + latents_mean
        latents_mean = vae.latents_mean.view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
        latents_std = vae.latents_std.view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
        return latents * latents_std / vae.config.scaling_factor + latents_mean

    def from_vae(self, latents: torch.Tensor, vae: Any) -> torch.Tensor:
        # pipeline_ltx.py _normalize_latents: (latents - latents_mean) * scaling_factor / latents_std
        latents_mean = vae.latents_mean.view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
        latents_std = vae.latents_std.view(1, -1, 1, 1, 1).to(latents.device, latents.dtype)
        return (latents - latents_mean) * vae.config.scaling_factor / latents_std

    def _vae_decode(self, vae: Any, raw: torch.Tensor, decode_timestep: float = 0.0, **kwargs: Any) -> torch.Tensor:
        # LTXPipeline with its defaults (decode_timestep=0, decode_noise_scale=decode_timestep): the noise mix
        # (1 - 0) * latents + 0 * noise is the identity, and timestep-conditioned VAEs get timestep 0.
        temb = None
        if vae.config.timestep_conditioning:
            temb = torch.full((raw.shape[0],), float(decode_timestep), device=raw.device, dtype=raw.dtype)
        return vae.decode(raw, temb, return_dict=False)[0]


class SpaceToDepthAdapter(LatentAdapter):
    """Pixel space through `cascade_vsr.space_to_depth.SpaceToDepthAutoencoder`: 48 channels (factor 4), no
    temporal compression (any frame count), no normalization. Demos and users without a learned VAE run the
    same pipeline code on it."""

    name = "space_to_depth"
    per_frame_decode = True
    per_frame_encode = True

    def __init__(
        self,
        latent_channels: int = 48,
        temporal_compression: int = 1,
        spatial_compression: int = 4,
        name: str | None = None,
    ):
        super().__init__(latent_channels, temporal_compression, spatial_compression, name)

    @classmethod
    def for_vae(cls, vae: Any) -> SpaceToDepthAdapter:
        return cls(latent_channels=vae.latent_channels, spatial_compression=vae.config.factor)

    def to_vae(self, latents: torch.Tensor, vae: Any) -> torch.Tensor:
        return latents

    def from_vae(self, latents: torch.Tensor, vae: Any) -> torch.Tensor:
        return latents


_ADAPTERS: dict[str, type[LatentAdapter]] = {
    "wan": WanAdapter,
    "cogvideox": CogVideoXAdapter,
    "hunyuan_video": HunyuanVideoAdapter,
    "ltx_video": LTXVideoAdapter,
    "mochi": MochiAdapter,
    "space_to_depth": SpaceToDepthAdapter,
}


def _family_of(obj: Any) -> tuple[str, Any]:
    """(family, vae or None) of a family name, a VAE instance or a pipeline instance."""
    if isinstance(obj, str):
        return obj, None
    for cls in type(obj).__mro__:
        if cls.__name__ in _VAE_FAMILIES:
            return _VAE_FAMILIES[cls.__name__], obj
    vae = getattr(obj, "vae", None)
    if vae is not None:
        family, _ = _family_of(vae)
        return family, vae
    for cls in type(obj).__mro__:
        for prefix, family in _PIPELINE_PREFIXES.items():
            if cls.__name__.startswith(prefix) and cls.__name__.endswith("Pipeline"):
                return family, None
    raise ValueError(
        f"`upstream` must be one of {(*FAMILIES, 'space_to_depth')}, a diffusers pipeline of those families or "
        "its VAE, "
        f"got {type(obj).__name__}"
    )


def get_adapter(upstream: Any) -> LatentAdapter:
    """The adapter of an upstream latent format: a family name (also "wan_z48" for Wan 2.2 TI2V's 48-channel
    space), a diffusers pipeline instance, or a VAE instance (whose config then sets the geometry)."""
    if isinstance(upstream, str) and upstream.startswith("wan_z") and upstream[5:].isdigit():
        return WanAdapter(
            latent_channels=int(upstream[5:]), spatial_compression=16 if upstream == "wan_z48" else 8, name=upstream
        )
    family, vae = _family_of(upstream)
    if family not in _ADAPTERS:
        raise ValueError(f"`upstream` must be one of {tuple(_ADAPTERS)}, got {family!r}")
    if vae is None:
        return _ADAPTERS[family]()
    adapter = _ADAPTERS[family].for_vae(vae)
    transformer = getattr(upstream, "transformer", None)
    if isinstance(adapter, LTXVideoAdapter) and transformer is not None:
        adapter.patch_size = transformer.config.patch_size
        adapter.patch_size_t = transformer.config.patch_size_t
    return adapter
