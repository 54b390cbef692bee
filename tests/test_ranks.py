"""Two CPU ranks under torchrun (gloo): what every rank must agree on."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import FAST, REPO, run_cli, run_main


def flags(imagefolder, out):
    return ['--data-path', imagefolder, '--model', 'test_vit', '--epochs', '1', '--output_dir', out, *FAST,
            '--batch-size', '6', '--deterministic']


@pytest.fixture(scope='module')
def two_rank_run(imagefolder, tmp_path_factory):
    """One epoch on 2 ranks (sharded evaluation by default); each rank saves its EMA (tests/ranks_ema.py)."""
    out = tmp_path_factory.mktemp('ranks')
    proc = run_main(*flags(imagefolder, out),
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
    assert stdout.count('(24 images)') == 2


def test_rank_0_alone_prints_and_writes_the_log(two_rank_run):
    out, stdout = two_rank_run
    assert stdout.count('Start training') == 1
    assert [json.loads(line)['epoch'] for line in (out / 'log.txt').read_text().splitlines()] == [0]


def test_a_resume_with_one_process_names_the_other_total_batch(two_rank_run, imagefolder, tmp_path):
    out, _ = two_rank_run
    resumed = run_cli('--data-path', imagefolder, '--model', 'test_vit', '--epochs', '2',
                      '--output_dir', tmp_path, *FAST, '--batch-size', '6', '--resume', out / 'checkpoint.pth')
    assert 'was trained with 2 processes x batch 6, this run has 1 x 6: the learning-rate schedule continues ' \
           'as saved' in resumed.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_torchrun_agents_as_two_nodes_train_as_one_node_with_two_processes(two_rank_run, imagefolder, tmp_path):
    # docs/usage.md's multi-node command, each "node" an agent with one process, meeting at a c10d rendezvous
    node_run, _ = two_rank_run
    endpoint = f'127.0.0.1:{free_port()}'
    agent = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2', '--nproc_per_node', '1',
             '--rdzv-backend', 'c10d', '--rdzv-endpoint', endpoint, '--rdzv-id', 'two-nodes',
             'tests/ranks_ema.py', tmp_path, *map(str, flags(imagefolder, tmp_path))]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    nodes = [subprocess.Popen(agent, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], '\n'.join(output[-3000:] for output in outputs)
    assert 'distributed init (rank 0, world 2, gloo)' in ''.join(outputs)
    ours, ref = (torch.load(out / 'checkpoint.pth', weights_only=True) for out in (tmp_path, node_run))
    for name in ref['model']:
        torch.testing.assert_close(ours['model'][name], ref['model'][name], rtol=0, atol=1e-6)
    rows = [json.loads((out / 'log.txt').read_text()) for out in (tmp_path, node_run)]
    assert rows[0]['test_acc1'] == rows[1]['test_acc1']
    assert rows[0]['train_loss'] == pytest.approx(rows[1]['train_loss'])
