"""One-step training: progressive distillation and adversarial post-training (SeedVR2) with the trainer."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cascade_vsr import CascadeVSRPipeline, SpaceToDepthAutoencoder
from cascade_vsr.core.flow import frame_correlated_noise
from cascade_vsr.models.discriminator import CascadeVSRDiscriminator
from cascade_vsr.pipelines.self_ensemble import dihedral_transform
from cascade_vsr.training.config import load_config
from cascade_vsr.training.data import PairLatentDataset, collate_pairs
from cascade_vsr.training.distill import distill, distillation_rounds
from cascade_vsr.training.objectives import (
    discriminator_step_loss,
    draw_inputs,
    generator_step_loss,
    teacher_target,
)
from cascade_vsr.training.trainer import (
    CascadeVSRTrainModule,
    OneStepGenerator,
    build_models,
    teacher_sigmas,
    train,
)

from ._recipes import tiny_args
from .test_training_run import SMALL, read_log

ROOT = Path(__file__).resolve().parents[1]
PIXEL_SPACE = ["--latent_space", "space_to_depth", "--patch_size", "1", "1", "1"]
ONE_STEP = [*SMALL, *PIXEL_SPACE, "--noise_aug_min", "0.05", "--noise_aug_max", "0.05", "--use_ema", "false"]
ONE_STEP += ["--sampling_noise_frame_correlation", "1.0", "--learning_rate", "1e-3"]


@pytest.fixture(scope="module")
def teacher(pairs, tmp_path_factory):
    """A briefly trained pixel-space stage (a teacher whose output layers are no longer zero)."""
    output = tmp_path_factory.mktemp("teacher")
    args = tiny_args(pairs, output, 8, *SMALL, *PIXEL_SPACE, "--learning_rate", "3e-3", "--use_ema", "false")
    return train(*load_config(None, args))["export_dir"]


def one_step_args(pairs, output, steps, pretrained, *extra):
    return tiny_args(pairs, output, steps, *ONE_STEP, "--pretrained_model_name_or_path", str(pretrained), *extra)


def fixed_batch(pairs, config, correlation=1.0):
    dataset = PairLatentDataset(pairs, crop_size=(2, 4), num_frames=1)
    batch = collate_pairs([dataset[(0, 0)], dataset[(1, 0)]])
    generator = torch.Generator().manual_seed(123)
    inputs, _ = draw_inputs(batch, generator, config, torch.device("cpu"), noise_correlation=correlation)
    return inputs


@torch.no_grad()
def euler(model: CascadeVSRTrainModule, inputs, sigmas: torch.Tensor) -> torch.Tensor:
    """Plain Euler sampling over `sigmas` from the inputs' noise (the pipeline's sampler, written out)."""
    condition = model.condition(inputs.lr, tuple(inputs.hr.shape[-2:]), inputs.aug_noise, inputs.aug_level)
    text, mask = model.text(inputs.hr.shape[0], *inputs.text)
    latents = inputs.noise * sigmas[0]
    for start, end in zip(sigmas[:-1], sigmas[1:]):
        sigma = torch.full((latents.shape[0],), float(start))
        latents = latents + (end - start) * model.velocity(latents, condition, sigma, inputs.aug_level, text, mask)
    return latents


def stage(path) -> CascadeVSRTrainModule:
    model_config, _, _ = load_config(None, ["--data_dir", "x", "--pretrained_model_name_or_path", str(path)])
    return CascadeVSRTrainModule(*build_models(model_config)).eval()


def test_teacher_sigmas_are_the_pipeline_schedule(teacher):
    sigmas = teacher_sigmas(teacher, 4)
    torch.testing.assert_close(sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert distillation_rounds(8) == [8, 4, 2]
    with pytest.raises(ValueError, match="power of two"):
        distillation_rounds(6)


def test_a_distillation_round_brings_one_step_closer_to_the_teachers_two(pairs, teacher, tmp_path):
    summary = train(
        *load_config(None, one_step_args(pairs, tmp_path / "round", 30, teacher, "--objective", "distill"))
    )
    _, _, config = load_config(None, one_step_args(pairs, tmp_path / "x", 1, teacher))
    inputs = fixed_batch(pairs, config)
    teacher_model, student = stage(teacher), stage(summary["export_dir"])
    target = euler(teacher_model, inputs, teacher_sigmas(teacher, 2))
    one_step = torch.tensor([1.0, 0.0])
    before = (euler(teacher_model, inputs, one_step) - target).square().mean()
    after = (euler(student, inputs, one_step) - target).square().mean()
    assert after < 0.6 * before, (before, after)
    # the export samples in half the teacher's steps
    assert CascadeVSRPipeline.from_pretrained(summary["export_dir"]).sampling_settings()["num_inference_steps"] == 1


def test_distill_command_runs_the_rounds(pairs, teacher, tmp_path):
    args = one_step_args(
        pairs, tmp_path / "distill", 2, teacher, "--distill_teacher_steps", "4", "--objective", "distill"
    )
    summary = distill(*load_config(None, args))
    assert [r["teacher_steps"] for r in summary["rounds"]] == [4, 2]
    index = json.loads((Path(summary["export_dir"]) / "model_index.json").read_text())
    assert index["sampling"]["num_inference_steps"] == 1
    second = json.loads((tmp_path / "distill/steps-2-to-1/config.json").read_text())
    assert second["pretrained_model_name_or_path"] == str(tmp_path / "distill/steps-4-to-2/export")
    # done rounds are skipped when the command runs again
    assert distill(*load_config(None, args))["rounds"] == []


def assert_same_run(a: Path, b: Path, files: tuple[str, ...]) -> None:
    log_a, log_b = read_log(a), read_log(b)
    assert [r["step"] for r in log_b] == [r["step"] for r in log_a]
    assert log_a == log_b
    for name in files:
        left, right = load_file(a / name), load_file(b / name)
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left), name


@pytest.mark.parametrize("objective", ["distill", "adversarial"])
def test_resume_is_bit_identical(pairs, teacher, tmp_path, objective):
    common = ["--objective", objective, "--checkpointing_steps", "2", "--use_ema", "true", "--ema_decay", "0.9"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(*load_config(None, one_step_args(pairs, straight, 4, teacher, *common)))
    train(*load_config(None, one_step_args(pairs, resumed, 2, teacher, *common)))
    train(*load_config(None, one_step_args(pairs, resumed, 4, teacher, *common, "--resume_from_checkpoint", "latest")))
    files = ["checkpoints/checkpoint-4/model.safetensors", "export/transformer/diffusion_pytorch_model.safetensors"]
    if objective == "adversarial":
        files += ["checkpoints/checkpoint-4/discriminator.safetensors"]
        assert {"d_loss", "d_r1", "d_r2", "g_gan", "g_l1", "g_feature_matching"} <= set(read_log(straight)[0])
    assert_same_run(straight, resumed, tuple(files))


KILLED_ADVERSARIAL_RUN = """
import os, signal, sys
from cascade_vsr.training import checkpoint
from cascade_vsr.training.config import load_config
from cascade_vsr.training.trainer import train

