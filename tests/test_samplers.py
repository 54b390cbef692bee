from collections import Counter

import pytest

from samplers import RASampler, ResumableSampler


def shards(n, world, seed=0, epoch=0, repeats=3):
    out = []
    for rank in range(world):
        s = RASampler(range(n), num_replicas=world, rank=rank, shuffle=True, num_repeats=repeats, seed=seed)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


@pytest.mark.parametrize('n,world', [(300, 1), (300, 2), (300, 3), (1000, 4), (50, 3), (7, 2)])
def test_every_selected_image_appears_three_times(n, world):
    counts = Counter(i for shard in shards(n, world) for i in shard)
    assert counts, 'no samples at all'
    assert set(counts.values()) == {3}
    assert all(len(s) == len(shards(n, world)[0]) for s in shards(n, world))


def test_total_is_about_one_dataset_and_never_zero():
    assert sum(len(s) for s in shards(1000, 4)) == 768  # 1000 // 256 * 256, whole groups of copies
    assert len(shards(2, 1)[0]) == 3  # a tiny dataset still yields one image and its copies


def test_total_for_large_dataset_is_rounded_to_256():
    total = sum(len(s) for s in shards(2000, 2))
    assert total == 1792 // 6 * 6


def test_with_three_ranks_each_rank_sees_the_same_image_at_the_same_position():
    a, b, c = shards(300, 3)
    assert a == b == c


def test_single_process_copies_are_consecutive():
    (s,) = shards(300, 1)
    for g in range(0, len(s), 3):
        assert s[g] == s[g + 1] == s[g + 2]
    # so a batch of 12 holds exactly 4 images with their 3 copies each
    batch = s[:12]
    assert set(Counter(batch).values()) == {3}


@pytest.mark.parametrize('world', [2, 4])
def test_image_copy_pairs_are_disjoint_across_ranks(world):
    ranks = shards(600, world)
    # Dealt round-robin: global position p belongs to rank p % world at index p // world.
    merged = [ranks[p % world][p // world] for p in range(len(ranks[0]) * world)]
    groups = [merged[g:g + 3] for g in range(0, len(merged), 3)]
    assert all(len(set(group)) == 1 for group in groups)  # copy k of an image sits at one position only
    images = [group[0] for group in groups]
    assert len(images) == len(set(images))  # and no image is selected twice


def test_deterministic_per_seed_and_epoch():
    assert shards(300, 2, seed=1, epoch=3) == shards(300, 2, seed=1, epoch=3)
    assert shards(300, 2, seed=1, epoch=3) != shards(300, 2, seed=1, epoch=4)
    assert shards(300, 2, seed=1, epoch=3) != shards(300, 2, seed=2, epoch=3)


def test_resumable_sampler_yields_whole_optimizer_steps_and_resumes_inside_them():
    """72 samples in steps of 32 (batch 8 x 4 micro-batches): the partial third step is dropped."""
    sampler = ResumableSampler(range(72), seed=0, group_size=32)
    full = list(sampler)
    assert len(sampler) == len(full) == 64 and [i for i, _ in full] == list(range(64))
    sampler.skip(32)  # resumed after one step
    assert len(sampler) == 32 and list(sampler) == full[32:]
