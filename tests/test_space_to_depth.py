import pytest
import torch

from cascade_vsr.models.space_to_depth import SpaceToDepthAutoencoder


def test_round_trip_is_exact_and_layout_matches_a_naive_reference(tmp_path):
    vae = SpaceToDepthAutoencoder()
    video = torch.rand(2, 3, 3, 8, 12) * 2 - 1
    posterior = vae.encode(video).latent_dist
    latents = posterior.sample()
    assert latents.shape == (2, 48, 3, 2, 3)
    torch.testing.assert_close(latents, posterior.mode(), rtol=0, atol=0)  # deterministic
    torch.testing.assert_close(vae.decode(latents).sample, video, rtol=0, atol=0)
    # Naive reference of the channel layout: channel c*16 + i*4 + j holds pixel (4y+i, 4x+j) of colour c.
    c, i, j, y, x = 2, 1, 3, 1, 2
    assert latents[0, c * 16 + i * 4 + j, 1, y, x] == video[0, c, 1, 4 * y + i, 4 * x + j]
    vae.save_pretrained(tmp_path)
    assert SpaceToDepthAutoencoder.from_pretrained(tmp_path).config.factor == 4


def test_bad_inputs():
    vae = SpaceToDepthAutoencoder()
    with pytest.raises(ValueError, match="x.*multiples of factor=4"):
        vae.encode(torch.zeros(1, 3, 1, 6, 8))
    with pytest.raises(ValueError, match="x.*3 channels"):
        vae.encode(torch.zeros(1, 4, 1, 8, 8))
    with pytest.raises(ValueError, match="z.*48 channels"):
        vae.decode(torch.zeros(1, 16, 1, 2, 2))


def test_reports_float32_whatever_it_is_cast_to_so_callers_keep_the_clip_unrounded():
    """It has no weights: a bfloat16 stage's callers cast the video and the latents to `vae.dtype`, which stays
    float32, and the round trip stays exact."""
    autoencoder = SpaceToDepthAutoencoder(factor=2).to(torch.bfloat16)
    assert autoencoder.dtype == torch.float32
    video = torch.rand(1, 3, 2, 4, 6) * 2 - 1
    latents = autoencoder.encode(video.to(autoencoder.dtype)).latent_dist.mode()
    assert latents.dtype == torch.float32
    assert torch.equal(autoencoder.decode(latents.to(autoencoder.dtype)).sample, video)
