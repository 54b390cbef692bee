"""--data-set WDS and HF: the folder path's guarantees on shards (the same samples and weights, resuming
after SIGKILL, unreadable samples skipped and counted) and --shuffle blocks' order."""
import io
import json
import os
import random
import resource
import shutil
import signal
import sys
import tarfile
import time
from collections import Counter

import pytest
import torch

from conftest import FAST, REPO, assert_one_line_error, run_cli, run_main
from samplers import BLOCK_SHARDS, BlockSampler, RASampler, block_order
from seeding import epoch_order_generator
from shards import (FILES_FOR_THE_REST, MOST_OPEN_FILES, NotPlainTar, build_wds, index_shard, plain_tar_members,
                    sample_index, shard_file_limit, tarfile_members)
from shardsets import save_hf, save_hf_parquet
from tools.pack_shards import pack_folder
from test_resilience import assert_same_tensors, popen_main, progress

# 48 px: the fast data path decodes the shards' bytes in training and evaluation (32 px is evaluated
# without resizing, on the reference path).
TINY = ['--model', 'test_vit', *FAST, '--input-size', '48', '--lr', '2e-3', '--deterministic']


@pytest.fixture(scope='module')
def shard_sets(imagefolder, tmp_path_factory):
    """The session's generated ImageFolder as WDS shards (about 8 of its training split) and as a saved HF
    DatasetDict."""
    root = tmp_path_factory.mktemp('shards')
    train_bytes = sum(path.stat().st_size for path in (imagefolder / 'train').rglob('*.jpg'))
    pack_folder(str(imagefolder), str(root / 'wds'), shard_size=train_bytes // 8, name='test', log=lambda line: None)
    return {'IMNET': imagefolder, 'WDS': root / 'wds', 'HF': save_hf(imagefolder, root / 'hf')}


def train_shards(wds):
    """The train split's shard files, in order, and their sample counts."""
    split = json.loads((wds / '_info.json').read_text())['splits']['train']
    return [wds / name for name in split['filenames']], split['shard_lengths']


def member_names(shard):
    with tarfile.open(shard) as tar:
        return tar.getnames()


def weights(out):
    return torch.load(out / 'checkpoint.pth', weights_only=True)


def timeless_log(out):
    return [{k: v for k, v in json.loads(line).items() if k != 'train_images_per_sec'}
            for line in (out / 'log.txt').read_text().splitlines()]


def test_shards_and_hf_packed_from_a_folder_train_bit_identical_to_the_folder(shard_sets, tmp_path):
    runs = {}
    for data_set, path in shard_sets.items():
        runs[data_set] = tmp_path / data_set
        run_cli('--data-set', data_set, '--data-path', path, *TINY, '--epochs', '1', '--output_dir', runs[data_set])
    for data_set in ('WDS', 'HF'):
        for key in ('model', 'model_ema', 'optimizer'):
            assert_same_tensors(weights(runs[data_set])[key], weights(runs['IMNET'])[key], f'{data_set} {key}')
        assert timeless_log(runs[data_set]) == timeless_log(runs['IMNET'])


KILLED = [*TINY, '--num_workers', '2', '--epochs', '1', '--save-interval-steps', '1']


@pytest.fixture(scope='module')
def folder_reference(shard_sets, tmp_path_factory):
    """The uninterrupted run on the folder that the killed runs on shards must end equal to."""
    out = tmp_path_factory.mktemp('folder_reference')
    run_cli('--data-path', shard_sets['IMNET'], *KILLED, '--output_dir', out)
    return out


@pytest.mark.parametrize('data_set', ['WDS', 'HF'])
def test_sigkill_mid_epoch_and_resume_auto_on_shards_ends_with_the_folder_weights(shard_sets, folder_reference,
                                                                                  tmp_path, data_set):
    common = ['--data-set', data_set, '--data-path', shard_sets[data_set], *KILLED, '--output_dir', tmp_path]
    target = random.Random(int(time.time())).randrange(1, 5)  # of the epoch's 6 steps
    proc = popen_main(*common, '--resume', 'auto')
    deadline = time.time() + 240
    while (p := progress(tmp_path)) is None or p[0] * 6 + p[1] < target:
        assert proc.poll() is None, f'run ended before step {target}: {proc.communicate()[1][-2000:]}'
        assert time.time() < deadline, f'step {target} never reached'
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its data workers, which hold the shards open
    proc.communicate(timeout=60)
    final = run_cli(*common, '--resume', 'auto')
    assert 'Continuing at epoch' in final.stdout
    for key in ('model', 'model_ema', 'optimizer'):
        assert_same_tensors(weights(tmp_path)[key], weights(folder_reference)[key], f'{key} (killed at step {target})')
    assert timeless_log(tmp_path) == timeless_log(folder_reference)


def test_torchrun_two_ranks_killed_and_restarted_on_shards_end_with_the_folder_weights(shard_sets, tmp_path):
    # elastic_worker.py kills rank 1 after its second step; torchrun restarts both ranks, which resume.
    flags = [*TINY, '--batch-size', '4', '--epochs', '1', '--save-interval-steps', '1', '--dist-eval']
    torchrun = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2')
    run_main('--data-path', shard_sets['IMNET'], *flags, '--output_dir', tmp_path / 'IMNET',
             launcher=(*torchrun, 'main.py'), timeout=300)
    for data_set in ('WDS', 'HF'):
        killed = run_main('--data-set', data_set, '--data-path', shard_sets[data_set], *flags,
                          '--output_dir', tmp_path / data_set,
                          launcher=(*torchrun, '--max-restarts=1', 'tests/elastic_worker.py'), timeout=900)
        assert 'Continuing at epoch 0 step' in killed.stdout
        for key in ('model', 'optimizer'):
            assert_same_tensors(weights(tmp_path / data_set)[key], weights(tmp_path / 'IMNET')[key],
                                f'{data_set} {key}')
        assert '(24 images' in killed.stdout  # --dist-eval: each of the 24 validation images counted once


def test_a_parquet_repository_gives_the_folder_samples_and_class_names(shard_sets, tmp_path):
    import numpy as np
    from torchvision.datasets import ImageFolder
    from datasets import pil_from_bytes
    from shards import build_hf
    parquet = save_hf_parquet(shard_sets['IMNET'], tmp_path / 'parquet')
    for is_train, folder in ((True, 'train'), (False, 'val')):
        dataset, classes = build_hf(str(parquet), is_train, None, pil_from_bytes)
        reference = ImageFolder(str(shard_sets['IMNET'] / folder))
        assert (dataset.classes, classes, len(dataset)) == (reference.classes, 3, len(reference))
        for index in range(0, len(reference), 5):
            (image, label), (expected, expected_label) = dataset[index], reference[index]
            assert label == expected_label and np.array_equal(np.asarray(image), np.asarray(expected))


def test_the_in21k_recipe_trains_on_shards_without_reading_them_to_count_classes(shard_sets, tmp_path):
    """timm/imagenet-22k-wds' info file names no classes: the recipe's --nb-classes spares the count."""
    wds = tmp_path / 'wds'
    shutil.copytree(shard_sets['WDS'], wds)
    info = json.loads((wds / '_info.json').read_text())
    (wds / '_info.json').write_text(json.dumps({'name': info['name'], 'splits': info['splits']}))
    proc = run_cli('--config', REPO / 'configs/deit3/deit_small_patch16_LS_224_in21k.yaml', '--data-path', wds,
                   '--model', 'test_vit', *FAST, '--nb-classes', '3', '--epochs', '1', '--output_dir', tmp_path / 'out')
    assert 'counting the classes' not in proc.stdout and (tmp_path / 'out' / 'checkpoint.pth').is_file()


def test_the_plain_header_walk_indexes_as_tarfile_does_and_leaves_long_names_to_it(shard_sets, tmp_path):
    shards, _ = train_shards(shard_sets['WDS'])
    cut = tmp_path / 'cut.tar'
    shutil.copy(shards[0], cut)
    os.truncate(cut, cut.stat().st_size // 2)
    long_names = tmp_path / 'long.tar'  # a pax header carries a name of more than 100 characters
    with tarfile.open(long_names, 'w', format=tarfile.PAX_FORMAT) as tar, tarfile.open(shards[1]) as source:
        for member in source:
            data = source.extractfile(member).read()
            member.name = 'a' * 120 + member.name
            tar.addfile(member, io.BytesIO(data))
    for path in [*shards, cut, long_names]:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            expected = sample_index(tarfile_members(fd), size)
            assert len(expected) and (index_shard(fd) == expected).all()
            if path == long_names:
                with pytest.raises(NotPlainTar):
                    list(plain_tar_members(fd, size))
        finally:
            os.close(fd)


def test_a_process_keeps_as_many_shards_open_as_its_hard_limit_of_open_files_allows():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))
    try:
        most = shard_file_limit()
        raised = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert raised == min(hard, MOST_OPEN_FILES) and most == raised - FILES_FOR_THE_REST
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


