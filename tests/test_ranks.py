"""Two CPU ranks under torchrun (gloo): what every rank must agree on."""
import sys

import torch

from conftest import FAST, run_cli, run_main


def test_two_ranks_start_the_same_ema_shard_the_evaluation_and_a_resume_names_the_other_total_batch(
        imagefolder, tmp_path):
    out = tmp_path / 'run'
    out.mkdir()
    proc = run_main('--data-path', imagefolder, '--model', 'test_vit', '--epochs', '1',
                    '--output_dir', out, *FAST, '--batch-size', '6',
                    launcher=(sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                              'tests/ranks_ema.py', out))
    assert 'distributed init (rank 0, world 2, gloo)' in proc.stdout
    # each rank's EMA started from the weights DDP trains (rank 0's), not from its own initialisation
    ema0, ema1 = (torch.load(out / f'ema_rank{rank}.pth', weights_only=True) for rank in (0, 1))
    assert all(torch.equal(ema0[name], ema1[name]) for name in ema0)
    # sharded evaluation by default: the model and the EMA each see the 24 validation images once
    assert proc.stdout.count('(24 images, both head)') == 2

    resumed = run_cli('--data-path', imagefolder, '--model', 'test_vit', '--epochs', '2',
                      '--output_dir', out, *FAST, '--batch-size', '6', '--resume', out / 'checkpoint.pth')
    assert 'was trained with 2 processes x batch 6, this run has 1 x 6: the learning-rate schedule continues ' \
           'as saved' in resumed.stdout
