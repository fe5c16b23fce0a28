"""Stream encoding (`adapter.stream_encoder`): pixel frames encoded piece by piece give the latents of one whole-clip
`adapter.encode` (the posterior mode), for Wan's causal VAE (frame 0 alone, then groups of 4, its causal-conv cache
carried across pieces) and the per-frame space-to-depth VAE; the VAEs that cannot stream refuse, and
`cascade-vsr upscale` streams a Wan-latent stage with it."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from einops import rearrange

from cascade_vsr import testing as tu
from cascade_vsr.pipelines.adapters import LatentAdapter, get_adapter

from .conftest import tiny_causal_stage


def _frames(adapter: LatentAdapter, frames: int, seed: int = 0) -> torch.Tensor:
    """Random pixel frames (2, 3, T, H, W) in [-1, 1], a latent grid of 2 x 3."""
    sc = adapter.spatial_compression
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, frames, 2 * sc, 3 * sc, generator=generator) * 2 - 1


def _stream_encode(adapter: LatentAdapter, vae, video: torch.Tensor, pieces: list[int]) -> list[torch.Tensor]:
    encoder = adapter.stream_encoder(vae)
    return [encoder.encode(piece) for piece in video.split(pieces, dim=2)] + [encoder.finish()]


@pytest.mark.parametrize("pieces", [[1, 2, 3, 5, 4, 2], [17], [3, 3, 3, 3, 3, 2], [1] * 17, [9, 8], [2, 7, 1, 1, 6]])
@torch.no_grad()
def test_wan_stream_encode_equals_the_whole_clip_encode(wan_vae, pieces):
    """Pieces of mixed lengths encode to the whole clip's latents: each piece returns the latents it completes (frame
    0 alone, then every complete group of 4), possibly none (an empty tensor), and `finish` none."""
    adapter = get_adapter(wan_vae)
    video = _frames(adapter, sum(pieces))
    whole = adapter.encode(wan_vae, video)
    assert whole.shape == (2, adapter.latent_channels, 5, 2, 3)
    streamed = _stream_encode(adapter, wan_vae, video, pieces)
    received = np.cumsum(pieces)
    assert [c.shape[2] for c in streamed[:-1]] == list(np.diff([0, *((received + 3) // 4)]))
    assert streamed[-1].shape == (2, adapter.latent_channels, 0, 2, 3)
    torch.testing.assert_close(torch.cat(streamed, dim=2), whole, rtol=0, atol=1e-5)
    assert whole.std() > 0.1  # not a constant latent


@torch.no_grad()
def test_wan_pieces_encoded_independently_give_other_latents(wan_vae):
    """Without the causal cache of the frames before: a latent of frames 4k+1..4k+4 encoded as a clip that starts at
    frame 4k (the one 4k+1-frame clip that holds them) differs from the whole clip's."""
    adapter = get_adapter(wan_vae)
    video = _frames(adapter, 17, seed=1)
    whole = adapter.encode(wan_vae, video)
    for k in range(1, 4):
        alone = adapter.encode(wan_vae, video[:, :, 4 * k : 4 * k + 5])
        assert (alone[:, :, 1] - whole[:, :, k + 1]).abs().amax() > 1e-2


@torch.no_grad()
def test_every_stream_starts_fresh_and_whole_clip_encodes_in_between_do_not_disturb_it(wan_vae):
    adapter = get_adapter(wan_vae)
    first, second = _frames(adapter, 9, seed=2), _frames(adapter, 13, seed=3)
    encoder = adapter.stream_encoder(wan_vae)
    head = encoder.encode(first[:, :, :3])
    other = adapter.encode(wan_vae, second)  # clears the VAE's own cache, not the stream's
    tail = encoder.encode(first[:, :, 3:])
    torch.testing.assert_close(torch.cat([head, tail], 2), adapter.encode(wan_vae, first), rtol=0, atol=1e-5)
    assert encoder.finish().shape[2] == 0
    fresh = _stream_encode(adapter, wan_vae, second, [6, 7])  # a second stream of the same factory
    torch.testing.assert_close(torch.cat(fresh, 2), other, rtol=0, atol=1e-5)


