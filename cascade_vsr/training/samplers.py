"""Timestep samplers (SimpleGVR section 4.3) and the bucketed batch sampler of the pair dataset.

Timesteps are flow-matching sigmas in [0, 1] (1 = pure noise), the convention of `cascade_vsr.flow`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import Sampler

# ---------------------------------------------------------------------------------------------------------------
# Timestep samplers
# ---------------------------------------------------------------------------------------------------------------

# Built-in detail-aware curve, used until `cascade-vsr calibrate-sampler` has measured one for a trained model.
# Ten equal bins over sigma in [0, 1] (low noise -> high noise). It follows the shape SimpleGVR reports in its
# Fig. 5: detail gains concentrate in the high- and mid-noise region and the low-noise end contributes little,
# so the last 30% of the denoising trajectory (sigma < 0.3) gets ~3x less mass than the middle.
DEFAULT_DETAIL_EDGES = tuple(i / 10 for i in range(11))
DEFAULT_DETAIL_WEIGHTS = (0.3, 0.4, 0.6, 0.9, 1.2, 1.4, 1.4, 1.3, 1.2, 1.0)

TIMESTEP_SAMPLERS = ("uniform", "logit_normal", "detail_aware")


class TimestepSampler:
    """Draws one sigma in [0, 1] per sample."""

    def sample(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        raise NotImplementedError

    def _uniform(self, batch_size, generator, device) -> torch.Tensor:
        gen_device = generator.device if generator is not None else device
        return torch.rand(batch_size, generator=generator, device=gen_device, dtype=torch.float64).to(device)


class UniformTimestepSampler(TimestepSampler):
    """sigma ~ U[0, 1]."""

    def sample(self, batch_size, generator=None, device="cpu"):
        return self._uniform(batch_size, generator, device).float()


class LogitNormalTimestepSampler(TimestepSampler):
    """sigma = sigmoid(N(mean, std)) (SD3's logit-normal sampling)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        if std <= 0:
            raise ValueError(f"`std` of the logit-normal sampler must be positive, got {std}")
        self.mean, self.std = mean, std

    def sample(self, batch_size, generator=None, device="cpu"):
        gen_device = generator.device if generator is not None else device
        normal = torch.randn(batch_size, generator=generator, device=gen_device).to(device)
        return torch.sigmoid(self.mean + self.std * normal)


class DetailAwareTimestepSampler(TimestepSampler):
    """A piecewise-constant density over sigma, sampled exactly by inverse CDF.

    Args:
        edges: K + 1 increasing bin edges covering [0, 1].
        weights: K non-negative bin densities (any scale; normalized here so that the density integrates to 1).
    """

    def __init__(self, edges: Sequence[float], weights: Sequence[float]):
        edges = torch.as_tensor(edges, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if edges.ndim != 1 or weights.ndim != 1 or edges.numel() != weights.numel() + 1 or weights.numel() == 0:
            raise ValueError(
                f"`edges` must have one more entry than `weights`, got {edges.numel()} edges and "
                f"{weights.numel()} weights"
            )
        if not (torch.all(edges[1:] > edges[:-1]) and abs(edges[0]) < 1e-9 and abs(edges[-1] - 1) < 1e-9):
            raise ValueError(f"`edges` must increase strictly from 0 to 1, got {edges.tolist()}")
        if not torch.all(torch.isfinite(weights)) or torch.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"`weights` must be finite, non-negative and not all zero, got {weights.tolist()}")
        widths = edges[1:] - edges[:-1]
        mass = weights * widths
        self.edges = edges
        self.probabilities = mass / mass.sum()
        self.density = self.probabilities / widths
        self.cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(self.probabilities, 0)])
        self.cdf[-1] = 1.0

    @classmethod
    def default(cls) -> DetailAwareTimestepSampler:
        """The built-in curve (see DEFAULT_DETAIL_WEIGHTS)."""
        return cls(DEFAULT_DETAIL_EDGES, DEFAULT_DETAIL_WEIGHTS)

    @classmethod
    def from_json(cls, path: str | Path) -> DetailAwareTimestepSampler:
        """Load the distribution written by `cascade-vsr calibrate-sampler`."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"`timestep_curve` {str(path)!r} does not exist")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"`timestep_curve` {str(path)!r} is not a calibration JSON: {error}") from None
        if not isinstance(data, dict) or "edges" not in data or "density" not in data:
            raise ValueError(f"`timestep_curve` {str(path)!r} must hold 'edges' and 'density' lists")
        return cls(data["edges"], data["density"])

    def cdf_at(self, sigma: torch.Tensor) -> torch.Tensor:
        """The distribution function at `sigma` (piecewise linear)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).clamp(0, 1)
        index = (torch.searchsorted(self.edges, sigma, right=True) - 1).clamp(0, len(self.density) - 1)
        return self.cdf[index] + (sigma - self.edges[index]) * self.density[index]

    def sample(self, batch_size, generator=None, device="cpu"):
        u = self._uniform(batch_size, generator, "cpu")
        # `right=True` never lands in a zero-probability bin (its cdf interval is empty).
        index = (torch.searchsorted(self.cdf, u, right=True) - 1).clamp(0, len(self.probabilities) - 1)
        fraction = (u - self.cdf[index]) / self.probabilities[index].clamp_min(1e-300)
        sigma = self.edges[index] + fraction.clamp(0, 1) * (self.edges[index + 1] - self.edges[index])
        return sigma.float().to(device)


