"""Stream decoding (`adapter.stream_decoder`): a latent stream decoded chunk by chunk gives the pixels of one
whole-clip decode, for Wan's causal VAE (its causal-conv cache carried across chunks) and the per-frame
space-to-depth VAE; the VAEs that cannot stream refuse, and `CascadeVSRPipeline.stream` decodes with it."""

from __future__ import annotations

import pytest
import torch

from cascade_vsr import testing as tu
from cascade_vsr.pipelines.adapters import LatentAdapter, get_adapter

from .conftest import tiny_causal_stage


def _latents(adapter: LatentAdapter, frames: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, adapter.latent_channels, frames, 3, 5, generator=generator)


def _stream_decode(adapter: LatentAdapter, vae, latents: torch.Tensor, pieces: list[int]) -> list[torch.Tensor]:
    decoder = adapter.stream_decoder(vae)
    return [decoder.decode(chunk) for chunk in latents.split(pieces, dim=2)]


@pytest.mark.parametrize("pieces", [[1, 2, 3, 1], [4], [4, 3], [1, 6]])
@torch.no_grad()
def test_wan_stream_decode_equals_the_whole_clip_decode(wan_vae, pieces):
    """Chunks of mixed lengths (one of a single latent frame first, or four) decode to the whole clip's frames:
    4 Tc - 3 for the first chunk, 4 Tc after; decoded apart, the chunks give other frames at every seam."""
    adapter = get_adapter(wan_vae)
    latents = _latents(adapter, sum(pieces))
    whole = adapter.decode(wan_vae, latents)
    streamed = _stream_decode(adapter, wan_vae, latents, pieces)
    assert [c.shape[2] for c in streamed] == [4 * pieces[0] - 3] + [4 * p for p in pieces[1:]]
    torch.testing.assert_close(torch.cat(streamed, dim=2), whole, rtol=0, atol=1e-5)
    assert whole.abs().amax() > 0.1  # not a constant image
    # Independently, each chunk restarts the causal cache (and its first frame is a lone one): other numbers.
    for chunk, decoded in zip(latents.split(pieces, dim=2)[1:], streamed[1:]):
        alone = adapter.decode(wan_vae, chunk)
        assert (alone - decoded[:, :, -alone.shape[2] :]).abs().amax() > 1e-2


@torch.no_grad()
def test_every_stream_starts_fresh_and_whole_clip_decodes_in_between_do_not_disturb_it(wan_vae):
    adapter = get_adapter(wan_vae)
    first, second = _latents(adapter, 5, seed=1), _latents(adapter, 4, seed=2)
    decoder = adapter.stream_decoder(wan_vae)
    head = decoder.decode(first[:, :, :2])
    other = adapter.decode(wan_vae, second)  # clears the VAE's own cache, not the stream's
    tail = decoder.decode(first[:, :, 2:])
    torch.testing.assert_close(torch.cat([head, tail], 2), adapter.decode(wan_vae, first), rtol=0, atol=1e-5)
    fresh = _stream_decode(adapter, wan_vae, second, [1, 3])  # a second stream of the same factory
    torch.testing.assert_close(torch.cat(fresh, 2), other, rtol=0, atol=1e-5)


@torch.no_grad()
def test_wan_stream_decoder_checks_chunks_and_refuses_tiling():
    vae = tu.tiny_wan_vae()
    adapter = get_adapter(vae)
    decoder = adapter.stream_decoder(vae)
    with pytest.raises(ValueError, match="16 channels"):
        decoder.decode(torch.zeros(1, 4, 1, 3, 5))
    vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16)
    try:
        with pytest.raises(ValueError, match="tiled Wan VAE decode"):
            decoder.decode(torch.zeros(1, 16, 1, 3, 5))
    finally:
        vae.disable_tiling()


@torch.no_grad()
def test_space_to_depth_decodes_per_chunk_exactly():
    from cascade_vsr import SpaceToDepthAutoencoder

    vae = SpaceToDepthAutoencoder()
    adapter = get_adapter(vae)
    latents = _latents(adapter, 6)
    streamed = _stream_decode(adapter, vae, latents, [1, 2, 3])
    assert [c.shape[2] for c in streamed] == [1, 2, 3]
    assert torch.equal(torch.cat(streamed, dim=2), adapter.decode(vae, latents))


@pytest.mark.parametrize("name", ["cogvideox", "hunyuan_video", "ltx_video", "mochi"])
def test_vaes_with_temporal_context_refuse_to_stream_decode(name):
    with pytest.raises(ValueError, match=f"the {name} VAE decodes with temporal context.*output_type='latent'"):
        get_adapter(name).stream_decoder(None)
    # No temporal compression is not enough: the base adapter does not know its decoder to be per frame.
    with pytest.raises(ValueError, match="temporal context"):
        LatentAdapter(temporal_compression=1, name="custom").stream_decoder(None)


# ---------------------------------------------------------------- the streaming pipeline


@pytest.mark.parametrize("output_type", ["np", "pt"])
@torch.no_grad()
def test_streamed_wan_pipeline_frames_are_its_latent_stream_decoded_once(wan_vae, output_type):
    """`stream(output_type="np"/"pt")` on a Wan latent space: the frames of the HR latent stream
    (`output_type="latent"`, same noise) concatenated and decoded in one `adapter.decode`, cropped, postprocessed."""
    adapter = get_adapter(wan_vae)
    pipe = tiny_causal_stage(wan_vae)
    lr = _latents(adapter, 6, seed=3)[:1, :, :, :, :4]
    lr_pieces = list(lr.split([1, 3, 2], dim=2))
    text = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(4))
    kwargs = dict(scale=1.5, num_inference_steps=2, noise_aug_strength=0.2, prompt_embeds=text, guidance_scale=2.0)

    def run(kind: str) -> list:
        return list(pipe.stream(lr_pieces, output_type=kind, generator=torch.Generator().manual_seed(7), **kwargs))

    frames, hr = run(output_type), torch.cat(run("latent"), dim=2)
    assert hr.shape[2] == 6 and [f.shape[1] for f in frames] == [5, 8, 8]  # chunks of 2 latent frames
    sc = adapter.spatial_compression
    height, width = round(3 * sc * 1.5), round(4 * sc * 1.5)
    decoded = adapter.decode(wan_vae, hr).float()[..., :height, :width]
    expected = pipe.video_processor.postprocess_video(decoded, output_type=output_type)
    if output_type == "np":
        import numpy as np

        streamed = np.concatenate(frames, axis=1)
        assert streamed.shape == expected.shape == (1, 21, height, width, 3)
        np.testing.assert_allclose(streamed, expected, rtol=0, atol=1e-5)
        assert np.ptp(streamed) > 0.1
    else:
        streamed = torch.cat(frames, dim=1)
        assert streamed.shape == expected.shape == (1, 21, 3, height, width)
        torch.testing.assert_close(streamed, expected, rtol=0, atol=1e-5)
    again = run(output_type)  # a second stream starts from a fresh decoder
    assert all((a == b).all() for a, b in zip(again, frames))


def test_stream_refuses_to_decode_a_vae_with_temporal_context():
    pipe = tiny_causal_stage(tu.tiny_cogvideox_vae())
    lr = torch.randn(1, 4, 2, 3, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="the cogvideox VAE decodes with temporal context.*output_type='latent'"):
        next(pipe.stream([lr], scale=2, num_inference_steps=1, output_type="np"))
    (hr,) = pipe.stream([lr], scale=2, num_inference_steps=1, output_type="latent")
    assert hr.shape == (1, 4, 2, 6, 8)