@torch.no_grad()
def test_wan_stream_encoder_refuses_what_the_whole_clip_encode_refuses():
    """A clip that is not 4k+1 frames: `adapter.encode` refuses it, and so does the stream when it finishes (not
    silently dropping the last frames as `AutoencoderKLWan.encode` does); pieces must be RGB of one size."""
    vae = tu.tiny_wan_vae()
    adapter = get_adapter(vae)
    video = _frames(adapter, 7)
    with pytest.raises(ValueError, match=r"must be 4k\+1 frames for the wan VAE"):
        adapter.encode(vae, video)
    encoder = adapter.stream_encoder(vae)
    assert encoder.encode(video).shape[2] == 2  # frame 0, frames 1-4; frames 5, 6 wait for a group
    with pytest.raises(ValueError, match=r"ended 2 frame\(s\) after its last complete group of 4: .*4k\+1 .*got 7"):
        encoder.finish()
    encoder = adapter.stream_encoder(vae)
    with pytest.raises(ValueError, match="received no frames"):
        encoder.finish()
    with pytest.raises(ValueError, match="3 channels"):
        encoder.encode(torch.zeros(2, 4, 1, 16, 24))
    encoder.encode(video[:, :, :1])
    with pytest.raises(ValueError, match=r"keep the batch and size \(B, H, W\) = \(2, 16, 24\)"):
        encoder.encode(video[:1, :, 1:5])
    encoder.encode(video[:, :, 1:5])
    assert encoder.finish().shape[2] == 0
    with pytest.raises(ValueError, match="this stream is finished"):
        encoder.encode(video[:, :, 5:])
    vae.enable_tiling(tile_sample_min_height=8, tile_sample_min_width=8)
    try:
        with pytest.raises(ValueError, match="tiled Wan VAE encode"):
            adapter.stream_encoder(vae).encode(video[:, :, :1])
    finally:
        vae.disable_tiling()


@torch.no_grad()
def test_space_to_depth_encodes_per_piece_exactly():
    from cascade_vsr import SpaceToDepthAutoencoder

    vae = SpaceToDepthAutoencoder()
    adapter = get_adapter(vae)
    video = _frames(adapter, 6)
    streamed = _stream_encode(adapter, vae, video, [1, 2, 3])
    assert [c.shape[2] for c in streamed] == [1, 2, 3, 0]
    assert torch.equal(torch.cat(streamed, dim=2), adapter.encode(vae, video))


@pytest.mark.parametrize("name", ["cogvideox", "hunyuan_video", "ltx_video", "mochi"])
def test_vaes_with_temporal_context_refuse_to_stream_encode(name):
    with pytest.raises(ValueError, match=f"the {name} VAE encodes with temporal context.*encode the whole clip"):
        get_adapter(name).stream_encoder(None)
    with pytest.raises(ValueError, match="the custom VAE encodes with temporal context"):
        LatentAdapter(temporal_compression=1, name="custom").stream_encoder(None)


# ---------------------------------------------------------------- `cascade-vsr upscale` on a Wan-latent stage


SETTINGS = {"num_inference_steps": 1, "noise_aug_strength": 0.0, "noise_frame_correlation": 1.0}


@pytest.fixture(scope="module")
def wan_stage(tmp_path_factory):
    """A Wan 2.1-latent stage folder that holds its VAE as vae/. `export_pipeline` writes no VAE for a learned
    latent space, so it is saved as a user saves a stage built with the upstream's VAE (`from_pipe`).
    Preconditioned (`condition_residual_std`), its one step from sigma 1 does not depend on the noise, so the
    windowed path (which draws its noise otherwise) can be compared with the stream, as in test_upscale.py."""
    path = tmp_path_factory.mktemp("wan_stage") / "model"
    tiny_causal_stage(tu.tiny_wan_vae(), SETTINGS, condition_residual_std=0.05).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def wan_lr_frames():
    from cascade_vsr.core.video import read_video, resize_frames, sample_video_path

    frames = read_video(sample_video_path("carphone_pristine.mp4"), num_frames=13)
    return resize_frames(frames[:, :120, :160], (24, 32), mode="area")  # a latent grid of 3 x 4


def _to_uint8(frames: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(frames * 255), 0, 255).astype(np.uint8)