def make_timestep_sampler(
    name: str, logit_mean: float = 0.0, logit_std: float = 1.0, curve_path: str | None = None
) -> TimestepSampler:
    """Build the sampler named in the training config."""
    if name == "uniform":
        return UniformTimestepSampler()
    if name == "logit_normal":
        return LogitNormalTimestepSampler(logit_mean, logit_std)
    if name == "detail_aware":
        return DetailAwareTimestepSampler.from_json(curve_path) if curve_path else DetailAwareTimestepSampler.default()
    raise ValueError(f"`timestep_sampler` must be one of {TIMESTEP_SAMPLERS}, got {name!r}")


# ---------------------------------------------------------------------------------------------------------------
# Bucketed batch sampler
# ---------------------------------------------------------------------------------------------------------------


class BucketBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of same-shape samples, sharded over ranks, with a resumable position.

    Every item is `(dataset_index, crop_seed)`: the random crop is a pure function of the seed, so an epoch's
    batches (and crops) are a pure function of `(seed, epoch)`. Resuming at `(epoch, batch)` therefore
    replays exactly what an uninterrupted run would have seen, whatever the number of data-loader workers.

    Args:
        buckets: Dataset indices grouped by sample shape.
        batch_size: Samples per batch (per rank).
        drop_last: Drop each bucket's incomplete last batch (needed for same-shape batches of fixed size).
        shuffle: Shuffle within buckets and the order of batches, per epoch.
        seed: Seed of the shuffles and crops.
        num_replicas, rank: Data-parallel sharding; every rank gets the same number of batches.
    """

    def __init__(
        self,
        buckets: Sequence[Sequence[int]],
        batch_size: int,
        drop_last: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if batch_size <= 0:
            raise ValueError(f"`batch_size` must be positive, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"`rank` must lie in [0, num_replicas={num_replicas}), got {rank}")
        self.buckets = [list(bucket) for bucket in buckets if len(bucket)]
        self.batch_size, self.drop_last, self.shuffle, self.seed = batch_size, drop_last, shuffle, seed
        self.num_replicas, self.rank = num_replicas, rank
        sizes = [len(bucket) for bucket in self.buckets]
        per_bucket = [(n // batch_size) if drop_last else math.ceil(n / batch_size) for n in sizes]
        self.num_global_batches = sum(per_bucket)
        if self.num_global_batches // num_replicas == 0:
            raise ValueError(
                f"`batch_size` (`train_batch_size`) {batch_size} (x {num_replicas} processes) yields no batch: the dataset has "
                f"{sum(sizes)} samples in buckets of sizes {sizes}"
                + (" and drop_last drops incomplete batches" if drop_last else "")
            )
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self.num_global_batches // self.num_replicas

    def set_position(self, epoch: int, batch: int = 0) -> None:
        """Start the next iteration at batch `batch` of epoch `epoch`."""
        if not 0 <= batch <= len(self):
            raise ValueError(f"`batch` must lie in [0, {len(self)}], got {batch}")
        self.epoch, self.start_batch = epoch, batch

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """This rank's batches of `epoch`."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches = []
        for bucket in self.buckets:
            order = torch.randperm(len(bucket), generator=generator).tolist() if self.shuffle else range(len(bucket))
            members = [bucket[i] for i in order]
            stop = len(members) - len(members) % self.batch_size if self.drop_last else len(members)
            batches += [members[i : i + self.batch_size] for i in range(0, stop, self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        crop_seeds = torch.randint(0, 2**62, (len(batches), self.batch_size), generator=generator).tolist()
        seeded = [list(zip(batch, seeds)) for batch, seeds in zip(batches, crop_seeds)]
        return seeded[self.rank : len(self) * self.num_replicas : self.num_replicas]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        start, self.start_batch = self.start_batch, 0
        yield from self.epoch_batches(self.epoch)[start:]