original = checkpoint.save_state_file
def save_then_die(path, state):
    original(path, state)
    if path.parent.name == ".tmp-checkpoint-4" and path.name == "discriminator_optimizer.safetensors":
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save_state_file = save_then_die
train(*load_config(None, sys.argv[1:]))
"""


def test_adversarial_run_killed_while_checkpointing_resumes_bit_identically(pairs, teacher, tmp_path):
    common = ["--objective", "adversarial", "--checkpointing_steps", "2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(*load_config(None, one_step_args(pairs, straight, 4, teacher, *common)))
    args = one_step_args(pairs, killed, 4, teacher, *common)
    # the same number of threads as this process: float reductions depend on it
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    script = textwrap.dedent(KILLED_ADVERSARIAL_RUN)
    result = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    train(*load_config(None, [*args, "--resume_from_checkpoint", "latest"]))
    assert_same_run(straight, killed, ("checkpoints/checkpoint-4/model.safetensors",))


def test_each_adversarial_step_updates_only_its_own_network(pairs, teacher):
    _, _, config = load_config(None, one_step_args(pairs, "unused", 1, teacher, "--objective", "adversarial"))
    upsampler, transformer = build_models(load_config(None, one_step_args(pairs, "unused", 1, teacher))[0])
    generator = OneStepGenerator(upsampler, transformer)
    discriminator = CascadeVSRDiscriminator.from_transformer(transformer)
    inputs = fixed_batch(pairs, config)

    loss, _ = discriminator_step_loss(discriminator, generator, inputs, config)
    loss.backward()
    assert all(p.grad is None for p in generator.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in discriminator.parameters())
    discriminator.zero_grad(set_to_none=True)

    discriminator.requires_grad_(False)
    loss, _ = generator_step_loss(generator, discriminator, inputs, config)
    loss.backward()
    assert all(p.grad is None for p in discriminator.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in generator.transformer.parameters())


def test_adversarial_export_is_a_one_step_stage_with_pixel_losses(pairs, teacher, tmp_path):
    extra = ["--objective", "adversarial", "--pixel_loss_weight", "1", "--temporal_smoothness_weight", "1"]
    extra += ["--pixel_crop_size", "2", "4", "--l1_weight", "0.1", "--feature_matching_weight", "0.1"]
    extra += ["--flow_temporal_weight", "1", "--num_latent_frames", "2"]
    summary = train(*load_config(None, one_step_args(pairs, tmp_path / "apt", 2, teacher, *extra)))
    record = read_log(tmp_path / "apt")[-1]
    assert all(torch.isfinite(torch.tensor(record[k])) for k in ("g_pixel", "g_temporal", "d_loss"))
    assert record["g_flow_temporal"] > 0
    assert (tmp_path / "apt/discriminator/config.json").is_file()

    pipe = CascadeVSRPipeline.from_pretrained(summary["export_dir"])
    assert pipe.sampling_settings()["num_inference_steps"] == 1
    calls = []
    pipe.transformer.register_forward_hook(lambda *args: calls.append(1))
    lr = torch.rand(1, 2, 3, 16, 32)
    frames = pipe(video=lr, scale=2, output_type="pt", self_ensemble=1).frames
    assert len(calls) == 1 and frames.shape[-2:] == (32, 64) and torch.isfinite(frames).all()


def test_one_step_objectives_need_a_trained_stage(pairs):
    with pytest.raises(ValueError, match="pretrained_model_name_or_path"):
        load_config(None, tiny_args(pairs, "out", 1, "--objective", "adversarial"))
    with pytest.raises(ValueError, match="`distill_teacher_steps` must be an even number"):
        load_config(None, tiny_args(pairs, "out", 1, "--distill_teacher_steps", "3"))


def test_frame_correlated_training_noise_matches_the_sampler(pairs, teacher):
    _, _, config = load_config(None, one_step_args(pairs, "unused", 1, teacher))
    inputs = fixed_batch(pairs, config, correlation=1.0)
    assert torch.equal(inputs.noise, inputs.noise[:, :, :1].expand_as(inputs.noise))  # one noise image per clip
    # after the condition level, drawn exactly as the pipeline's sampler draws its initial noise
    generator, reference = torch.Generator().manual_seed(123), torch.Generator().manual_seed(123)
    torch.rand(inputs.hr.shape[0], generator=reference)  # the condition noise level comes first
    expected = frame_correlated_noise(tuple(inputs.hr.shape), 1.0, generator=reference)
    inputs_again, _ = draw_inputs(
        collate_pairs([PairLatentDataset(pairs, crop_size=(2, 4), num_frames=1)[(i, 0)] for i in (0, 1)]),
        generator,
        config,
        torch.device("cpu"),
        noise_correlation=1.0,
    )
    torch.testing.assert_close(inputs_again.noise, expected)


def _pixel_transform(latents: torch.Tensor, index: int, inverse: bool = False) -> torch.Tensor:
    """A flip / transpose of space_to_depth latents done on the pixels: decode, transform, encode."""
    vae = SpaceToDepthAutoencoder()
    return vae.encode(dihedral_transform(vae.decode(latents).sample, index, inverse)).latent_dist.mode()


def test_self_ensemble_target_is_the_mean_of_eight_explicit_teacher_runs(pairs, teacher):
    _, _, config = load_config(None, one_step_args(pairs, "unused", 1, teacher))
    inputs = fixed_batch(pairs, config)  # crops of 2 x 4 latents: the transposes change the shape
    model, sigmas = stage(teacher), teacher_sigmas(teacher, 2)
    noisy, start, end, target = teacher_target(model, inputs, sigmas, self_ensemble=8, latent_space="space_to_depth")
    assert torch.equal(start, torch.ones(2)) and torch.equal(end, torch.zeros(2))
    torch.testing.assert_close(noisy, inputs.noise)
    # the reference: 8 plain two-step teacher runs (written out), on pixel-transformed inputs, transformed back
    runs = []
    for index in range(8):
        transformed = dataclasses.replace(
            inputs,
            hr=_pixel_transform(inputs.hr, index),
            lr=_pixel_transform(inputs.lr, index),
            noise=_pixel_transform(inputs.noise, index),
            aug_noise=_pixel_transform(inputs.aug_noise, index),
        )
        runs.append(_pixel_transform(euler(model, transformed, sigmas), index, inverse=True))
    expected = torch.stack(runs).mean(0)
    torch.testing.assert_close(target, expected, rtol=1e-4, atol=1e-5)
    single = teacher_target(model, inputs, sigmas)[3]
    torch.testing.assert_close(single, runs[0], rtol=1e-4, atol=1e-5)
    assert (single - target).abs().max() > 1e-3  # the tiny teacher is not equivariant: the mean differs
    # the first N transforms
    four = teacher_target(model, inputs, sigmas, self_ensemble=4, latent_space="space_to_depth")[3]
    torch.testing.assert_close(four, torch.stack(runs[:4]).mean(0), rtol=1e-4, atol=1e-5)


def test_one_step_teacher_target_is_the_mean_of_its_one_step_runs(pairs, teacher, tmp_path):
    """`distill_teacher_steps: 1`: the target is the teacher's self-ensemble at the student's own single step
    (8 explicit one-step runs on pixel-transformed inputs, transformed back); the student samples in one step."""
    _, _, config = load_config(None, one_step_args(pairs, "unused", 1, teacher))
    inputs = fixed_batch(pairs, config)
    model, sigmas = stage(teacher), teacher_sigmas(teacher, 1)
    noisy, start, end, target = teacher_target(
        model, inputs, sigmas, self_ensemble=8, latent_space="space_to_depth", teacher_steps_per_student_step=1
    )
    assert torch.equal(start, torch.ones(2)) and torch.equal(end, torch.zeros(2))
    runs = []
    for index in range(8):
        transformed = dataclasses.replace(
            inputs,
            **{name: _pixel_transform(getattr(inputs, name), index) for name in ("hr", "lr", "noise", "aug_noise")},
        )
        runs.append(_pixel_transform(euler(model, transformed, sigmas), index, inverse=True))
    torch.testing.assert_close(target, torch.stack(runs).mean(0), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="`teacher_steps_per_student_step` must be 1 or 2"):
        teacher_target(model, inputs, sigmas, teacher_steps_per_student_step=2)

    extra = ["--objective", "distill", "--distill_teacher_steps", "1"]
    with pytest.raises(ValueError, match="or 1 with `distill_teacher_self_ensemble` > 1"):
        load_config(None, one_step_args(pairs, "unused", 1, teacher, *extra))
    args = one_step_args(pairs, tmp_path / "x8", 2, teacher, *extra, "--distill_teacher_self_ensemble", "8")
    summary = distill(*load_config(None, args))
    assert [r["teacher_steps"] for r in summary["rounds"]] == [1]
    assert (tmp_path / "x8/steps-1-to-1/export/model_index.json").is_file()
    index = json.loads((Path(summary["export_dir"]) / "model_index.json").read_text())
    assert index["sampling"]["num_inference_steps"] == 1


def test_a_block_causal_student_distils_from_the_bidirectional_teacher(pairs, teacher, tmp_path):
    """The student takes `causal_chunk_frames` and `ffn_activation`; the teacher keeps the pretrained stage's own
    attention in time and GELU (the function it was trained as)."""
    from cascade_vsr.training.trainer import load_teacher_transformer

    causal = ["--objective", "distill", "--causal_chunk_frames", "1", "--num_latent_frames", "2"]
    causal += ["--ffn_activation", "gelu"]
    model_config, data_config, train_config = load_config(
        None, one_step_args(pairs, tmp_path / "c", 1, teacher, *causal)
    )
    teacher_config = load_teacher_transformer(model_config).config
    assert teacher_config.causal_chunk_frames is None and teacher_config.ffn_activation == "gelu-approximate"
    summary = distill(model_config, data_config, train_config)
    exported = CascadeVSRPipeline.from_pretrained(summary["export_dir"]).transformer
    assert (exported.config.causal_chunk_frames, exported.config.causal_cache_chunks) == (1, 1)
    assert exported.config.ffn_activation == "gelu" and exported.blocks[0].ffn.net[0].approximate == "none"


def test_dihedral_augmentation_flips_and_transposes_the_pairs(pairs, teacher):
    _, _, plain = load_config(None, one_step_args(pairs, "unused", 1, teacher))
    _, _, config = load_config(None, one_step_args(pairs, "unused", 1, teacher, "--dihedral_augmentation", "true"))
    dataset = PairLatentDataset(pairs, crop_size=(2, 4), num_frames=1)
    batch = collate_pairs([dataset[(i, 0)] for i in range(4)])
    seen = set()
    for seed in range(12):
        inputs, _ = draw_inputs(batch, torch.Generator().manual_seed(seed), config, torch.device("cpu"), None, 1.0,
                                latent_space="space_to_depth")  # fmt: skip
        # the reference: the transforms drawn first (a transpose for the batch, then a flip per sample), done on
        # the pixels; then the draws of an unaugmented batch
        reference = torch.Generator().manual_seed(seed)
        transpose = int(torch.randint(2, (1,), generator=reference))
        indices = [flip + 4 * transpose for flip in torch.randint(4, (4,), generator=reference).tolist()]
        for name, key in (("hr", "hr_latents"), ("lr", "lr_latents")):
            expected = torch.cat([_pixel_transform(batch[key][b : b + 1], i) for b, i in enumerate(indices)])
            assert torch.equal(getattr(inputs, name), expected), (seed, name)
        rest, _ = draw_inputs(
            {**batch, "hr_latents": inputs.hr, "lr_latents": inputs.lr},
            reference,
            plain,
            torch.device("cpu"),
            None,
            1.0,
        )
        assert torch.equal(rest.noise, inputs.noise) and torch.equal(rest.aug_noise, inputs.aug_noise)
        seen.update(indices)
    assert seen == set(range(8))
    unaugmented, _ = draw_inputs(batch, torch.Generator().manual_seed(0), plain, torch.device("cpu"))
    assert torch.equal(unaugmented.hr, batch["hr_latents"])  # off by default, and then nothing is drawn for it


def test_dihedral_options_are_checked(pairs, teacher):
    def config(*extra):
        return load_config(None, one_step_args(pairs, "unused", 1, teacher, "--objective", "distill", *extra))

    with pytest.raises(ValueError, match="`distill_teacher_self_ensemble` must be in 1..8"):
        config("--distill_teacher_self_ensemble", "9")
    with pytest.raises(ValueError, match="`distill_teacher_self_ensemble` 2 is for `objective` distill"):
        config("--distill_teacher_self_ensemble", "2", "--objective", "diffusion")
    for option in (["--distill_teacher_self_ensemble", "8"], ["--dihedral_augmentation", "true"]):
        with pytest.raises(ValueError, match=f"`{option[0][2:]}` flips.*`latent_space` must be 'space_to_depth'"):
            config(*option, "--latent_space", "wan")


def test_distillation_with_both_options_trains(pairs, teacher, tmp_path):
    extra = ["--objective", "distill", "--distill_teacher_self_ensemble", "8", "--dihedral_augmentation", "true"]
    summary = train(*load_config(None, one_step_args(pairs, tmp_path / "x8", 2, teacher, *extra)))
    assert summary["steps"] == 2 and all(torch.isfinite(torch.tensor(summary["losses"])))
    assert json.loads((tmp_path / "x8/config.json").read_text())["distill_teacher_self_ensemble"] == 8


@torch.no_grad()
def test_distillation_loss_adds_the_temporal_term_of_its_error(pairs, teacher):
    """`temporal_loss_weight` in distillation: mean of e^2 + w (e_f - e_{f-1})^2 over the student's error e against
    the teacher's latents, by hand; w = 0 is the plain MSE."""
    from cascade_vsr.training.trainer import DistillationTrainModule

    generator = torch.Generator().manual_seed(0)
    model_config, _, _ = load_config(None, ["--data_dir", "x", "--pretrained_model_name_or_path", str(teacher)])
    upsampler, transformer = build_models(model_config)
    noisy, target = (torch.randn(2, 48, 3, 4, 8, generator=generator) for _ in range(2))
    lr = torch.randn(2, 48, 3, 2, 4, generator=generator)
    sigma_from, sigma_to = torch.tensor([1.0, 0.8]), torch.tensor([0.5, 0.0])
    aug_noise, aug_level, drop = torch.zeros(2, 48, 3, 4, 8), torch.zeros(2), torch.zeros(2, dtype=torch.bool)
    losses = {}
    for weight in (0.0, 2.0):
        module = DistillationTrainModule(upsampler, transformer, weight).eval()
        losses[weight] = module(noisy, lr, sigma_from, sigma_to, target, aug_noise, aug_level, drop)
    condition = module.condition(lr, (4, 8), aug_noise, aug_level)
    text, mask = module.text(2, drop, None, None)
    velocity = module.velocity(noisy, condition, sigma_from, aug_level, text, mask)
    error = noisy + (sigma_to - sigma_from).reshape(-1, 1, 1, 1, 1) * velocity - target
    change = torch.cat([torch.zeros_like(error[:, :, :1]), error[:, :, 1:] - error[:, :, :-1]], dim=2)
    torch.testing.assert_close(losses[0.0], error.square().mean())
    torch.testing.assert_close(losses[2.0], (error.square() + 2.0 * change.square()).mean())