@torch.no_grad()
def test_upscale_streams_a_wan_stage_as_the_stream_of_the_whole_clip_encode(
    tmp_path, wan_stage, wan_lr_frames, monkeypatch
):
    """13 frames in pieces of 8 (2 latent chunks): the streamed frames are `CascadeVSRPipeline.stream`'s on the
    whole-clip encode, to within a grey level (float rounding); --no-stream (the whole clip at once, offline
    block-causal) gives the same frames to within a grey level."""
    from cascade_vsr import CascadeVSRPipeline
    from cascade_vsr.cli import main
    from cascade_vsr.core.streams import VideoSink
    from cascade_vsr.core.video import read_frames

    with VideoSink(tmp_path / "in") as sink:
        sink.write(wan_lr_frames)
    base = ["upscale", str(tmp_path / "in"), "--model", str(wan_stage), "--scale", "2", "--dtype", "float32"]
    assert main([*base, "-o", str(tmp_path / "streamed")]) == 0
    streamed = read_frames(tmp_path / "streamed")
    assert streamed.shape == (13, 48, 64, 3)

    pipe = CascadeVSRPipeline.from_pretrained(wan_stage, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.vae).__name__ == "AutoencoderKLWan" and pipe.adapter.name == "wan"
    video = rearrange(torch.from_numpy(wan_lr_frames), "t h w c -> 1 t c h w").float() / 255
    lr = pipe.adapter.encode(pipe.vae, pipe.preprocess_video(pipe.adapter, video))  # the whole clip at once
    assert lr.shape[2] == 4
    hr = pipe.stream(lr.split(2, dim=2), scale=2, generator=torch.Generator().manual_seed(0), output_type="np")
    expected = _to_uint8(np.concatenate([chunk[0] for chunk in hr]))
    assert expected.shape == streamed.shape
    np.testing.assert_allclose(streamed, expected, rtol=0, atol=1)
    assert (streamed == expected).mean() > 0.99 and np.ptp(streamed) > 50

    with monkeypatch.context() as patch:
        patch.setattr(CascadeVSRPipeline, "stream", lambda *a, **k: pytest.fail("--no-stream must not stream"))
        assert main([*base, "-o", str(tmp_path / "whole"), "--no-stream"]) == 0
    np.testing.assert_allclose(read_frames(tmp_path / "whole"), streamed, rtol=0, atol=1)


def test_upscale_refuses_a_wan_input_that_is_not_4k_plus_1_frames(tmp_path, wan_stage, wan_lr_frames):
    """Streamed, before a frame is read or the output opened; --no-stream refuses it too (`preprocess_video`)."""
    from cascade_vsr.cli import main
    from cascade_vsr.core.streams import VideoSink

    with VideoSink(tmp_path / "in") as sink:
        sink.write(wan_lr_frames[:7])
    base = ["upscale", str(tmp_path / "in"), "-o", str(tmp_path / "sr"), "--model", str(wan_stage), "--scale", "2"]
    with pytest.raises(ValueError, match=r"has 7 frames: the wan VAE encodes 4k\+1 frames .*trim it to 5 frames"):
        main(base)
    with pytest.raises(ValueError, match=r"`video frames` must be 4k\+1 frames for the wan VAE"):
        main([*base, "--no-stream"])
    assert not (tmp_path / "sr").exists()


def test_upscale_windows_of_a_wan_stage_are_4k_plus_1_frames(tmp_path, wan_stage, wan_lr_frames, monkeypatch):
    """--no-stream on a video longer than a window: the default window is 33 frames (4k+1), every window, the
    padded last one too, encodes; a --chunk-frames that is not 4k+1 is refused before the output is opened."""
    from cascade_vsr.cli import main
    from cascade_vsr.commands import upscale
    from cascade_vsr.core.streams import VideoSink
    from cascade_vsr.core.video import read_frames

    with VideoSink(tmp_path / "in") as sink:
        sink.write(np.concatenate([wan_lr_frames, wan_lr_frames[::-1], wan_lr_frames]))  # 39 frames
    base = ["upscale", str(tmp_path / "in"), "--model", str(wan_stage), "--scale", "2", "--no-stream"]
    lengths = []
    window = upscale.super_resolve_window

    def recorded(pipe, frames, out_size, args, length):
        lengths.append((len(frames), length))
        return window(pipe, frames, out_size, args, length)

    monkeypatch.setattr(upscale, "super_resolve_window", recorded)
    assert main([*base, "-o", str(tmp_path / "sr")]) == 0
    assert lengths == [(33, 33), (10, 33)]  # windows start every 33 - 4 frames
    assert read_frames(tmp_path / "sr").shape == (39, 48, 64, 3)
    with pytest.raises(
        ValueError, match=r"`--chunk-frames` must be 4k\+1 .* for a VAE that compresses time 4x, got 32"
    ):
        main([*base, "-o", str(tmp_path / "bad"), "--chunk-frames", "32"])
    assert not (tmp_path / "bad").exists()


def test_upscale_refuses_to_stream_other_vaes_and_a_stage_without_one():
    from cascade_vsr.commands.upscale import streams

    args = dict(stream=None, model="stage", tile=None, color_fix=None, self_ensemble=None, chunks_per_forward=None)
    pipe = tiny_causal_stage(tu.tiny_cogvideox_vae())
    with pytest.raises(ValueError, match="the cogvideox VAE is not streamed .*; pass --no-stream"):
        streams(pipe, argparse.Namespace(**args))
    assert streams(pipe, argparse.Namespace(**{**args, "stream": False})) is False
    pipe = tiny_causal_stage(tu.tiny_wan_vae())
    assert streams(pipe, argparse.Namespace(**args)) is True
    pipe.vae = None
    with pytest.raises(ValueError, match="stage has none"):
        streams(pipe, argparse.Namespace(**{**args, "model": "stage"}))