OPENED = None  # the paths opened while a test records them (an audit hook cannot be removed)


def record_open(event, args):
    if event == 'open' and OPENED is not None and isinstance(args[0], str):
        OPENED.append(args[0])


def test_each_worker_opens_a_shard_once_an_epoch_and_start_up_opens_none(shard_sets, monkeypatch):
    """What a network filesystem pays for: an open (or stat) of a path is a round trip to its server."""
    global OPENED
    sys.addaudithook(record_open)
    stats = []
    stat = os.stat
    monkeypatch.setattr(os, 'stat', lambda path, *a, **k: stats.append(str(path)) or stat(path, *a, **k))
    shards, _ = train_shards(shard_sets['WDS'])
    OPENED = []
    try:
        dataset, _ = build_wds(str(shard_sets['WDS']), True, None, lambda data: data, None)
        assert [path for path in OPENED if path.endswith('.tar')] == []
        order = list(range(len(dataset)))
        random.Random(0).shuffle(order)
        OPENED, stats[:] = [], []
        for index in order + order:  # two epochs in one worker
            dataset[index]
        assert sorted(OPENED) == sorted(map(str, shards)) and stats == []
    finally:
        OPENED = None


# ---------------------------------------------------------------------------------------------
# Unreadable shards and samples
# ---------------------------------------------------------------------------------------------