@torch.no_grad()
def test_ground_truth_weight_blends_the_distillation_target_towards_the_hr_latents(pairs, teacher):
    """`distill_ground_truth_weight` w: the target is (1 - w) x the teacher's one-step ensemble + w x the HR
    latents; 0 is the teacher's target exactly, 1 the ground truth (without running the teacher). Only a one-step
    student takes it."""
    from cascade_vsr.training.objectives import distillation_target

    model, sigmas = stage(teacher), teacher_sigmas(teacher, 1)
    extra = ["--objective", "distill", "--distill_teacher_steps", "1", "--distill_teacher_self_ensemble", "2"]
    targets, starts = {}, {}
    for weight in (0.0, 0.25, 1.0):
        args = one_step_args(pairs, "unused", 1, teacher, *extra, "--distill_ground_truth_weight", str(weight))
        _, _, config = load_config(None, args)
        inputs = fixed_batch(pairs, config)
        network = None if weight == 1 else model  # at w = 1 the teacher must not run
        *starts[weight], targets[weight] = distillation_target(network, inputs, sigmas, config, "space_to_depth")
    for noisy, start, end in (starts[0.25], starts[1.0]):  # the same student start, whether the teacher runs or not
        assert torch.equal(noisy, starts[0.0][0]) and torch.equal(start, starts[0.0][1])
        assert torch.equal(end, starts[0.0][2])
    teacher_only = teacher_target(model, inputs, sigmas, self_ensemble=2, latent_space="space_to_depth",
                                  teacher_steps_per_student_step=1)[3]  # fmt: skip
    assert torch.equal(targets[0.0], teacher_only)
    assert torch.equal(targets[1.0], inputs.hr)
    torch.testing.assert_close(targets[0.25], 0.75 * teacher_only + 0.25 * inputs.hr)
    assert (targets[0.25] - teacher_only).abs().max() > 1e-3

    for bad, message in (
        (["--distill_ground_truth_weight", "1.5"], r"`distill_ground_truth_weight` must lie in \[0, 1\], got 1.5"),
        (["--distill_ground_truth_weight", "0.5", "--objective", "distill", "--distill_teacher_steps", "4"],
         "needs `objective` distill and `distill_teacher_steps` 1 or 2, got 'distill' and 4"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            load_config(None, one_step_args(pairs, "unused", 1, teacher, *bad))


def test_flow_temporal_weight_adds_the_relative_warping_error_of_the_decoded_prediction(pairs, teacher, tmp_path):
    """`flow_temporal_weight` w in distillation: the first step's loss is the plain one plus w times the flow term
    of the student's decoded prediction (same weights, same draws); refused for a student of several steps."""
    extra = ["--objective", "distill", "--distill_teacher_steps", "1", "--distill_teacher_self_ensemble", "2"]
    extra += ["--distill_ground_truth_weight", "1", "--num_latent_frames", "2"]
    first = {}
    for weight in (0.0, 5.0):
        output = tmp_path / f"w{weight}"
        args = one_step_args(pairs, output, 1, teacher, *extra, "--flow_temporal_weight", str(weight))
        train(*load_config(None, args))
        first[weight] = read_log(output)[0]
    flow = first[5.0]["flow_temporal"]
    assert flow > 0 and "flow_temporal" not in first[0.0]
    assert first[5.0]["loss"] == pytest.approx(first[0.0]["loss"] + 5.0 * flow, rel=1e-5)

    bad = ["--objective", "distill", "--distill_teacher_steps", "4", "--flow_temporal_weight", "1"]
    with pytest.raises(ValueError, match="`flow_temporal_weight` judges the decoded clean prediction"):
        load_config(None, one_step_args(pairs, "unused", 1, teacher, *bad))
    with pytest.raises(ValueError, match="`flow_temporal_weight` must be >= 0, got -1.0"):
        load_config(None, one_step_args(pairs, "unused", 1, teacher, "--flow_temporal_weight", "-1"))
