"""The training pairs of a dataset written by `cascade-vsr make-pairs` (format: `cascade_vsr.pair_dataset`).

The clips are the records of the manifest, read and checked by `cascade_vsr.pair_dataset.read_pair_dataset`.
The trainer reads the latents (`clips/<id>/latents.safetensors`), never the videos.

Crops are taken in LR latent coordinates and mapped to HR by the clip's ratio, measured on the latent shapes
(HR latent size / LR latent size, which is hr_size / lr_size for a VAE of fixed compression). For non-integer
ratios the HR box is the mapped box rounded to the latent grid: size round(crop * ratio), start
round(start * ratio) clamped inside the latent, so both boxes cover the same region up to half an HR latent
pixel, and every crop of a clip has the same HR size (needed for same-shape batches).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from cascade_vsr.pair_dataset import clip_file, open_latents, read_pair_dataset


@dataclass(frozen=True)
class PairClip:
    """What the dataset needs to know about one clip, read from the manifest and the safetensors header."""

    id: str
    latents_path: Path
    lr_shape: tuple[int, int, int, int]  # (C, T, h, w)
    hr_shape: tuple[int, int, int, int]  # (C, T, H, W)
    text_shape: tuple[int, int] | None  # (L, D) of prompt_embeds, when present


def _read_clip(root: Path, entry: dict, prefix: str = "") -> PairClip:
    clip_id = prefix + entry["id"]
    if not entry.get("latents"):
        raise ValueError(
            f'clip {clip_id!r} of `data_dir` has no latents ("latents": null): build the dataset with latents '
            "(make-pairs with an upstream VAE) to train on it"
        )
    path = clip_file(root, entry, "latents")
    if not path.is_file():
        raise ValueError(f"clip {clip_id!r}: latents file {str(path)!r} is missing")
    with open_latents(path, clip_id) as tensors:
        names = set(tensors.keys())
        for name in ("hr_latents", "lr_latents"):
            if name not in names:
                raise ValueError(f"clip {clip_id!r}: {str(path)!r} has no tensor {name!r}")
        hr_shape = tuple(tensors.get_slice("hr_latents").get_shape())
        lr_shape = tuple(tensors.get_slice("lr_latents").get_shape())
        text_shape = tuple(tensors.get_slice("prompt_embeds").get_shape()) if "prompt_embeds" in names else None
    if len(hr_shape) != 4 or len(lr_shape) != 4:
        raise ValueError(
            f"clip {clip_id!r}: hr_latents and lr_latents must be (C, T, H, W), got {hr_shape} and {lr_shape}"
        )
    if hr_shape[:2] != lr_shape[:2]:
        raise ValueError(
            f"clip {clip_id!r}: LR and HR latents must have the same channels and frames (C, T), got "
            f"lr_latents {lr_shape} and hr_latents {hr_shape}"
        )
    if hr_shape[2] < lr_shape[2] or hr_shape[3] < lr_shape[3]:
        raise ValueError(f"clip {clip_id!r}: hr_latents {hr_shape} must not be smaller than lr_latents {lr_shape}")
    if text_shape is not None and len(text_shape) != 2:
        raise ValueError(f"clip {clip_id!r}: prompt_embeds must be (L, D), got {text_shape}")
    return PairClip(clip_id, path, lr_shape, hr_shape, text_shape)


def map_crop(start: int, size: int, lr_extent: int, hr_extent: int) -> tuple[int, int]:
    """Map a crop [start, start + size) of an LR axis of length `lr_extent` onto the HR axis (see module doc)."""
    ratio = hr_extent / lr_extent
    hr_size = min(max(round(size * ratio), 1), hr_extent)
    hr_start = min(round(start * ratio), hr_extent - hr_size)
    return hr_start, hr_size


class PairLatentDataset(Dataset):
    """HR / LR latents (and text embeddings when present) of one or more pair datasets, with aligned random crops.

    Several datasets pool their clips, in the order given: e.g. the same videos made into pairs at two HR sizes
    (make-pairs keeps one size per dataset), so that the model sees them both sharper and softer per pixel.

    Index with `(index, crop_seed)` (what `BucketBatchSampler` yields) or with a plain `index` (seed 0).

    Args:
        root: The dataset folder (with dataset.json and manifest.jsonl), or a sequence of them.
        crop_size: (h, w) of the crop in LR latent pixels; `None` keeps whole frames.
        num_frames: Latent frames per sample (a random window); `None` keeps all frames.
        latent_channels: When given, every clip must have this many channels (the model's).
        latent_space: When given, clips that name another latent space are refused.
    """

    def __init__(
        self,
        root: str | Path | Sequence[str | Path],
        crop_size: Sequence[int] | None = None,
        num_frames: int | None = None,
        latent_channels: int | None = None,
        latent_space: str | None = None,
    ):
        self.roots = [Path(root)] if isinstance(root, (str, Path)) else [Path(item) for item in root]
        if not self.roots:
            raise ValueError("`data_dir` must name at least one pair dataset, got an empty list")
        counts = Counter(root.resolve() for root in self.roots)
        repeated = sorted(str(root) for root, count in counts.items() if count > 1)
        if repeated:
            raise ValueError(f"`data_dir` lists the same dataset more than once: {', '.join(repeated)}")
        if crop_size is not None and (len(crop_size) != 2 or min(crop_size) <= 0):
            raise ValueError(f"`crop_size` must be an (h, w) pair of positive LR latent sizes, got {crop_size}")
        if num_frames is not None and num_frames <= 0:
            raise ValueError(f"`num_frames` must be positive, got {num_frames}")
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.num_frames = num_frames
        records = [(root, record) for root in self.roots for record in read_pair_dataset(root)]
        # pooled datasets may share clip ids (the same videos at two sizes): their clips are named with the folder
        qualify = len(self.roots) > 1
        self.clips = [_read_clip(root, record, f"{root}/" if qualify else "") for root, record in records]
        for (_, entry), clip in zip(records, self.clips):
            if latent_channels is not None and clip.lr_shape[0] != latent_channels:
                raise ValueError(
                    f"clip {clip.id!r} has {clip.lr_shape[0]}-channel latents, the model's latent_channels is "
                    f"{latent_channels}"
                )
            space = entry.get("latent_space")
            if latent_space is not None and space is not None and space != latent_space:
                raise ValueError(f"clip {clip.id!r} is in latent space {space!r}, the model's is {latent_space!r}")
            _, frames, height, width = clip.lr_shape
            if num_frames is not None and num_frames > frames:
                raise ValueError(
                    f"`num_frames` (`num_latent_frames`) {num_frames} exceeds the {frames} latent frames of clip "
                    f"{clip.id!r}"
                )
            if self.crop_size is not None and (self.crop_size[0] > height or self.crop_size[1] > width):
                raise ValueError(
                    f"`crop_size` {self.crop_size} exceeds the LR latent size {(height, width)} of clip {clip.id!r}"
                )
        self.has_text = any(clip.text_shape is not None for clip in self.clips)

    def __len__(self) -> int:
        return len(self.clips)

    def sample_shape(self, index: int) -> tuple[int, int, int, int, int]:
        """(T, h, w, H, W) of every sample drawn from clip `index`: its bucket key."""
        clip = self.clips[index]
        _, frames, height, width = clip.lr_shape
        frames = self.num_frames or frames
        crop_h, crop_w = self.crop_size or (height, width)
        return (
            frames,
            crop_h,
            crop_w,
            map_crop(0, crop_h, height, clip.hr_shape[2])[1],
            map_crop(0, crop_w, width, clip.hr_shape[3])[1],
        )

    def buckets(self) -> list[list[int]]:
        """Clip indices grouped by sample shape (in first-seen order, so the grouping is deterministic)."""
        groups: dict[tuple, list[int]] = {}
        for index in range(len(self)):
            groups.setdefault(self.sample_shape(index), []).append(index)
        return list(groups.values())

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, crop_seed = key if isinstance(key, tuple) else (key, 0)
        clip = self.clips[index]
        _, frames, height, width = clip.lr_shape
        num_frames, crop_h, crop_w, _, _ = self.sample_shape(index)
        generator = torch.Generator().manual_seed(int(crop_seed))
        t0, y0, x0 = (
            int(torch.randint(0, extent - size + 1, (1,), generator=generator))
            for extent, size in ((frames, num_frames), (height, crop_h), (width, crop_w))
        )
        hr_y, hr_h = map_crop(y0, crop_h, height, clip.hr_shape[2])
        hr_x, hr_w = map_crop(x0, crop_w, width, clip.hr_shape[3])
        with open_latents(clip.latents_path, clip.id) as tensors:
            lr = tensors.get_slice("lr_latents")[:, t0 : t0 + num_frames, y0 : y0 + crop_h, x0 : x0 + crop_w]
            hr = tensors.get_slice("hr_latents")[:, t0 : t0 + num_frames, hr_y : hr_y + hr_h, hr_x : hr_x + hr_w]
            sample = {"id": clip.id, "lr_latents": lr.float(), "hr_latents": hr.float()}
            if clip.text_shape is not None:
                sample["prompt_embeds"] = tensors.get_tensor("prompt_embeds").float()
                if "prompt_attention_mask" in tensors.keys():
                    sample["prompt_attention_mask"] = tensors.get_tensor("prompt_attention_mask").long()
        return sample


def collate_pairs(samples: list[dict]) -> dict:
    """Stack same-shape samples; pad text embeddings to the longest prompt (with a mask).

    `has_text` marks samples that carry a prompt; the trainer gives the others the null embedding.
    """
    shapes = {(s["lr_latents"].shape, s["hr_latents"].shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"a batch must hold samples of one shape (use BucketBatchSampler), got {sorted(shapes)}")
    batch = {
        "ids": [s["id"] for s in samples],
        "lr_latents": torch.stack([s["lr_latents"] for s in samples]),
        "hr_latents": torch.stack([s["hr_latents"] for s in samples]),
        "has_text": torch.tensor([("prompt_embeds" in s) for s in samples]),
    }
    with_text = [s for s in samples if "prompt_embeds" in s]
    if with_text:
        length = max(s["prompt_embeds"].shape[0] for s in with_text)
        dim = with_text[0]["prompt_embeds"].shape[1]
        embeds = torch.zeros(len(samples), length, dim)
        mask = torch.zeros(len(samples), length, dtype=torch.long)
        for row, sample in enumerate(samples):
            if "prompt_embeds" in sample:
                size = sample["prompt_embeds"].shape[0]
                embeds[row, :size] = sample["prompt_embeds"]
                mask[row, :size] = sample.get("prompt_attention_mask", torch.ones(size, dtype=torch.long))
            else:
                mask[row, 0] = 1  # replaced by the null prompt in the trainer; keeps one valid token
        batch["prompt_embeds"], batch["prompt_attention_mask"] = embeds, mask
    return batch
