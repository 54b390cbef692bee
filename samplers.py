"""Repeated-augmentation sampler (Hoffer et al. 2020), as used by DeiT.

torch and timm have no sampler that keeps the copies of an image in the same global step.
"""
import math
from typing import Iterator, List

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from seeding import epoch_order_generator, sample_seed


class RASampler(Sampler):
    """Each selected image appears ``num_repeats`` times per epoch, each copy augmented on its own.

    The shuffled index list is repeated element-wise (``a a a b b b ...``) and dealt round-robin to
    the ranks, as in the original: with 3 ranks every rank holds the same image at the same
    position of its shard, so the copies meet in one global step; in a single process they are
    consecutive and fall into the same batch when the batch size is a multiple of ``num_repeats``.
    Per epoch about ``len(dataset)`` samples are drawn in total (rounded down to a multiple of 256
    on large datasets, as the original), always whole groups of copies and never zero.
    The order depends only on (seed, epoch); the (image, copy) pairs of the ranks are disjoint.
    """

    def __init__(self, dataset, num_replicas: int = None, rank: int = None, shuffle: bool = True,
                 num_repeats: int = 3, seed: int = 0):
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if num_repeats < 1:
            raise ValueError('num_repeats must be at least 1')
        self.dataset = dataset
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.num_repeats = num_repeats
        self.seed = seed
        self.epoch = 0
        self.num_samples = math.ceil(len(dataset) * num_repeats / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.num_selected_samples = self._selected_per_rank(len(dataset))

    def _selected_per_rank(self, n: int) -> int:
        # The copies handed out (rank-major) must make whole groups: a multiple of lcm(ranks, repeats).
        base = n // 256 * 256 if n >= 256 else n
        unit = self.num_replicas * self.num_repeats // math.gcd(self.num_replicas, self.num_repeats)
        total = max(base // unit, 1) * unit
        return min(total // self.num_replicas, self.num_samples)

    def _indices(self) -> List[int]:
        if self.shuffle:
            order = torch.randperm(len(self.dataset), generator=epoch_order_generator(self.seed, self.epoch)).tolist()
        else:
            order = list(range(len(self.dataset)))
        repeated = [i for i in order for _ in range(self.num_repeats)]
        repeated += repeated[:self.total_size - len(repeated)]  # pad so that every rank has num_samples
        return repeated[self.rank:self.total_size:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[:self.num_selected_samples])

    def __len__(self) -> int:
        return self.num_selected_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class ResumableSampler(Sampler):
    """Wraps an epoch-aware sampler: yields ``(index, seed)`` pairs and can start mid-epoch.

    Each sample's augmentation seed is a function of (seed, rank, epoch, position in the epoch),
    so a run resumed at any step draws the same augmentations as an uninterrupted one, whatever the
    number of data-loader workers. ``skip(n)`` starts the current epoch at its n-th sample.
    Only whole groups of ``group_size`` samples are yielded (an optimizer step's samples with gradient
    accumulation): the epoch's remainder is dropped, as a DataLoader's ``drop_last`` drops a partial batch.
    """

    def __init__(self, sampler: Sampler, seed: int = 0, rank: int = 0, group_size: int = 1):
        self.sampler = sampler
        self.seed = seed
        self.rank = rank
        self.group_size = group_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start = 0
        if hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(epoch)

    def skip(self, num_samples: int) -> None:
        self.start = num_samples

    def _end(self) -> int:
        return len(self.sampler) // self.group_size * self.group_size

    def __iter__(self) -> Iterator:
        end = self._end()
        for position, index in enumerate(self.sampler):
            if position >= end:
                break
            if position >= self.start:
                yield index, sample_seed(self.seed, self.rank, self.epoch, position)

    def __len__(self) -> int:
        return max(self._end() - self.start, 0)
