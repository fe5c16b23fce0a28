"""The latent upsampler: LR latents of the base model -> HR-sized latents (SimpleGVR section 4.1)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin, get_parameter_dtype
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

    def base_resize(self, lr_latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The plain resize that the residual branch corrects, in float32 whatever the upsampler's dtype: it is the
        clip itself, which bfloat16 would move by up to a quarter of a grey level, differently in every frame (the
        convolutions compute only the small residual, in the upsampler's dtype)."""
        config = self.config
        return resize_frames(
            lr_latents.to(torch.promote_types(lr_latents.dtype, torch.float32)),
            size,
            config.resize_mode,
            space_to_depth_factor=config.space_to_depth_factor,
        )

    def reset_residual(self) -> None:
        """Zero the residual branch's last convolution: the upsampler becomes exactly its base resize again."""
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(
        self, lr_latents: torch.Tensor, size: tuple[int, int], return_dict: bool = True
    ) -> LatentUpsampler3DOutput | tuple[torch.Tensor]:
        """Upsample (B, C, T, h, w) latents of any float dtype to (B, C, T, *size), at least float32 (the base
        resize; the residual branch computes in the upsampler's dtype): a `LatentUpsampler3DOutput`, or with
        `return_dict=False` the tuple `(sample,)` (diffusers' model convention)."""
        check_latents(lr_latents, "lr_latents", channels=self.config.latent_channels)
        size = check_spatial_size(size, "size")

        base = self.base_resize(lr_latents, size)
        hidden_states = self.conv_in(lr_latents.to(get_parameter_dtype(self.conv_in)))
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

    def stream(self, size: tuple[int, int]) -> UpsamplerStream:
        """An `UpsamplerStream` of this upsampler to `size`: LR frames in pieces, each frame computed once."""
        return UpsamplerStream(self, check_spatial_size(size, "size"))


# -- streaming ------------------------------------------------------------------------------------------------------
# Each stage takes frames in pieces (`push`) and returns the output frames it can compute exactly so far, or None;
# `flush` returns the rest once the input has ended. Per-frame stages return what they get; a 3x3x3 convolution
# holds back one frame (it needs the next input frame); a residual block delays its skip path to match.


class _PerFrame:
    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor]):
        self.function = function

    def push(self, frames: torch.Tensor | None) -> torch.Tensor | None:
        return None if frames is None else self.function(frames)

    def flush(self) -> None:
        return None


