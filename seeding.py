"""Every random number of a run, derived from one seed (``--seed``).

The scheme:
- At start-up ``seed_everything(seed)`` seeds python, numpy and torch (CPU and every CUDA device) with
  the same seed on every rank, so that the model and its EMA copy start identical everywhere.
- The order of the training images is a function of (seed, epoch) only: torch's DistributedSampler
  and ``samplers.RASampler`` (``epoch_order_generator``) shuffle with a generator seeded by seed + epoch.
- Each training sample's augmentation draws from the python/numpy/torch-CPU generators seeded, in the
  data-loader worker, by ``sample_seed(seed, rank, epoch, position in the epoch)``.
- Each micro-batch reseeds every generator (host and devices) with the ``Stream.STEP`` stream of
  (seed, rank, epoch, micro-batch) before drawing Mixup/CutMix, drop path and dropout; the fast data
  path's random erasing on the device draws from its own ``Stream.ERASE`` stream of (seed, rank,
  epoch, batch).
- A checkpoint holds the host generators' states (``capture_rng_state``), for what is drawn outside
  these streams.

Why a resumed run repeats an uninterrupted one bit for bit: a stream is seeded where it is used from
its position in the run alone, never from how many numbers were drawn before. So the draws of a step
do not depend on the steps before it, on the number of data-loader workers, or on whether the
process was restarted in between; a run resumed at step n (``samplers.ResumableSampler.skip``) draws
at step n what an uninterrupted run draws there.

Seeds are mixed by numpy's SeedSequence, which hashes the number of parts as well as their values:
the per-sample seeds take four parts and the per-step streams five (the last being the stream id),
so no two streams share a seed, and adding a part would change every seed of a run in progress.
"""
import contextlib
import enum
import random
from typing import Iterator, Tuple

import numpy as np
import torch


@enum.unique
class Stream(enum.IntEnum):
    """The per-step random streams, told apart by the last part of their seed."""
    STEP = 1   # the global generators at each micro-batch: Mixup/CutMix, drop path, dropout
    ERASE = 2  # the fast data path's random erasing of each batch, on the training device


def _mix(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (SeedSequence hashing, stable across runs and versions)."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def sample_seed(seed: int, rank: int, epoch: int, position: int) -> int:
    """The seed of one training sample's augmentation: its position in the rank's epoch."""
    return _mix(seed, rank, epoch, position)


def stream_seed(seed: int, rank: int, epoch: int, step: int, stream: Stream) -> int:
    """The seed of ``stream`` at a step (a micro-batch or a batch) of the rank's epoch."""
    return _mix(seed, rank, epoch, step, stream)


def stream_generators(seed: int, rank: int, epoch: int, step: int, stream: Stream,
                      device: torch.device) -> Tuple[random.Random, torch.Generator]:
    """A python generator and a torch generator on ``device``, both seeded by ``stream`` at ``step``."""
    step_seed = stream_seed(seed, rank, epoch, step, stream)
    generator = torch.Generator(device=device)
    generator.manual_seed(step_seed)
    return random.Random(step_seed), generator


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def seed_cpu_generators(seed: int) -> None:
    """Seed the python/numpy/torch-CPU generators (what a sample's augmentation draws from); the CUDA
    generators are left alone, as a data-loader worker must not initialise CUDA."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.default_generator.manual_seed(seed)


@contextlib.contextmanager
def preserved_cpu_generators() -> Iterator[None]:
    """Run the block, then restore the python/numpy/torch-CPU generators to their state before it."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def epoch_order_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator that shuffles an epoch's images, seeded as torch's DistributedSampler seeds its own."""
    return torch.Generator().manual_seed(seed + epoch)


def loader_generator(seed: int) -> torch.Generator:
    """A data loader's own generator (its workers' base seed): creating an iterator must not draw from
    the global generators."""
    return torch.Generator().manual_seed(seed)


def capture_rng_state() -> dict:
    """The host generators' states, as plain data (checkpoints load with weights_only=True). No CUDA
    state: every training step reseeds all devices before drawing on them, and a list of every GPU's
    state would not load where fewer GPUs are visible (a 1-GPU resume, Slurm's per-task GPU binding)."""
    np_state = np.random.get_state()
    return {
        'python': random.getstate(),
        'numpy': (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        'torch': torch.get_rng_state(),
    }


def restore_rng_state(state: dict) -> None:
    """Restore what capture_rng_state saved; the per-GPU 'cuda' list of older checkpoints is ignored."""
    random.setstate((state['python'][0], tuple(state['python'][1]), state['python'][2]))
    name, keys, *rest = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state['torch'])
