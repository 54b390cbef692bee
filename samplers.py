"""Sample order: repeated augmentation (Hoffer et al. 2020), as used by DeiT; the shard-block order of
--shuffle blocks; resuming mid-epoch.

torch and timm have no sampler that keeps the copies of an image in the same global step.
"""
import math
from typing import Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

from seeding import epoch_order_generator, sample_seed


# --shuffle blocks: how many shards make one block whose samples are shuffled together. Each worker
# then reads from about this many shards at a time; the larger, the better mixed the batches.
BLOCK_SHARDS = 32


def block_order(shard_lengths: Sequence[int], generator: torch.Generator,
                block_shards: int = BLOCK_SHARDS) -> List[int]:
    """An epoch's order that reads shards mostly sequentially (the shard-block shuffling of Mosaic's
    streaming): the shards shuffled, cut into blocks of ``block_shards``, the samples shuffled within
    each block. Sample indices number the shards' samples in shard order."""
    starts = [0]
    for length in shard_lengths:
        starts.append(starts[-1] + length)
    shards = torch.randperm(len(shard_lengths), generator=generator).tolist()
    order: List[int] = []
    for first in range(0, len(shards), block_shards):
        block = torch.cat([torch.arange(starts[s], starts[s + 1]) for s in shards[first:first + block_shards]])
        order += block[torch.randperm(len(block), generator=generator)].tolist()
    return order


def epoch_order(size: int, seed: int, epoch: int, shard_lengths: Optional[Sequence[int]]) -> List[int]:
    """The shuffled order of an epoch: a permutation of all samples (--shuffle global), or by blocks of
    shards where ``shard_lengths`` are given (--shuffle blocks)."""
    generator = epoch_order_generator(seed, epoch)
    if shard_lengths is None:
        return torch.randperm(size, generator=generator).tolist()
    return block_order(shard_lengths, generator)


class BlockSampler(DistributedSampler):
    """torch's DistributedSampler (the same padding and rank striding) over --shuffle blocks' order."""

    def __init__(self, dataset, shard_lengths: Sequence[int], num_replicas: int, rank: int, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.shard_lengths = list(shard_lengths)

    def __iter__(self) -> Iterator[int]:
        indices = epoch_order(len(self.dataset), self.seed, self.epoch, self.shard_lengths)
        padding = self.total_size - len(indices)
        indices += (indices * math.ceil(padding / len(indices)))[:padding]
        return iter(indices[self.rank:self.total_size:self.num_replicas])


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
                 num_repeats: int = 3, seed: int = 0, shard_lengths: Optional[Sequence[int]] = None):
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
        self.shard_lengths = shard_lengths  # --shuffle blocks' shards; None: a global shuffle
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
            order = epoch_order(len(self.dataset), self.seed, self.epoch, self.shard_lengths)
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
