"""Two CPU ranks under torchrun (gloo): what every rank must agree on."""
import json
import sys

import pytest
import torch

from conftest import FAST, run_cli, run_main


@pytest.fixture(scope='module')
def two_rank_run(imagefolder, tmp_path_factory):
    """One epoch on 2 ranks (sharded evaluation by default); each rank saves its EMA (tests/ranks_ema.py)."""
    out = tmp_path_factory.mktemp('ranks')
    proc = run_main('--data-path', imagefolder, '--model', 'test_vit', '--epochs', '1',
                    '--output_dir', out, *FAST, '--batch-size', '6',
                    launcher=(sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                              'tests/ranks_ema.py', out))
    return out, proc.stdout


def test_two_ranks_start_from_the_same_ema_and_shard_the_evaluation(two_rank_run):
    out, stdout = two_rank_run
    assert 'distributed init (rank 0, world 2, gloo)' in stdout
    # each rank's EMA started from the weights DDP trains (rank 0's), not from its own initialisation
    ema0, ema1 = (torch.load(out / f'ema_rank{rank}.pth', weights_only=True) for rank in (0, 1))
    assert all(torch.equal(ema0[name], ema1[name]) for name in ema0)
    # the model and the EMA each see the 24 validation images once: the two shards cover the set exactly
    assert stdout.count('(24 images, both head)') == 2


def test_rank_0_alone_prints_and_writes_the_log(two_rank_run):
    out, stdout = two_rank_run
    assert stdout.count('Start training') == 1
    assert [json.loads(line)['epoch'] for line in (out / 'log.txt').read_text().splitlines()] == [0]


def test_a_resume_with_one_process_names_the_other_total_batch(two_rank_run, imagefolder):
    out, _ = two_rank_run
    resumed = run_cli('--data-path', imagefolder, '--model', 'test_vit', '--epochs', '2',
                      '--output_dir', out, *FAST, '--batch-size', '6', '--resume', out / 'checkpoint.pth')
    assert 'was trained with 2 processes x batch 6, this run has 1 x 6: the learning-rate schedule continues ' \
           'as saved' in resumed.stdout
