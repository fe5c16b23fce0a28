import pytest
import torch
import torch.nn.functional as F

from cascade_vsr import LatentUpsampler3D


@pytest.mark.parametrize(
    "lr_size, hr_size",
    [((8, 14), (17, 30)), ((64, 112), (135, 240)), ((5, 7), (10, 14)), ((17, 31), (23, 41))],
)
@pytest.mark.parametrize("num_frames", [1, 5])
def test_fresh_upsampler_is_exactly_bilinear(lr_size, hr_size, num_frames):
    upsampler = LatentUpsampler3D(latent_channels=4, hidden_channels=8, num_blocks=1)
    lr = torch.randn(2, 4, num_frames, *lr_size)
    out = upsampler(lr, size=hr_size)
    assert out.shape == (2, 4, num_frames, *hr_size)
    # Independent reference: F.interpolate on each frame separately.
    for t in range(num_frames):
        expected = F.interpolate(lr[:, :, t], size=hr_size, mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[:, :, t], expected, rtol=0, atol=0)


def test_trained_upsampler_keeps_frames_and_depends_on_neighbours(tiny_upsampler):
    lr = torch.randn(1, 4, 20, 6, 10)
    out = tiny_upsampler(lr, size=(13, 21))
    assert out.shape == (1, 4, 20, 13, 21)
    # Five 3x3x3 convs in a row (conv_in, 2 in the block, hr_conv, conv_out) and per-frame norms:
    # changing frame 10 changes frames 5..15 and nothing else (chunked inference stays exact).
    lr2 = lr.clone()
    lr2[:, :, 10] += 1
    diff = (tiny_upsampler(lr2, size=(13, 21)) - out).abs().amax(dim=(0, 1, 3, 4))
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
    with pytest.raises(ValueError, match="num_groups"):
        LatentUpsampler3D(hidden_channels=12, num_groups=8)
