"""The pipeline's `self_ensemble`: the 8 flips / transposes, their randomness, and the mean of the runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade_vsr.models.space_to_depth import SpaceToDepthAutoencoder
from cascade_vsr.pipelines.self_ensemble import (
    NUM_TRANSFORMS,
    dihedral_transform,
    generator_for_run,
    latent_dihedral_transform,
    swaps_height_width,
)
from tests.test_pixel_space import _pipe

SIZE = (16, 20)  # from 8 x 12: 2x in height, non-integer in width
SETTINGS = dict(num_inference_steps=2, noise_aug_strength=0.2, noise_frame_correlation=0.5)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe():
    return _pipe()


@pytest.fixture(scope="module")
def video() -> torch.Tensor:
    return torch.rand(2, 2, 3, 8, 12, generator=_gen(11))  # (B, T, C, H, W) in [0, 1]


def _single_run(pipe, video, index: int, generator, **kwargs) -> torch.Tensor:
    """One ordinary pipeline run on the `index`-th transform of `video`, its output transformed back."""
    height, width = SIZE[::-1] if index & 4 else SIZE
    frames = pipe(
        video=dihedral_transform(video, index),
        height=height,
        width=width,
        generator=generator,
        output_type="pt",
        **SETTINGS,
        **kwargs,
    ).frames
    return dihedral_transform(frames, index, inverse=True).double()


def test_transforms_are_the_dihedral_group_and_invert():
    frames = torch.rand(2, 3, 3, 5, 7, generator=_gen(2))
    # independent reference: the 8 symmetries of a rectangle as rotations, with and without a mirror
    reference = [torch.rot90(m, r, dims=(-2, -1)) for m in (frames, frames.flip(-1)) for r in range(4)]
    transformed = [dihedral_transform(frames, index) for index in range(NUM_TRANSFORMS)]
    assert dihedral_transform(frames, 0) is frames
    for index, result in enumerate(transformed):
        assert sum(result.shape == r.shape and torch.equal(result, r) for r in reference) == 1, index
        assert result.shape[-2:] == ((7, 5) if index & 4 else (5, 7)) and swaps_height_width(index) == bool(index & 4)
        assert result.is_contiguous()
        assert torch.equal(dihedral_transform(result, index, inverse=True), frames)
    # the order of the first N: the left-right flip, then upside down, then the transposes
    assert torch.equal(transformed[1], frames.flip(-1)) and torch.equal(transformed[2], frames.flip(-2))
    assert torch.equal(transformed[4], frames.transpose(-2, -1))
    for bad in (8, -1, 1.0, True):
        with pytest.raises(ValueError, match="`index`"):
            dihedral_transform(frames, bad)


def test_run_k_is_seeded_seed_plus_k():
    generator = _gen(5)
    assert generator_for_run(generator, 0) is generator and generator_for_run(None, 3) is None
    assert generator_for_run(generator, 3).initial_seed() == 8
    assert [g.initial_seed() for g in generator_for_run([_gen(5), _gen(20)], 2)] == [7, 22]
    fresh = generator_for_run(generator, 1)
    assert torch.equal(torch.randn(4, generator=fresh), torch.randn(4, generator=_gen(6)))


@pytest.mark.parametrize("size", [2, 8])
def test_ensemble_is_the_mean_of_single_runs_seeded_seed_plus_k(pipe, video, size):
    expected = sum(_single_run(pipe, video, k, _gen(3 + k)) for k in range(size)) / size
    result = pipe(
        video=video, height=SIZE[0], width=SIZE[1], generator=_gen(3), self_ensemble=size, output_type="pt", **SETTINGS
    ).frames
    assert result.dtype == torch.float64 and result.shape == (2, 2, 3, *SIZE)
    torch.testing.assert_close(result, expected, rtol=0, atol=0)
    # the model is not equivariant: each transform gives another answer, the mean differs from run 0
    assert not torch.equal(result, _single_run(pipe, video, 0, _gen(3)))


def test_output_types_of_the_mean(pipe, video):
    kwargs = dict(video=video, scale=(2.0, 5 / 3), self_ensemble=2, **SETTINGS)
    as_pt = pipe(generator=_gen(3), output_type="pt", **kwargs).frames
    as_np = pipe(generator=_gen(3), output_type="np", **kwargs).frames
    as_pil = pipe(generator=_gen(3), output_type="pil", **kwargs).frames
    assert as_pt.shape == (2, 2, 3, *SIZE)  # the scale pair is of the untransformed input
    np.testing.assert_array_equal(as_np, as_pt.permute(0, 1, 3, 4, 2).numpy())
    assert len(as_pil) == 2 and len(as_pil[0]) == 2 and as_pil[0][0].size == SIZE[::-1]
    np.testing.assert_array_equal(np.asarray(as_pil[1][1]), (as_np[1, 1] * 255).round().astype(np.uint8))


def test_without_a_generator_the_runs_draw_from_the_global_rng_in_turn(pipe, video):
    torch.manual_seed(7)
    result = pipe(video=video, height=SIZE[0], width=SIZE[1], self_ensemble=2, output_type="pt", **SETTINGS).frames
    torch.manual_seed(7)
    expected = (_single_run(pipe, video, 0, None) + _single_run(pipe, video, 1, None)) / 2
    torch.testing.assert_close(result, expected, rtol=0, atol=0)


def test_a_list_of_generators_is_seeded_per_video(pipe, video):
    result = pipe(
        video=video,
        height=SIZE[0],
        width=SIZE[1],
        generator=[_gen(3), _gen(10)],
        self_ensemble=2,
        output_type="pt",
        **SETTINGS,
    ).frames
    expected = sum(_single_run(pipe, video, k, [_gen(3 + k), _gen(10 + k)]) for k in range(2)) / 2
    torch.testing.assert_close(result, expected, rtol=0, atol=0)


def test_colour_fix_applies_per_run(pipe, video):
    result = pipe(
        video=video,
        height=SIZE[0],
        width=SIZE[1],
        generator=_gen(3),
        self_ensemble=2,
        color_fix="wavelet",
        output_type="pt",
        **SETTINGS,
    ).frames
    expected = sum(_single_run(pipe, video, k, _gen(3 + k), color_fix="wavelet") for k in range(2)) / 2
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-6)


def test_bad_self_ensemble_raises_before_compute(pipe, video, monkeypatch):
    def no_compute(*args, **kwargs):
        raise AssertionError("heavy compute ran before the input check")

    monkeypatch.setattr(pipe.upsampler, "forward", no_compute)
    monkeypatch.setattr(pipe.vae, "encode", no_compute)
    lr_latents = torch.zeros(2, 48, 2, 2, 3)
    cases = [
        (dict(video=video, self_ensemble=0), r"`self_ensemble`.*\[1, 8\]"),
        (dict(video=video, self_ensemble=9), r"`self_ensemble`.*\[1, 8\]"),
        (dict(video=video, self_ensemble=2.0), r"`self_ensemble`.*\[1, 8\]"),
        (dict(video=video, self_ensemble=True), r"`self_ensemble`.*\[1, 8\]"),
        (dict(lr_latents=lr_latents, self_ensemble=2), r"`self_ensemble=2`.*`video`"),
        (dict(video=video, self_ensemble=2, output_type="latent"), r"`self_ensemble=2`.*'latent'"),
        (dict(video=video, self_ensemble=2, latents=torch.zeros(2, 48, 2, 4, 5)), r"`self_ensemble=2`.*`latents`"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            pipe(**{"height": SIZE[0], "width": SIZE[1], "num_inference_steps": 1, **kwargs})


def test_latent_transform_is_the_pixel_transform_in_space_to_depth_latents():
    vae = SpaceToDepthAutoencoder()
    video = torch.rand(2, 3, 2, 8, 12, generator=_gen(4)) * 2 - 1  # (B, C, T, H, W): a non-square picture
    latents = vae.encode(video).latent_dist.mode()
    for index in range(NUM_TRANSFORMS):
        # independent reference: decode, transform the pixels, encode
        expected = vae.encode(dihedral_transform(video, index)).latent_dist.mode()
        result = latent_dihedral_transform(latents, index, "space_to_depth")
        assert torch.equal(result, expected), index
        assert torch.equal(latent_dihedral_transform(result, index, "space_to_depth", inverse=True), latents)
    for space in (None, "wan"):
        with pytest.raises(ValueError, match="`latent_space` must be 'space_to_depth'"):
            latent_dihedral_transform(latents, 1, space)
    with pytest.raises(ValueError, match="3 \\* factor\\*\\*2 channels"):
        latent_dihedral_transform(torch.zeros(1, 16, 1, 2, 2), 1, "space_to_depth")
