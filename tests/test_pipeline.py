"""CascadeVSRPipeline chained after tiny random upstream pipelines of every family (nothing downloaded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from einops import rearrange

from cascade_vsr import CascadeVSRPipeline, CascadeVSRPipelineOutput, CascadeVSRTransformer3DModel, LatentUpsampler3D
from cascade_vsr import testing as tu
from cascade_vsr.core.color import adain_color_fix, wavelet_color_fix
from cascade_vsr.pipelines.adapters import get_adapter
from cascade_vsr.pipelines.sampling import inverse_shift
from cascade_vsr.pipelines.target_size import resolve_target_size
from tests.conftest import randomize_

LR_SIZE = (16, 32)  # pixels of the upstream call: 2 x 4 latents for the (4, 8, 8) VAEs


def _stage(latent_channels: int, text_dim: int, latent_space: str | None):
    torch.manual_seed(0)
    transformer = CascadeVSRTransformer3DModel(
        latent_channels=latent_channels,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=12,
        ffn_dim=32,
        text_dim=text_dim,
        latent_space=latent_space,
    )
    upsampler = LatentUpsampler3D(latent_channels=latent_channels, hidden_channels=16, num_blocks=1)
    return dict(
        transformer=randomize_(transformer).eval(),
        upsampler=randomize_(upsampler, seed=1).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def wan():
    upstream = tu.tiny_wan_pipeline()
    lr = upstream(
        prompt="a cat",
        num_frames=5,
        height=LR_SIZE[0],
        width=LR_SIZE[1],
        num_inference_steps=2,
        output_type="latent",
        generator=_gen(),
        max_sequence_length=16,
    ).frames
    pipe = CascadeVSRPipeline.from_pipe(upstream, **_stage(16, 32, "wan"))
    pipe.set_progress_bar_config(disable=True)
    return upstream, pipe, lr


def _run(pipe, lr, **kwargs):
    defaults = dict(lr_latents=lr, scale=1.5, num_inference_steps=2, output_type="latent", generator=_gen())
    return pipe(**{**defaults, **kwargs}).frames


def test_lazy_public_export():
    import cascade_vsr

    assert "CascadeVSRPipeline" in cascade_vsr.__all__ and cascade_vsr.CascadeVSRPipeline is CascadeVSRPipeline


@pytest.mark.parametrize("output_type", ["latent", "np", "pt", "pil"])
def test_wan_chain_every_output_type_at_non_integer_scale(wan, output_type):
    _, pipe, lr = wan
    frames = _run(pipe, lr, output_type=output_type, prompt="a cat", max_sequence_length=16)
    height, width = 24, 48  # 1.5 x (16, 32)
    if output_type == "latent":
        assert frames.shape == (1, 16, 2, 3, 6)  # ceil(24 / 8) x ceil(48 / 8) latents
    elif output_type == "np":
        assert frames.shape == (1, 5, height, width, 3) and 0 <= frames.min() and frames.max() <= 1
    elif output_type == "pt":
        assert frames.shape == (1, 5, 3, height, width)
    else:
        assert len(frames) == 1 and len(frames[0]) == 5 and frames[0][0].size == (width, height)


def test_exact_size_pads_and_crops(wan):
    _, pipe, lr = wan
    frames = _run(pipe, lr, scale=None, height=21, width=37, output_type="pt", num_inference_steps=1)
    assert frames.shape == (1, 5, 3, 21, 37)


def test_from_pipe_keeps_upstream_dtype():
    upstream = tu.tiny_wan_pipeline(dtype=torch.bfloat16)
    pipe = CascadeVSRPipeline.from_pipe(upstream, **_stage(16, 32, "wan"))
    assert pipe.vae is upstream.vae and pipe.text_encoder is upstream.text_encoder
    assert upstream.vae.dtype == torch.bfloat16 and upstream.text_encoder.dtype == torch.bfloat16
    assert upstream.transformer.dtype == torch.bfloat16
    assert pipe.transformer.dtype == torch.float32  # our modules stay as passed
    pipe = CascadeVSRPipeline.from_pipe(upstream, dtype=torch.float16, **_stage(16, 32, "wan"))
    assert pipe.transformer.dtype == torch.float16 and pipe.upsampler.dtype == torch.float16
    assert upstream.vae.dtype == torch.bfloat16 and upstream.text_encoder.dtype == torch.bfloat16


@torch.no_grad()
def test_decode_equals_upstream_decode_path(wan):
    upstream, pipe, lr = wan
    ours = _run(pipe, lr, scale=None, height=32, width=48)  # width x1.5: non-integer
    adapter = get_adapter(upstream)
    decoded = pipe.video_processor.postprocess_video(adapter.decode(pipe.vae, ours), output_type="np")

    def replace_final_latents(p, i, t, kwargs):  # the upstream decodes exactly our latents
        return {"latents": adapter.from_model(ours)} if i == p.num_timesteps - 1 else {}

    expected = upstream(
        prompt="a cat",
        num_frames=5,
        height=32,
        width=48,
        num_inference_steps=1,
        output_type="np",
        max_sequence_length=16,
        callback_on_step_end=replace_final_latents,
    ).frames
    np.testing.assert_array_equal(decoded, expected)


def test_same_generator_same_output(wan):
    _, pipe, lr = wan
    first, second = _run(pipe, lr), _run(pipe, lr)
    assert torch.equal(first, second)
    assert not torch.equal(first, _run(pipe, lr, generator=_gen(1)))


def test_noise_frame_correlation_shares_the_initial_noise_across_frames(wan):
    _, pipe, lr = wan
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["hidden_states"].clone()), with_kwargs=True
    )
    try:
        default = _run(pipe, lr, num_inference_steps=1)
        _run(pipe, lr, num_inference_steps=1, noise_frame_correlation=1.0)
    finally:
        hook.remove()
    independent, shared = seen
    assert not torch.equal(independent[:, :, 0], independent[:, :, 1])
    assert all(torch.equal(shared[:, :, 0], shared[:, :, t]) for t in range(shared.shape[2]))
    assert torch.equal(default, _run(pipe, lr, num_inference_steps=1, noise_frame_correlation=0.0))


def test_callback_once_per_step_and_can_replace_latents(wan):
    _, pipe, lr = wan
    calls = []

    def callback(p, i, t, kwargs):
        calls.append((i, sorted(kwargs)))
        return {"latents": torch.full_like(kwargs["latents"], 0.25)}

    out = _run(
        pipe,
        lr,
        num_inference_steps=3,
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "condition"],
    )
    assert calls == [(i, ["condition", "latents"]) for i in range(3)]
    assert torch.equal(out, torch.full_like(out, 0.25))


def test_one_step_and_cfg_is_batched_formula(wan):
    _, pipe, lr = wan
    embeds = torch.randn(1, 7, 32, generator=_gen(3))
    kwargs = dict(num_inference_steps=1)
    cond = _run(pipe, lr, prompt_embeds=embeds, **kwargs)
    uncond = _run(pipe, lr, **kwargs)  # no text: the model's null embedding
    guided = _run(pipe, lr, prompt_embeds=embeds, guidance_scale=4.0, **kwargs)
    assert cond.shape == (1, 16, 2, 3, 6) and not torch.allclose(cond, uncond)
    # One Euler step from the same noise is linear in the velocity: CFG of velocities = CFG of outputs.
    torch.testing.assert_close(guided, uncond + 4.0 * (cond - uncond), rtol=1e-4, atol=1e-4)
    negative = torch.randn(1, 3, 32, generator=_gen(4))  # another length: padded and masked
    neg_out = _run(pipe, lr, prompt_embeds=negative, **kwargs)
    guided = _run(pipe, lr, prompt_embeds=embeds, negative_prompt_embeds=negative, guidance_scale=2.0, **kwargs)
    torch.testing.assert_close(guided, neg_out + 2.0 * (cond - neg_out), rtol=1e-4, atol=1e-4)


def test_explicit_sigmas_are_used_exactly_despite_shift(wan):
    _, pipe, lr = wan
    _run(pipe, lr, num_inference_steps=3, sigmas=[1.0, 0.6, 0.2])
    torch.testing.assert_close(pipe.scheduler.sigmas, torch.tensor([1.0, 0.6, 0.2, 0.0]))
    _run(pipe, lr, num_inference_steps=2)  # the default schedule goes through the shift (3.0)
    torch.testing.assert_close(pipe.scheduler.sigmas, torch.tensor([1.0, 3 * 0.5 / (1 + 2 * 0.5), 0.0]))
    torch.testing.assert_close(inverse_shift(torch.tensor(0.75), 3.0), torch.tensor(0.5))


def test_save_and_reload_offline_identical(wan, tmp_path):
    _, pipe, lr = wan
    pipe.save_pretrained(tmp_path)
    reloaded = CascadeVSRPipeline.from_pretrained(tmp_path, local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded.transformer) is CascadeVSRTransformer3DModel and reloaded.vae is not None
    kwargs = dict(prompt="a cat", max_sequence_length=16, guidance_scale=2.0)
    assert torch.equal(_run(pipe, lr, **kwargs), _run(reloaded, lr, **kwargs))


@pytest.mark.parametrize("source", ["video", "lr_latents"])
def test_color_fix_is_the_fix_of_the_unfixed_output_against_the_upsampled_input(wan, source):
    _, pipe, lr = wan
    adapter = get_adapter(pipe.vae)
    video = torch.rand(1, 5, 3, 16, 32, generator=_gen())  # (B, T, C, H, W) in [0, 1]
    inputs = dict(video=video) if source == "video" else dict(lr_latents=lr)
    common = dict(scale=1.5, num_inference_steps=1, return_dict=False, **inputs)
    # by hand: the un-fixed output decoded, and the input's pixels (the LR latents decoded) resized bilinearly
    with torch.no_grad():
        unfixed = adapter.decode(pipe.vae, pipe(output_type="latent", generator=_gen(), **common)[0])[..., :24, :48]
        if source == "video":
            pixels = rearrange(video, "b t c h w -> b c t h w") * 2 - 1
        else:
            pixels = adapter.decode(pipe.vae, adapter.to_model(lr, pipe.vae))
    frames = rearrange(pixels, "b c t h w -> (b t) c h w")
    reference = F.interpolate(frames, size=(24, 48), mode="bilinear", align_corners=False)
    reference = rearrange(reference, "(b t) c h w -> b c t h w", b=1)
    for name, fix in (("adain", adain_color_fix), ("wavelet", wavelet_color_fix)):
        expected = rearrange((fix(unfixed, reference).clamp(-1, 1) / 2 + 0.5).clamp(0, 1), "b c t h w -> b t c h w")
        frames = pipe(output_type="pt", generator=_gen(), color_fix=name, **common)[0]
        assert frames.shape == (1, 5, 3, 24, 48)
        torch.testing.assert_close(frames, expected, rtol=0, atol=1e-5)
        # the fix changed the output: it is not the un-fixed video
        assert (frames - rearrange((unfixed / 2 + 0.5).clamp(0, 1), "b c t h w -> b t c h w")).abs().max() > 1e-2


def test_target_size_from_height_width_or_scale():
    assert resolve_target_size((16, 32), height=21, width=37) == (21, 37)
    assert resolve_target_size((16, 32), scale=1.5) == (24, 48)
    assert resolve_target_size((16, 32), scale=(2, 1.25)) == (32, 40)
    assert resolve_target_size((10, 30), scale=1.25) == (12, 38)  # rounded per axis: 12.5 -> 12, 37.5 -> 38
    for kwargs, match in (
        (dict(height=15, width=40), "smaller"),
        (dict(scale=0.9), "scale"),
        (dict(scale=(1.5,)), "scale"),
        (dict(scale="2"), "scale"),
        (dict(height=32), "height"),
        (dict(height=32.0, width=40), "ints"),
        (dict(scale=2, height=32, width=64), "not both"),
    ):
        with pytest.raises(ValueError, match=match):
            resolve_target_size((16, 32), **kwargs)


def test_return_dict_and_num_videos_per_prompt(wan):
    _, pipe, lr = wan
    out = pipe(lr_latents=lr, scale=1.5, num_inference_steps=1, output_type="latent", num_videos_per_prompt=2)
    assert isinstance(out, CascadeVSRPipelineOutput) and out.frames.shape[0] == 2


def test_num_videos_per_prompt_pairs_each_video_with_its_own_prompt(wan):
    _, pipe, lr = wan
    other = torch.randn(lr.shape, generator=_gen(7))
    embeds = torch.randn(2, 5, 32, generator=_gen(8))
    latents = torch.randn(4, 16, 2, 3, 6, generator=_gen(9))
    # no condition noise and given initial latents: every output video depends only on its input and its prompt
    kwargs = dict(scale=1.5, num_inference_steps=2, output_type="latent", noise_aug_strength=0.0)
    both = pipe(
        lr_latents=torch.cat([lr, other]), prompt_embeds=embeds, num_videos_per_prompt=2, latents=latents, **kwargs
    ).frames
    assert both.shape == (4, 16, 2, 3, 6)
    for index in range(4):  # videos 0, 1 from the first input and prompt, 2, 3 from the second
        source = (lr, other)[index // 2]
        alone = pipe(
            lr_latents=source, prompt_embeds=embeds[index // 2 :][:1], latents=latents[index : index + 1], **kwargs
        ).frames
        torch.testing.assert_close(both[index : index + 1], alone, rtol=1e-5, atol=1e-5)


def _bad_inputs(lr):
    nan = lr.clone()
    nan[0, 0, 0, 0, 0] = float("nan")
    return [
        (dict(lr_latents=None), "exactly one"),
        (dict(video=torch.rand(1, 5, 3, 16, 32)), "exactly one"),
        (dict(lr_latents=lr[0]), "lr_latents"),
        (dict(lr_latents=lr[:, :4]), "16 channels"),
        (dict(lr_latents=nan), "finite"),
        (dict(scale=0.5), "scale"),
        (dict(scale=(1.0, 0.9)), "scale"),
        (dict(scale=None, height=8, width=64), "smaller"),
        (dict(scale=None), "height"),
        (dict(scale=2.0, height=32, width=64), "scale"),
        (dict(output_type="mp4"), "output_type"),
        (dict(color_fix="histogram"), "color_fix"),
        (dict(prompt_embeds=torch.zeros(1, 4, 31)), "prompt_embeds"),
        (dict(prompt_embeds=torch.zeros(3, 4, 32)), "prompt_embeds"),
        (dict(negative_prompt_embeds=torch.zeros(1, 4, 8), prompt="a"), "negative_prompt_embeds"),
        (dict(prompt="a", prompt_embeds=torch.zeros(1, 4, 32)), "prompt"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(sigmas=[0.5, 1.0]), "sigmas"),
        (dict(noise_aug_strength=1.5), "noise_aug_strength"),
        (dict(noise_frame_correlation=-0.1), "noise_frame_correlation"),
        (dict(callback_on_step_end_tensor_inputs=["velocity"]), "callback_on_step_end_tensor_inputs"),
        (dict(latents=torch.zeros(1, 16, 2, 2, 2)), "latents"),
        (dict(decode_chunk_size=0), "decode_chunk_size"),
        (dict(generator=[_gen(), _gen()]), "generator"),
        (dict(scale="2"), "scale"),
        (dict(prompt=["a", "b"]), "prompt"),
    ]


def test_bad_inputs_raise_before_compute(wan, monkeypatch):
    _, pipe, lr = wan

    def no_compute(*args, **kwargs):
        raise AssertionError("heavy compute ran before the input check")

    monkeypatch.setattr(pipe.upsampler, "forward", no_compute)
    monkeypatch.setattr(pipe.vae, "encode", no_compute)
    for kwargs, match in _bad_inputs(lr):
        with pytest.raises(ValueError, match=match):
            _run(pipe, **{"lr": lr, **kwargs}) if "lr_latents" not in kwargs else pipe(
                **{"scale": 1.5, "num_inference_steps": 1, **kwargs}
            )
    with pytest.raises(ValueError, match="video frames"):
        pipe(video=torch.rand(1, 4, 3, 16, 32), scale=1.5)


def test_latent_space_mismatch_names_both(wan):
    upstream, _, lr = wan
    pipe = CascadeVSRPipeline.from_pipe(upstream, **_stage(16, 32, "hunyuan_video"))
    with pytest.raises(ValueError, match="'hunyuan_video'.*'wan'"):
        pipe(lr_latents=lr, scale=1.5)
    pipe = CascadeVSRPipeline(**_stage(16, 32, None))  # no vae and no latent_space: the format is unknown
    with pytest.raises(ValueError, match="latent_space"):
        pipe(lr_latents=lr, scale=1.5, output_type="latent")


@torch.no_grad()
def test_decode_in_temporal_chunks_keeps_frame_count(wan):
    _, pipe, _ = wan
    latents = torch.randn(1, 16, 3, 2, 2, generator=_gen())
    adapter = get_adapter(pipe.vae)
    whole = pipe.decode_latents(adapter, latents)
    chunked = pipe.decode_latents(adapter, latents, decode_chunk_size=1)
    assert chunked.shape == whole.shape == (1, 3, 9, 16, 16)
    torch.testing.assert_close(chunked[:, :, :1], whole[:, :, :1])  # the first chunk is decoded alone as well


@pytest.mark.parametrize("family", ["cogvideox", "hunyuan_video", "ltx_video"])
def test_chain_after_other_families(family):
    if family == "cogvideox":
        upstream, text_dim, call = tu.tiny_cogvideox_pipeline(), 32, dict(prompt="a cat", max_sequence_length=16)
    elif family == "hunyuan_video":
        upstream, text_dim, call = tu.tiny_hunyuan_pipeline(), 16, tu.hunyuan_prompt_embeds()
    else:
        upstream, text_dim, call = tu.tiny_ltx_pipeline(), 32, dict(prompt="a cat", max_sequence_length=16)
    num_frames = 9 if family == "cogvideox" else 5  # CogVideoX decodes odd latent counts to 4k+1 frames
    lr_size = (32, 64) if family == "ltx_video" else LR_SIZE  # LTXPipeline wants multiples of 32
    lr = upstream(
        num_frames=num_frames,
        height=lr_size[0],
        width=lr_size[1],
        num_inference_steps=1,
        output_type="latent",
        generator=_gen(),
        **call,
    ).frames
    adapter = get_adapter(upstream)
    pipe = CascadeVSRPipeline.from_pipe(upstream, **_stage(adapter.latent_channels, text_dim, family))
    pipe.set_progress_bar_config(disable=True)
    upstream_shape = (
        dict(num_frames=num_frames, height=lr_size[0], width=lr_size[1]) if family == "ltx_video" else None
    )
    height, width = round(1.5 * lr_size[0]), round(1.5 * lr_size[1])
    embeds = torch.randn(1, 6, text_dim, generator=_gen())
    common = dict(
        lr_latents=lr,
        scale=1.5,
        num_inference_steps=1,
        generator=_gen(),
        upstream_shape=upstream_shape,
        prompt_embeds=embeds,
        guidance_scale=2.0,
    )
    latents = pipe(output_type="latent", **common).frames
    sc = adapter.spatial_compression
    assert latents.shape[:3] == adapter.to_model(lr, **(upstream_shape or {})).shape[:3]
    assert latents.shape[3:] == (-(-height // sc), -(-width // sc))
    frames = pipe(output_type="np", **common).frames
    assert frames.shape == (1, num_frames, height, width, 3)
    # our latents decode through the adapter exactly like the upstream's own lines
    round_trip = adapter.to_model(
        adapter.from_model(latents),
        **(
            dict(latent_num_frames=latents.shape[2], latent_height=latents.shape[3], latent_width=latents.shape[4])
            if family == "ltx_video"
            else {}
        ),
    )
    assert torch.equal(round_trip, latents)


def test_uint8_video_is_divided_by_255_and_float_video_outside_unit_range_is_refused():
    from cascade_vsr.pipelines.pipeline_cascade_vsr import unit_range_frames

    frames = np.random.default_rng(0).integers(0, 256, (2, 8, 12, 3), dtype=np.uint8)
    np.testing.assert_array_equal(unit_range_frames(frames), frames.astype(np.float32) / 255)
    tensor = torch.from_numpy(frames)
    torch.testing.assert_close(unit_range_frames([tensor])[0], tensor.float() / 255, rtol=0, atol=0)
    for bad in (frames.astype(np.float32), torch.full((1, 2, 3, 8, 8), -0.5)):
        with pytest.raises(ValueError, match=r"`video` as floats must lie in \[0, 1\]"):
            unit_range_frames(bad)
    with pytest.raises(ValueError, match="uint8 or float"):
        unit_range_frames(np.zeros((2, 8, 8, 3), dtype=np.int32))


# -- encode_prompt, list inputs, argument checks (issue 14) ---------------------------------------------------------


@torch.no_grad()
def test_encode_prompt_needs_only_the_text_encoder_and_matches_a_direct_encoding():
    text_encoder, tokenizer = tu.tiny_t5(32)
    pipe = CascadeVSRPipeline(
        upsampler=None, transformer=None, scheduler=None, text_encoder=text_encoder, tokenizer=tokenizer
    )

    def direct(texts):
        tokens = tokenizer(texts, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
        embeds = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        return embeds, tokens.attention_mask

    embeds, mask, negative, negative_mask = pipe.encode_prompt(
        ["a cat", "two dogs running"], negative_prompt="blurry", num_videos_per_prompt=2, max_sequence_length=12
    )
    expected, expected_mask = direct(["a cat", "a cat", "two dogs running", "two dogs running"])
    torch.testing.assert_close(embeds, expected)
    assert torch.equal(mask, expected_mask) and embeds.shape == (4, 12, 32)
    expected, expected_mask = direct(["blurry"] * 4)
    torch.testing.assert_close(negative, expected)
    assert torch.equal(negative_mask, expected_mask)
    assert mask[0].sum() == len("a cat") + 1  # ByT5: one token per byte and </s>; the rest is padding

    # no guidance, or no negative prompt: no negative (the pipeline uses the learned null embedding)
    assert pipe.encode_prompt("a cat", negative_prompt="x", do_classifier_free_guidance=False)[2:] == (None, None)
    assert pipe.encode_prompt("a cat", max_sequence_length=12)[2:] == (None, None)
    # given embeddings pass through (all-ones mask), repeated per video, in the requested dtype
    given = torch.randn(1, 3, 32)
    embeds, mask, *_ = pipe.encode_prompt(None, prompt_embeds=given, num_videos_per_prompt=3, dtype=torch.float64)
    assert embeds.dtype == torch.float64 and torch.equal(embeds, given.double().expand(3, -1, -1))
    assert torch.equal(mask, torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="negative_prompt"):
        pipe.encode_prompt(["a", "b"], negative_prompt=["x", "y", "z"])
    with pytest.raises(ValueError, match="text_encoder"):
        CascadeVSRPipeline(upsampler=None, transformer=None, scheduler=None).encode_prompt("a cat")


def test_prompt_through_the_call_equals_its_encode_prompt_embeddings(wan):
    _, pipe, lr = wan
    embeds, mask, negative, negative_mask = pipe.encode_prompt(
        "a cat", negative_prompt="a dog", max_sequence_length=16
    )
    kwargs = dict(guidance_scale=2.0, num_inference_steps=1)
    by_text = _run(pipe, lr, prompt="a cat", negative_prompt="a dog", max_sequence_length=16, **kwargs)
    by_embeds = _run(
        pipe,
        lr,
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        negative_prompt_embeds=negative,
        negative_prompt_attention_mask=negative_mask,
        **kwargs,
    )
    torch.testing.assert_close(by_text, by_embeds, rtol=1e-5, atol=1e-6)  # the same up to float rounding


@pytest.mark.parametrize("with_batch_dim", [False, True])
def test_lr_latents_as_a_list_of_videos_equals_the_stacked_batch(wan, with_batch_dim):
    _, pipe, lr = wan
    other = torch.randn(lr.shape, generator=_gen(7))
    videos = [lr, other] if with_batch_dim else [lr[0], other[0]]
    kwargs = dict(num_inference_steps=2, prompt_embeds=torch.randn(2, 4, 32, generator=_gen(2)))
    stacked = _run(pipe, lr, **{**kwargs, "lr_latents": torch.cat([lr, other]), "generator": [_gen(0), _gen(1)]})
    listed = _run(pipe, lr, **{**kwargs, "lr_latents": videos, "generator": [_gen(0), _gen(1)]})
    assert stacked.shape[0] == 2 and torch.equal(listed, stacked)


def test_negative_stride_numpy_video_runs_like_its_copy(wan):
    _, pipe, _ = wan
    frames = np.random.default_rng(0).random((5, 16, 32, 3), dtype=np.float32)  # (T, H, W, C) in [0, 1]
    flipped = np.flip(frames, axis=2)
    assert any(stride < 0 for stride in flipped.strides)
    kwargs = dict(scale=1.5, num_inference_steps=1, output_type="latent")
    out = pipe(video=flipped, generator=_gen(), **kwargs).frames
    assert torch.equal(out, pipe(video=flipped.copy(), generator=_gen(), **kwargs).frames)


def test_bad_numbers_strings_lists_and_non_finite_inputs_raise_before_compute(wan, monkeypatch):
    _, pipe, lr = wan

    def no_compute(*args, **kwargs):
        raise AssertionError("heavy compute ran before the input check")

    monkeypatch.setattr(pipe.upsampler, "forward", no_compute)
    monkeypatch.setattr(pipe.transformer, "forward", no_compute)
    monkeypatch.setattr(pipe.text_encoder, "forward", no_compute)
    nan_latents = torch.zeros(1, 16, 2, 3, 6)
    nan_latents[0, 0, 0, 0, 0] = float("inf")
    for kwargs, match in [
        (dict(latents=nan_latents), "`latents` must be finite"),
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(guidance_scale=float("inf")), "guidance_scale"),
        (dict(guidance_scale="2"), "guidance_scale"),
        (dict(noise_aug_strength=float("nan")), "noise_aug_strength"),
        (dict(noise_aug_strength="0.5"), "noise_aug_strength"),
        (dict(noise_frame_correlation="0"), "noise_frame_correlation"),
        (dict(num_inference_steps="2"), "num_inference_steps"),
        (dict(num_videos_per_prompt="2"), "num_videos_per_prompt"),
        (dict(self_ensemble="2"), "self_ensemble"),
        (dict(max_sequence_length="16", prompt="a cat"), "max_sequence_length"),
        (dict(sigmas=["1.0", "0.5"]), "sigmas"),
        (dict(sigmas=[1.0, float("nan")]), "sigmas"),
        (dict(decode_chunk_size=True), "decode_chunk_size"),
        (dict(attention_kwargs={"scale": float("nan")}), "attention_kwargs"),
        (dict(attention_kwargs={"heads": 2}), "attention_kwargs"),
        (dict(generator=[_gen(), _gen(), _gen()]), "list of generators of length 3.*batch size is 1"),
        (dict(generator=[_gen()], num_videos_per_prompt=2), "list of generators of length 1.*batch size is 2"),
        (dict(lr_latents=[lr[0], lr[0, :, :1]]), "one shape"),
        (dict(lr_latents=[lr[0, 0]]), r"lr_latents\[0\]"),
        (dict(lr_latents=[]), "non-empty list"),
        (dict(prompt="a", negative_prompt=["x", "y"]), "negative_prompt"),
    ]:
        with pytest.raises(ValueError, match=match):
            _run(pipe, lr, **kwargs)
