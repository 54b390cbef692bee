"""The seed scheme of seeding.py: every stream of a run is its own."""
import itertools
import random

import numpy as np
import torch

from seeding import Stream, capture_rng_state, restore_rng_state, sample_seed, seed_everything, stream_seed


def test_each_part_of_a_position_and_each_stream_gives_its_own_seed():
    positions = list(itertools.product((0, 1), repeat=4))  # (seed, rank, epoch, position or step)
    seeds = [sample_seed(*p) for p in positions]
    seeds += [stream_seed(*p, stream) for p in positions for stream in Stream]
    assert len(set(seeds)) == len(positions) * (1 + len(Stream))


def test_restored_rng_state_repeats_the_python_numpy_and_torch_draws_after_the_capture():
    seed_everything(3)
    state = capture_rng_state()
    expected = random.random(), np.random.rand(4), torch.rand(4)
    random.random(), np.random.rand(7), torch.rand(7)  # draws that a resumed run never made
    restore_rng_state(state)
    assert random.random() == expected[0]
    assert np.array_equal(np.random.rand(4), expected[1])
    assert torch.equal(torch.rand(4), expected[2])
