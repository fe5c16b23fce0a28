"""Pair dataset, crops, buckets, samplers, configs and bad inputs of the trainer (fast tests)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from cascade_vsr.training.config import load_config
from cascade_vsr.training.data import PairLatentDataset, collate_pairs, map_crop
from cascade_vsr.training.samplers import (
    BucketBatchSampler,
    DetailAwareTimestepSampler,
    LogitNormalTimestepSampler,
    UniformTimestepSampler,
    make_timestep_sampler,
)

from ._pairs import LATENT_CHANNELS, build_pairs, write_dataset_json


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return build_pairs(tmp_path_factory.mktemp("pairs"), num_clips=3, num_frames=3, hr_size=(32, 64), text_dim=16)


def write_clip(root, clip_id, lr_shape, hr_shape, fill=None):
    """One synthetic clip (latents only) appended to ROOT/manifest.jsonl (ROOT gets a dataset.json)."""
    if not (root / "dataset.json").is_file():
        write_dataset_json(root)
    folder = root / "clips" / clip_id
    folder.mkdir(parents=True, exist_ok=True)
    lr = torch.randn(lr_shape) if fill is None else fill(lr_shape)
    hr = torch.randn(hr_shape) if fill is None else fill(hr_shape)
    save_file({"lr_latents": lr, "hr_latents": hr}, str(folder / "latents.safetensors"))
    entry = {"id": clip_id, "latents": f"clips/{clip_id}/latents.safetensors", "latent_space": None}
    with (root / "manifest.jsonl").open("a") as manifest:
        manifest.write(json.dumps(entry) + "\n")
    return lr, hr


def test_dataset_reads_real_pairs_with_text(pairs):
    dataset = PairLatentDataset(pairs, latent_channels=LATENT_CHANNELS)
    assert len(dataset) == 3 and dataset.has_text
    sample = dataset[0]
    assert sample["lr_latents"].shape == (LATENT_CHANNELS, 3, 4, 8)
    assert sample["hr_latents"].shape == (LATENT_CHANNELS, 3, 8, 16)
    batch = collate_pairs([dataset[0], dataset[2]])
    # prompts of lengths 3 and 5 padded to 5 with a mask
    assert batch["prompt_embeds"].shape == (2, 5, 16)
    assert batch["prompt_attention_mask"].sum(1).tolist() == [3, 5]
    assert batch["has_text"].all()


def test_crops_are_aligned_for_integer_ratio(tmp_path):
    # HR = exact 2x nearest upsampling of LR: an aligned crop of HR is the 2x upsampling of the LR crop.
    lr = torch.arange(2 * 3 * 6 * 10, dtype=torch.float32).reshape(2, 3, 6, 10)
    hr = lr.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    (tmp_path / "clips" / "a").mkdir(parents=True)
    save_file({"lr_latents": lr, "hr_latents": hr}, str(tmp_path / "clips/a/latents.safetensors"))
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"id": "a", "latents": "clips/a/latents.safetensors"}))
    write_dataset_json(tmp_path)
    dataset = PairLatentDataset(tmp_path, crop_size=(3, 4), num_frames=2)
    for seed in range(6):
        sample = dataset[(0, seed)]
        assert sample["lr_latents"].shape == (2, 2, 3, 4) and sample["hr_latents"].shape == (2, 2, 6, 8)
        expected = sample["lr_latents"].repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        assert torch.equal(sample["hr_latents"], expected)


def test_map_crop_non_integer_ratio():
    # 64 -> 135 (ratio 2.109): sizes are rounded, starts rounded and clamped inside the HR extent
    assert map_crop(0, 32, 64, 135) == (0, 68)
    assert map_crop(32, 32, 64, 135) == (67, 68)
    assert map_crop(63, 1, 64, 135) == (133, 2)


def test_buckets_and_batch_sampler(tmp_path):
    for k in range(3):
        write_clip(tmp_path, f"s{k}", (4, 2, 4, 4), (4, 2, 8, 8))
    for k in range(2):
        write_clip(tmp_path, f"b{k}", (4, 2, 6, 6), (4, 2, 12, 12))
    dataset = PairLatentDataset(tmp_path)
    buckets = dataset.buckets()
    assert buckets == [[0, 1, 2], [3, 4]]
    sampler = BucketBatchSampler(buckets, batch_size=2, drop_last=True, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2
    for batch in batches:
        shapes = {dataset[key]["lr_latents"].shape for key in batch}
        assert len(shapes) == 1
    # deterministic per epoch, resumable at any position
    assert list(sampler) == batches
    sampler.set_position(0, 1)
    assert list(sampler) == batches[1:]
    # two ranks split the batches without overlap
    ranks = [BucketBatchSampler(buckets, 1, seed=1, num_replicas=2, rank=r).epoch_batches(0) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    assert not {k[0] for b in ranks[0] for k in b} & {k[0] for b in ranks[1] for k in b}


def test_several_datasets_pool_their_clips_in_order(tmp_path):
    # the same video at two HR sizes, as two make-pairs runs write it: the clips of both, in the order the
    # datasets are given, each read from its own folder; crops of both sizes share one bucket
    small = build_pairs(tmp_path / "small", num_clips=2, num_frames=3, hr_size=(32, 64))
    large = build_pairs(tmp_path / "large", num_clips=3, num_frames=3, hr_size=(64, 96), first_frame=5)
    alone = [PairLatentDataset(root) for root in (small, large)]
    pooled = PairLatentDataset([small, str(large)], crop_size=(4, 4), num_frames=2)
    assert len(pooled) == 5
    assert [clip.latents_path for clip in pooled.clips] == [c.latents_path for d in alone for c in d.clips]
    assert pooled.clips[2].latents_path.is_relative_to(large)
    # both datasets name their clips bbb-000, ...: pooled, a clip's id names its folder too
    assert [clip.id for clip in pooled.clips[1:3]] == [f"{small}/bbb-001", f"{large}/bbb-000"]
    assert alone[0].clips[0].id == "bbb-000"
    assert pooled.buckets() == [[0, 1, 2, 3, 4]]
    whole = PairLatentDataset([small, large])
    for index, reference in enumerate([alone[0][0], alone[0][1], alone[1][0], alone[1][1], alone[1][2]]):
        assert torch.equal(whole[index]["hr_latents"], reference["hr_latents"])
        assert torch.equal(whole[index]["lr_latents"], reference["lr_latents"])
    assert whole.buckets() == [[0, 1], [2, 3, 4]]  # whole frames of two sizes: two buckets


def test_several_datasets_are_named_in_config_files_and_on_the_command_line(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("data_dir: [a, b]\n")
    assert load_config(config)[1].data_dir == ["a", "b"]
    config.write_text("data_dir: a\n")  # one dataset without a list
    assert load_config(config)[1].data_dir == ["a"]
    assert load_config(config, ["--data_dir", "c", "d"])[1].data_dir == ["c", "d"]
    assert load_config(None, ["--data_dir", "c"])[1].data_dir == ["c"]


def test_bad_dataset_lists(tmp_path):
    root = build_pairs(tmp_path / "pairs", num_clips=1, num_frames=2, hr_size=(32, 64))
    with pytest.raises(ValueError, match="`data_dir` must name at least one pair dataset, got an empty list"):
        PairLatentDataset([])
    with pytest.raises(ValueError, match="`data_dir` lists the same dataset more than once: .*pairs"):
        PairLatentDataset([root, tmp_path / "pairs" / ".." / "pairs"])
    with pytest.raises(ValueError, match="`data_dir` .*missing.* does not exist"):
        PairLatentDataset([root, tmp_path / "missing"])
    config = tmp_path / "config.yaml"
    config.write_text("data_dir: []\n")
    with pytest.raises(ValueError, match="`data_dir` must name one or more pair datasets"):
        load_config(config)


def test_timestep_samplers_range_and_determinism():
    for sampler in (UniformTimestepSampler(), LogitNormalTimestepSampler(), DetailAwareTimestepSampler.default()):
        a = sampler.sample(1000, torch.Generator().manual_seed(0))
        b = sampler.sample(1000, torch.Generator().manual_seed(0))
        assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    default = DetailAwareTimestepSampler.default()
    # documented shape: high and mid noise weighted over low noise
    assert default.cdf_at(torch.tensor(0.3)) < 0.15 < 0.5 < default.cdf_at(torch.tensor(0.7))


def test_detail_aware_sampler_follows_its_density():
    sampler = DetailAwareTimestepSampler([0.0, 0.1, 0.5, 0.55, 1.0], [0.0, 3.0, 10.0, 0.5])
    samples = sampler.sample(20000, torch.Generator().manual_seed(0)).double()
    # Kolmogorov-Smirnov distance to the exact CDF; 1.63 / sqrt(n) is the 1% critical value
    ordered = samples.sort().values
    n = len(ordered)
    cdf = sampler.cdf_at(ordered)
    ks = torch.maximum(torch.arange(1, n + 1) / n - cdf, cdf - torch.arange(n) / n).max()
    assert ks < 1.63 / n**0.5
    assert (samples < 0.1).sum() == 0  # a zero-weight bin is never sampled


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["--attention_mode", "bogus"], "attention_mode"),
        (["--noise_aug_min", "-0.1"], "noise_aug_min"),
        (["--noise_aug_max", "1.5"], "noise_aug_max"),
        (["--timestep_sampler", "cosine"], "timestep_sampler"),
        (["--text_dropout", "2"], "text_dropout"),
        (["--learning_rate", "nan"], "`learning_rate` must be finite"),
        (["--max_grad_norm", "inf"], "`max_grad_norm` must be finite"),
        (["--seed", "-1"], "`seed`"),
        (["--crop_size", "4"], "`crop_size` must be two positive ints"),
        (["--crop_size", "0", "4"], "`crop_size`"),
        (["--num_latent_frames", "0"], "`num_latent_frames`"),
        (["--num_layers", "0"], "`num_layers`"),
        (["--patch_size", "1", "0", "2"], "`patch_size`"),
        (["--dataloader_num_workers", "-1"], "`dataloader_num_workers`"),
        (["--checkpoints_total_limit", "0"], "`checkpoints_total_limit`"),
        (["--adam_beta2", "1.0"], "`adam_beta1` and `adam_beta2`"),
        (["--lr_scheduler", "step"], "`lr_scheduler`"),
        (["--logging_steps", "0"], "`logging_steps`"),
        (["--output_dir", "/proc/x"], "`output_dir` '/proc/x': cannot create"),
    ],
)
def test_bad_config_values(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, ["--data_dir", str(tmp_path), *overrides])


def test_config_files_parse(tmp_path):
    from pathlib import Path

    for name in ("stage1", "stage2"):
        model, data, train = load_config(Path("configs") / f"{name}.yaml")
        assert data.num_latent_frames == 5 and train.learning_rate == 5e-5
        assert (train.noise_aug_min, train.noise_aug_max, train.text_dropout) == (0.3, 0.6, 0.1)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"data_dir": "x", "num_layers": 3, "unknown_key": 1}))
    with pytest.raises(ValueError, match="unknown_key"):
        load_config(config)


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "is empty"),
        ("# only a comment\n", "is empty"),
        ("- data_dir: x\n", "must be a mapping of field: value, got a list"),
        ("data_dir: x\ncrop_size: 4\n", "`crop_size` must be a list of int, got 4"),
        ("data_dir: x\nlearning_rate: fast\n", "`learning_rate` must be a number, got the string 'fast'"),
        ("data_dir: x\nmax_train_steps: '10.5'\n", "`max_train_steps` must be an integer, got the string '10.5'"),
        ("data_dir: x\nuse_ema: 'no'\n", "`use_ema` must be true or false"),
        ("data_dir: x\nmixed_precision: fp8\n", "`mixed_precision` must be one of"),
        ("data_dir: x\nlearning_rate: .nan\n", "`learning_rate` must be finite"),
        ("data_dir: [x\n", "cannot be parsed"),
    ],
)
def test_bad_config_files(tmp_path, text, match):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config(config)


def test_numbers_written_as_strings_are_read_as_numbers(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("data_dir: x\nlearning_rate: 1e-3\nmax_train_steps: '10'\ncrop_size: ['4', 6]\n")
    _, data, train = load_config(config)
    assert (train.learning_rate, train.max_train_steps, data.crop_size) == (1e-3, 10, [4, 6])


def test_bad_datasets(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        PairLatentDataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="no manifest"):
        PairLatentDataset(tmp_path)
    (tmp_path / "manifest.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="`data_dir`.*no dataset.json"):
        PairLatentDataset(tmp_path)
    write_dataset_json(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        PairLatentDataset(tmp_path)


@pytest.mark.parametrize(
    "lr_shape, hr_shape, match",
    [((4, 3, 4, 4), (4, 2, 8, 8), "same channels and frames"), ((4, 2, 4, 4), (8, 2, 8, 8), "same channels")],
)
def test_mismatched_latents(tmp_path, lr_shape, hr_shape, match):
    write_clip(tmp_path, "bad", lr_shape, hr_shape)
    with pytest.raises(ValueError, match=match):
        PairLatentDataset(tmp_path)


def test_model_channels_and_batch_larger_than_dataset(tmp_path):
    write_clip(tmp_path, "a", (4, 2, 4, 4), (4, 2, 8, 8))
    write_clip(tmp_path, "b", (4, 2, 4, 4), (4, 2, 8, 8))
    with pytest.raises(ValueError, match="latent_channels"):
        PairLatentDataset(tmp_path, latent_channels=16)
    dataset = PairLatentDataset(tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler(dataset.buckets(), batch_size=3, drop_last=True)
    assert len(BucketBatchSampler(dataset.buckets(), batch_size=3, drop_last=False)) == 1


def test_make_timestep_sampler_names():
    assert isinstance(make_timestep_sampler("uniform"), UniformTimestepSampler)
    with pytest.raises(ValueError, match="timestep_sampler"):
        make_timestep_sampler("nope")