def rewrite_shard(path, change):
    """Rewrite a tar shard with ``change(name, data)`` -> data, or None to leave the member out."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, 'w') as tar:
        for member, data in members:
            data = change(member.name, data)
            if data is not None:
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))


def test_corrupt_member_missing_label_and_truncated_shard_are_skipped_and_counted_or_fail_with_strict_data(
        shard_sets, tmp_path):
    wds = tmp_path / 'wds'
    shutil.copytree(shard_sets['WDS'], wds)
    shards, _ = train_shards(wds)
    assert len(shards) >= 3
    corrupt = next(name for name in member_names(shards[0]) if name.endswith('.jpg'))
    rewrite_shard(shards[0], lambda name, data: b'garbage' if name == corrupt else data)
    unlabelled = next(name for name in member_names(shards[1]) if name.endswith('.cls'))
    rewrite_shard(shards[1], lambda name, data: None if name == unlabelled else data)
    with tarfile.open(shards[-1]) as tar:  # cut inside the last image
        image = [member for member in tar.getmembers() if member.name.endswith('.jpg')][-1]
    os.truncate(shards[-1], image.offset_data + image.size // 2)
    flags = ['--data-set', 'WDS', '--data-path', wds, *TINY, '--epochs', '1', '--no-repeated-aug']

    proc = run_cli(*flags, '--output_dir', tmp_path / 'out')
    assert json.loads((tmp_path / 'out' / 'log.txt').read_text())['train_unreadable_images'] == 3, proc.stdout

    proc = run_cli(*flags, '--strict-data', check=False)
    assert_one_line_error(proc, 'unreadable image', 'test-train-', '--strict-data')


def test_a_missing_shard_a_missing_split_and_no_info_file_are_one_line_each(shard_sets, tmp_path):
    wds = tmp_path / 'wds'
    shutil.copytree(shard_sets['WDS'], wds)
    shards, _ = train_shards(wds)
    shards[2].unlink()
    flags = [*TINY, '--epochs', '1']
    assert_one_line_error(run_cli('--data-set', 'WDS', '--data-path', wds, *flags, check=False),
                          f'1 of the {len(shards)} train shards are missing', shards[2].name)
    (wds / '_info.json').unlink()
    assert_one_line_error(run_cli('--data-set', 'WDS', '--data-path', wds, *flags, check=False),
                          'no _info.json', 'brace pattern')
    hf = tmp_path / 'hf'
    shutil.copytree(shard_sets['HF'], hf)
    shutil.rmtree(hf / 'validation')
    assert_one_line_error(run_cli('--data-set', 'HF', '--data-path', hf, *flags, check=False),
                          'no validation / val split')
    assert_one_line_error(run_cli('--data-path', shard_sets['IMNET'], *flags, '--shuffle', 'blocks', check=False),
                          '--shuffle blocks', 'IMNET')


def test_a_brace_pattern_without_info_file_counts_the_shards_and_their_classes(shard_sets, tmp_path):
    from datasets import pil_from_bytes
    from shards import (FILES_FOR_THE_REST, MOST_OPEN_FILES, NotPlainTar, build_wds, index_shard, plain_tar_members,
                    sample_index, shard_file_limit, tarfile_members)
    wds = tmp_path / 'wds'
    shutil.copytree(shard_sets['WDS'], wds)
    shards, lengths = train_shards(wds)
    (wds / '_info.json').unlink()
    pattern = str(wds / f'test-train-{{000000..{len(shards) - 1:06d}}}.tar')
    train, classes = build_wds(pattern, True, None, pil_from_bytes, None)
    val, _ = build_wds(pattern, False, None, pil_from_bytes, None)
    assert (len(train), len(val), classes, train.classes) == (72, 24, 3, ['0', '1', '2'])
    assert train.shard_lengths == lengths
    assert [train[i][1] for i in (0, 24, 71)] == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# --shuffle blocks
# ---------------------------------------------------------------------------------------------

def test_block_order_is_a_pure_function_of_seed_and_epoch_and_each_sample_comes_once():
    lengths = [7, 10, 10, 3, 10] * 20  # 100 shards, 740 samples
    order = block_order(lengths, epoch_order_generator(0, 3))
    assert sorted(order) == list(range(sum(lengths)))
    assert order == block_order(lengths, epoch_order_generator(0, 3))
    assert order != block_order(lengths, epoch_order_generator(0, 4))
    assert order != block_order(lengths, epoch_order_generator(1, 3))


def test_block_order_reads_a_few_shards_at_a_time():
    lengths = [10] * 100
    order = block_order(lengths, epoch_order_generator(0, 0))
    shard_of = [index // 10 for index in order]
    blocks = [set(shard_of[i:i + BLOCK_SHARDS * 10]) for i in range(0, len(order), BLOCK_SHARDS * 10)]
    assert all(len(block) <= BLOCK_SHARDS for block in blocks)  # each stretch of the order: one block's shards
    assert len(set.union(*blocks)) == 100 and sum(map(len, blocks)) == 100  # every shard in exactly one block


@pytest.mark.parametrize('repeated_aug', [True, False])
def test_block_order_on_two_ranks_covers_every_sample_and_depends_on_the_world_size(repeated_aug):
    lengths = [10] * 40
    dataset = range(sum(lengths))

    def ranks(world):
        samplers = [RASampler(dataset, world, rank, seed=5, shard_lengths=lengths) if repeated_aug else
                    BlockSampler(dataset, lengths, world, rank, seed=5) for rank in range(world)]
        for sampler in samplers:
            sampler.set_epoch(2)
        return [list(sampler) for sampler in samplers]

    two = ranks(2)
    assert two == ranks(2)
    drawn = Counter(two[0] + two[1])
    if repeated_aug:  # about len(dataset) samples an epoch: whole groups of 3 copies of an image
        assert set(drawn.values()) == {3} and len(drawn) == 252 // 3  # 400 -> 256 -> whole groups on 2 ranks
    else:
        assert set(drawn) == set(dataset)
    assert two[0] != ranks(1)[0][:len(two[0])]
