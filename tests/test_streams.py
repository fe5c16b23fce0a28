"""Chunked frame I/O (core.streams) and spatial tiles (pipelines.tiling): round trips and layouts against
hand-made references."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from cascade_vsr.commands.upscale import cross_fade, overlapping_windows
from cascade_vsr.core.metrics import psnr
from cascade_vsr.core.streams import VideoSink, VideoSource
from cascade_vsr.core.video import read_frames, read_video, sample_video_path
from cascade_vsr.pipelines.tiling import ramp_weights, tile_starts, tiled_super_resolve


@pytest.fixture(scope="module")
def frames():
    return read_video(sample_video_path("carphone_pristine.mp4"), num_frames=7)[:, :48, :64].copy()


def clip_with_audio(path, frames, fps=24):
    """An mp4 with the frames and one second of a sine tone (AAC)."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=Fraction(fps))
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        audio = container.add_stream("aac", rate=16000)
        for frame in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        tone = (0.3 * np.sin(np.arange(16000) * 2 * np.pi * 440 / 16000)).astype(np.float32)
        for start in range(0, 16000, 1024):
            chunk = av.AudioFrame.from_ndarray(tone[None, start : start + 1024], format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = 16000, start
            for packet in audio.encode(chunk):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)
    return path


def test_png_folder_round_trip_in_chunks_is_lossless(tmp_path, frames):
    with VideoSink(tmp_path / "out") as sink:
        for start in range(0, 7, 3):
            sink.write(frames[start : start + 3])
    source = VideoSource(tmp_path / "out")
    assert (source.num_frames, source.height, source.width, source.has_audio) == (7, 48, 64, False)
    chunks = list(source.chunks(3))
    assert [len(c) for c in chunks] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(chunks), frames)
    np.testing.assert_array_equal(read_frames(str(tmp_path / "out" / "*.png")), frames)


def test_video_sink_copies_the_audio_and_keeps_the_rate(tmp_path, frames):
    source = VideoSource(clip_with_audio(tmp_path / "in.mp4", frames, fps=25))
    assert source.has_audio and source.fps == 25 and source.num_frames == 7
    with VideoSink(tmp_path / "out.mp4", fps=source.fps, audio_from=source.source) as sink:
        for chunk in source.chunks(4):
            sink.write(chunk)
    with av.open(str(tmp_path / "out.mp4")) as out, av.open(str(tmp_path / "in.mp4")) as original:
        assert float(out.streams.video[0].average_rate) == 25
        copied = [bytes(p) for p in out.demux(out.streams.audio[0]) if p.size]
        expected = [bytes(p) for p in original.demux(original.streams.audio[0]) if p.size]
    assert copied == expected  # the packets as they were, not re-encoded
    decoded = read_video(tmp_path / "out.mp4")
    assert decoded.shape == frames.shape and float(psnr(decoded, read_video(source.source)).mean()) > 30


def test_sink_refuses_to_overwrite_and_leaves_nothing_on_error(tmp_path, frames):
    (tmp_path / "taken.mp4").write_bytes(b"old")
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        VideoSink(tmp_path / "taken.mp4")
    with pytest.raises(ValueError, match="unknown video extension"):
        VideoSink(tmp_path / "out.xyz")
    with pytest.raises(RuntimeError, match="killed"), VideoSink(tmp_path / "out.mp4") as sink:
        sink.write(frames[:2])
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.mp4"]
    with VideoSink(tmp_path / "taken.mp4", overwrite=True) as sink:
        sink.write(frames)
    assert read_video(tmp_path / "taken.mp4").shape == frames.shape


def test_overlapping_windows_share_frames_and_cover_the_video():
    video = np.arange(23)[:, None]
    chunks = (video[i : i + 5] for i in range(0, 23, 5))
    windows = list(overlapping_windows(chunks, window=8, overlap=3))
    assert [last for _, last in windows] == [False] * (len(windows) - 1) + [True]
    assert all(len(w) == 8 for w, _ in windows[:-1]) and len(windows[-1][0]) > 3
    for (previous, _), (current, _) in zip(windows, windows[1:]):
        np.testing.assert_array_equal(previous[-3:], current[:3])
    kept = np.concatenate([w[: len(w) - 3] for w, _ in windows[:-1]] + [windows[-1][0]])
    np.testing.assert_array_equal(kept, video)


def test_cross_fade_weights_move_from_the_old_to_the_new_window():
    old, new = np.zeros((3, 2)), np.ones((5, 2))
    np.testing.assert_allclose(cross_fade(old, new)[:, 0], [0.25, 0.5, 0.75, 1, 1])


@pytest.mark.parametrize("size, tile, overlap, multiple", [(100, 32, 8, 4), (64, 64, 8, 4), (37, 16, 4, 1)])
def test_tile_starts_cover_the_axis_with_the_overlap(size, tile, overlap, multiple):
    starts = tile_starts(size, tile, overlap, multiple)
    assert starts[0] == 0 and min(starts[-1] + tile, size) == size
    assert all(s % multiple == 0 for s in starts)
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # neighbours share >= overlap
    with pytest.raises(ValueError, match="`overlap`"):
        tile_starts(size, tile, tile, multiple)


def test_ramps_of_one_overlap_sum_to_one():
    trail, lead = ramp_weights(10, 0, 4)[-4:], ramp_weights(10, 4, 0)[:4]
    torch.testing.assert_close(trail + lead, torch.ones(4, dtype=torch.float64))


def test_tiled_output_equals_untiled_for_a_tile_consistent_upsampler():
    """Nearest-neighbour 2x gives every HR pixel from its own LR pixel, so tiles and blending must change nothing."""

    def nearest(video, size):
        out = video.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
        assert tuple(out.shape[-2:]) == tuple(size)
        return out

    video = torch.rand(1, 2, 3, 44, 60, dtype=torch.float64)
    tiled = tiled_super_resolve(nearest, video, (88, 120), tile=16, overlap=4, multiple=4)
    torch.testing.assert_close(tiled, nearest(video, (88, 120)), rtol=0, atol=1e-12)