class _TemporalConv:
    """A `Conv3d` with temporal zero padding 1 over frames that arrive in pieces: output frame t once input frame
    t + 1 is there, from the same numbers as the whole-clip convolution."""

    def __init__(self, conv: nn.Conv3d):
        if conv.kernel_size[0] != 3 or conv.padding[0] != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"streaming needs 3-frame kernels with temporal zero padding 1, got {conv}")
        self.conv = conv
        self.pending: torch.Tensor | None = None  # inputs from (next output - 1) on; first the zero padding frame

    def _apply(self, window: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        padding = (0, *conv.padding[1:])
        if window.device.type == "cpu" and window.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            # PyTorch's size heuristic sends the small float32 inputs of one chunk (batch 1, a few frames) to its
            # native conv3d, several times slower than oneDNN's on them
            return torch.ops.aten.mkldnn_convolution(
                window.contiguous(), conv.weight, conv.bias, padding, conv.stride, conv.dilation, conv.groups
            )
        return F.conv3d(window, conv.weight, conv.bias, conv.stride, padding, conv.dilation)

    def push(self, frames: torch.Tensor | None) -> torch.Tensor | None:
        if frames is None:
            return None
        if self.pending is None:
            self.pending = torch.zeros_like(frames[:, :, :1])
        window = torch.cat([self.pending, frames], dim=2)
        self.pending = window[:, :, -2:]
        return self._apply(window) if window.shape[2] >= 3 else None

    def flush(self) -> torch.Tensor | None:
        if self.pending is None:
            return None
        window = torch.cat([self.pending, torch.zeros_like(self.pending[:, :, :1])], dim=2)
        self.pending = None
        return self._apply(window)


def _cat(first: torch.Tensor | None, second: torch.Tensor | None) -> torch.Tensor | None:
    if first is None or second is None:
        return second if first is None else first
    return torch.cat([first, second], dim=2)


class _Chain:
    def __init__(self, stages: list):
        self.stages = stages

    def push(self, frames: torch.Tensor | None) -> torch.Tensor | None:
        for stage in self.stages:
            frames = stage.push(frames)
        return frames

    def flush(self) -> torch.Tensor | None:
        frames = None
        for stage in self.stages:
            frames = _cat(stage.push(frames), stage.flush())
        return frames


class _DelayedSum:
    """`branch(x) + x` for a branch that hands frames out later than it receives them: x waits in a queue."""

    def __init__(self, branch: _Chain):
        self.branch, self.queue = branch, None

    def _add(self, frames: torch.Tensor | None) -> torch.Tensor | None:
        if frames is None:
            return None
        count = frames.shape[2]
        skip, self.queue = self.queue[:, :, :count], self.queue[:, :, count:]
        return frames + skip

    def push(self, frames: torch.Tensor | None) -> torch.Tensor | None:
        self.queue = _cat(self.queue, frames)
        return self._add(self.branch.push(frames))

    def flush(self) -> torch.Tensor | None:
        return self._add(self.branch.flush())


def _silu_norm(norm: nn.Module) -> _PerFrame:
    return _PerFrame(lambda frames: F.silu(norm(frames)))


class UpsamplerStream:
    """`LatentUpsampler3D` on LR frames that arrive in pieces, equal frame for frame to one call on the whole clip.

    Every convolution keeps the last two input frames it has seen and computes each output frame once, as soon as
    the next input frame is there, so an upsampled frame leaves `temporal_radius` LR frames after it arrives (at
    the end of the input, at once). Memory is a few frames per layer, whatever the length."""

    def __init__(self, upsampler: LatentUpsampler3D, size: tuple[int, int]):
        self.upsampler, self.size = upsampler, size
        blocks = [
            _DelayedSum(
                _Chain(
                    [
                        _silu_norm(block.norm1),
                        _TemporalConv(block.conv1),
                        _silu_norm(block.norm2),
                        _TemporalConv(block.conv2),
                    ]
                )
            )
            for block in upsampler.lr_blocks
        ]
        self.residual = _Chain(
            [
                _TemporalConv(upsampler.conv_in),
                *blocks,
                _PerFrame(lambda frames: resize_frames(frames, size)),
                _silu_norm(upsampler.hr_norm),
                _TemporalConv(upsampler.hr_conv),
                _PerFrame(F.silu),
                _TemporalConv(upsampler.conv_out),
            ]
        )
        self.base = lambda frames: upsampler.base_resize(frames, size)
        self.residual_dtype = get_parameter_dtype(upsampler.conv_in)
        self.waiting: torch.Tensor | None = None  # LR frames whose residual is not out yet (their base resize)
        self.ready: torch.Tensor | None = None  # upsampled frames not yet popped
        self.ended = False

    @property
    def available(self) -> int:
        """Upsampled frames that `pop` can hand out now."""
        return 0 if self.ready is None else self.ready.shape[2]

    def _collect(self, residual: torch.Tensor | None) -> None:
        if residual is None:
            return
        count = residual.shape[2]
        lr, self.waiting = self.waiting[:, :, :count], self.waiting[:, :, count:]
        self.ready = _cat(self.ready, self.base(lr) + residual)

    @torch.no_grad()
    def push(self, lr_latents: torch.Tensor) -> None:
        """Take the next (B, C, T, h, w) LR frames and compute what they complete: the base resize in float32, the
        residual branch in the upsampler's dtype, as `LatentUpsampler3D.forward`."""
        if self.ended:
            raise ValueError("`push` after `end`: the stream has ended")
        check_latents(lr_latents, "lr_latents", channels=self.upsampler.config.latent_channels)
        self.waiting = _cat(self.waiting, lr_latents)
        self._collect(self.residual.push(lr_latents.to(self.residual_dtype)))

    @torch.no_grad()
    def end(self) -> None:
        """The input has ended: compute the last frames (the whole-clip call's zero padding at the end)."""
        if not self.ended:
            self.ended = True
            self._collect(self.residual.flush())

    def pop(self, num_frames: int) -> torch.Tensor:
        """The next `num_frames` upsampled frames (fewer if fewer are available)."""
        if not self.available:
            raise ValueError("`pop` with no upsampled frame available (check `available` first)")
        frames, self.ready = self.ready[:, :, :num_frames], self.ready[:, :, num_frames:]
        return frames
