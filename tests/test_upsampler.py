import copy

import pytest
import torch
import torch.nn.functional as F

from cascade_vsr import LatentUpsampler3D, SpaceToDepthAutoencoder


@pytest.mark.parametrize(
    "lr_size, hr_size",
    [((8, 14), (17, 30)), ((64, 112), (135, 240)), ((5, 7), (10, 14)), ((17, 31), (23, 41))],
)
@pytest.mark.parametrize("num_frames", [1, 5])
def test_fresh_upsampler_is_exactly_bilinear(lr_size, hr_size, num_frames):
    upsampler = LatentUpsampler3D(latent_channels=4, hidden_channels=8, num_blocks=1)
    lr = torch.randn(2, 4, num_frames, *lr_size)
    out = upsampler(lr, size=hr_size).sample
    assert out.shape == (2, 4, num_frames, *hr_size)
    # Independent reference: F.interpolate on each frame separately.
    for t in range(num_frames):
        expected = F.interpolate(lr[:, :, t], size=hr_size, mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[:, :, t], expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_fresh_pixel_space_upsampler_is_exactly_a_pixel_resize(mode):
    # Space-to-depth latents resize on the pixel grid. Independent reference: decode to pixels with the
    # autoencoder, resize every frame with F.interpolate, encode again.
    autoencoder = SpaceToDepthAutoencoder(factor=4)
    upsampler = LatentUpsampler3D(
        latent_channels=48, hidden_channels=8, num_blocks=1, resize_mode=mode, space_to_depth_factor=4
    )
    lr = torch.randn(2, 48, 3, 6, 10)
    out = upsampler(lr, size=(12, 20)).sample
    pixels = autoencoder.decode(lr).sample
    for t in range(3):
        expected_pixels = F.interpolate(pixels[:, :, t], size=(48, 80), mode=mode, align_corners=False)
        expected = autoencoder.encode(expected_pixels[:, :, None]).latent_dist.mode()[:, :, 0]
        torch.testing.assert_close(out[:, :, t], expected, rtol=0, atol=1e-6)


def test_a_bfloat16_upsampler_resizes_the_clip_in_float32_and_only_its_residual_in_bfloat16():
    """The base resize is the clip itself: a bfloat16 upsampler computes it from the float32 input in float32 (a
    fresh one returns exactly the float32 resize, whole-clip and streamed), and its convolutions add a residual
    computed in bfloat16."""
    torch.manual_seed(0)
    upsampler = LatentUpsampler3D(
        latent_channels=48, hidden_channels=8, num_blocks=1, resize_mode="bicubic", space_to_depth_factor=4
    )
    lr = torch.rand(1, 48, 4, 6, 10)
    expected = upsampler(lr, size=(12, 20)).sample
    upsampler.bfloat16()
    out = upsampler(lr, size=(12, 20)).sample
    stream = upsampler.stream((12, 20))
    for t in range(4):
        stream.push(lr[:, :, t : t + 1])
    stream.end()
    streamed = stream.pop(4)
    assert out.dtype == streamed.dtype == torch.float32
    assert torch.equal(out, expected) and torch.equal(streamed, expected)

    with torch.no_grad():
        upsampler.conv_out.weight.normal_(std=0.01)
    reference = copy.deepcopy(upsampler).float()(lr, size=(12, 20)).sample
    residual = (reference - expected).abs().max()
    # bfloat16 rounding of the residual only: rounding the clip (values up to 1) would move it by up to 2^-9
    assert 0 < (upsampler(lr, size=(12, 20)).sample - reference).abs().max() <= 2**-6 * residual < 2**-9


def test_pixel_grid_resize_reconstructs_a_smooth_picture_that_latent_bilinear_scrambles():
    # A smooth ramp survives a 2x pixel-grid resize almost exactly; interpolating the pixel phases channel by
    # channel (bilinear in latent space) mixes phases of neighbouring 4x4 blocks and breaks it.
    autoencoder = SpaceToDepthAutoencoder(factor=4)
    ramp = torch.linspace(-1, 1, 160).expand(1, 3, 1, 96, 160)
    small = F.interpolate(ramp[:, :, 0], size=(48, 80), mode="area")[:, :, None]
    lr = autoencoder.encode(small).latent_dist.mode()
    pixel_grid = LatentUpsampler3D(48, 8, 1, space_to_depth_factor=4)(lr, size=(24, 40)).sample
    latent_grid = LatentUpsampler3D(48, 8, 1)(lr, size=(24, 40)).sample
    interior = (slice(None), slice(None), slice(None), slice(8, -8), slice(8, -8))
    pixel_error = (autoencoder.decode(pixel_grid).sample - ramp)[interior].abs().max()
    latent_error = (autoencoder.decode(latent_grid).sample - ramp)[interior].abs().max()
    assert pixel_error < 1e-5 and latent_error > 20 * pixel_error + 1e-3


def test_trained_upsampler_keeps_frames_and_depends_on_neighbours(tiny_upsampler):
    lr = torch.randn(1, 4, 20, 6, 10)
    out = tiny_upsampler(lr, size=(13, 21)).sample
    assert out.shape == (1, 4, 20, 13, 21)
    # Five 3x3x3 convs in a row (conv_in, 2 in the block, hr_conv, conv_out) and per-frame norms:
    # changing frame 10 changes frames 5..15 and nothing else (chunked inference stays exact).
    lr2 = lr.clone()
    lr2[:, :, 10] += 1
    diff = (tiny_upsampler(lr2, size=(13, 21)).sample - out).abs().amax(dim=(0, 1, 3, 4))
    assert (diff[5:16] > 0).all()
    assert (diff[:5] == 0).all() and (diff[16:] == 0).all()


def test_upsampler_bad_inputs():
    upsampler = LatentUpsampler3D(latent_channels=4, hidden_channels=8, num_blocks=1)
    with pytest.raises(ValueError, match="lr_latents.*4 channels"):
        upsampler(torch.randn(1, 3, 2, 4, 4), size=(8, 8))
    with pytest.raises(ValueError, match="lr_latents.*5 dims"):
        upsampler(torch.randn(4, 2, 4, 4), size=(8, 8))
    with pytest.raises(ValueError, match="size"):
        upsampler(torch.randn(1, 4, 2, 4, 4), size=(8, 0))
    with pytest.raises(ValueError, match="size"):
        upsampler(torch.randn(1, 4, 2, 4, 4), size=(8.5, 8))
    with pytest.raises(ValueError, match="resize_mode"):
        LatentUpsampler3D(latent_channels=4, hidden_channels=8, resize_mode="nearest")
    with pytest.raises(ValueError, match="space_to_depth_factor"):
        LatentUpsampler3D(latent_channels=4, hidden_channels=8, space_to_depth_factor=4)
    with pytest.raises(ValueError, match="num_groups"):
        LatentUpsampler3D(hidden_channels=12, num_groups=8)


def test_return_dict_gives_the_output_dataclass_or_a_tuple_of_the_same_sample(tiny_upsampler):
    from cascade_vsr.models.upsampler import LatentUpsampler3DOutput

    lr = torch.randn(1, 4, 2, 5, 7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        output = tiny_upsampler(lr, size=(9, 13))
        as_tuple = tiny_upsampler(lr, size=(9, 13), return_dict=False)
    assert isinstance(output, LatentUpsampler3DOutput) and output.sample.shape == (1, 4, 2, 9, 13)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert torch.equal(as_tuple[0], output.sample) and torch.equal(output[0], output.sample)
