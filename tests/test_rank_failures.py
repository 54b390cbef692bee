"""A failure seen by one rank ends every rank, with its exit code, under torchrun (2 CPU ranks, gloo).

gloo notices a peer that exited within milliseconds, NCCL does not: each test checks that the ranks
agreed (every rank exits on its own with the failing rank's code and no traceback, soon after the
failure), not that gloo happened to fail fast. tests/rank_faults.py injects the faults.
"""
import json
import sys

import torch
from torch.utils.data.distributed import DistributedSampler
from torchvision.datasets import ImageFolder

import checkpoint
from conftest import FAST, run_main
from imagefolder import make_imagefolder

TORCHRUN = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2')
FLAGS = [*FAST, '--model', 'test_vit', '--batch-size', '4', '--no-model-ema', '--no-repeated-aug']


def run_two_ranks(out, fault, *flags):
    """main.py's flags on 2 ranks with ``fault`` injected; (per-rank exit records, stdout, stderr)."""
    out.mkdir(exist_ok=True)
    proc = run_main(out, fault, *FLAGS, *flags, launcher=(*TORCHRUN, 'tests/rank_faults.py'), timeout=240,
                    check=False)
    exits = [json.loads((out / f'exit_rank{rank}.json').read_text()) for rank in (0, 1)
             if (out / f'exit_rank{rank}.json').is_file()]
    assert len(exits) == 2, f'a rank did not finish on its own:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}'
    return exits, proc.stdout, proc.stderr


def assert_every_rank_stopped_together(exits, stderr, code):
    """Both ranks exit with ``code`` on their own, within 60 s of the first error line, no traceback."""
    assert [e['code'] for e in exits] == [code, code], stderr[-4000:]
    first_error = min(e['first_error'] for e in exits if e['first_error'])
    assert all(e['exited'] - first_error < 60 for e in exits), exits
    assert 'Traceback' not in stderr.split('failed (exitcode:')[0], stderr[-4000:]  # the workers' part, not torchrun's


def error_lines(stderr):
    return [line for line in stderr.splitlines() if '] error:' in line]


def data_with_a_corrupt_image_on_rank_1(root):
    """An ImageFolder whose first training image of rank 1 (epoch 0, --no-repeated-aug) is a truncated JPEG."""
    root = make_imagefolder(root, num_classes=2, train_per_class=8, val_per_class=2)
    train = ImageFolder(root / 'train')
    order = DistributedSampler(train, num_replicas=2, rank=1, shuffle=True, seed=0)
    order.set_epoch(0)
    victim = train.samples[next(iter(order))][0]
    with open(victim, 'r+b') as f:
        f.truncate(200)
    return root, victim


def test_an_unreadable_image_on_rank_1_with_strict_data_stops_both_ranks_with_code_2(tmp_path):
    data, victim = data_with_a_corrupt_image_on_rank_1(tmp_path / 'data')
    exits, _, stderr = run_two_ranks(tmp_path / 'out', 'none', '--data-path', data, '--epochs', '1',
                                     '--strict-data', '--output_dir', tmp_path / 'out')
    assert_every_rank_stopped_together(exits, stderr, 2)
    errors = error_lines(stderr)
    assert len(errors) == 2, stderr[-4000:]  # the failing rank's cause, and rank 0 naming it
    assert errors[0].startswith(f'[rank 1] error: unreadable image {victim}'), errors
    assert errors[1] == '[rank 0] error: rank 1 failed (its error line is above); every rank stops with exit code 2'
    assert stderr.count(str(victim)) == 1
    assert not (tmp_path / 'out' / 'checkpoint.pth').exists()  # nothing of the failed epoch is saved


def test_a_full_disk_on_rank_0_stops_both_ranks_with_code_4_and_keeps_the_first_epoch(tmp_path):
    # One readable validation image of two: the --dist-eval shard of rank 1 holds none, which is no error.
    data = make_imagefolder(tmp_path / 'data', num_classes=2, train_per_class=8, val_per_class=1)
    (data / 'val' / 'class_1' / '0000.jpg').write_bytes(b'not an image')
    out = tmp_path / 'out'
    exits, stdout, stderr = run_two_ranks(out, 'full-disk', '--data-path', data, '--epochs', '2',
                                          '--output_dir', out)
    assert_every_rank_stopped_together(exits, stderr, 4)
    assert stdout.count('(1 images)') == 2  # both epochs evaluated their one image
    errors = error_lines(stderr)
    assert len(errors) == 1 and errors[0].startswith(f'[rank 0] error: cannot write {out / "checkpoint.pth"}: '
                                                     f'No space left on device (ENOSPC)'), stderr[-4000:]
    # epoch 0 is intact; epoch 1's training is in its last step's checkpoint, written before evaluating
    assert torch.load(out / 'checkpoint.pth', weights_only=True)['epoch'] == 0
    assert [json.loads(line)['epoch'] for line in (out / 'log.txt').read_text().splitlines()] == [0, 1]
    assert checkpoint.find_newest_checkpoint(str(out)).endswith('checkpoint-e0001-s000002.pth')


def test_an_output_dir_in_use_stops_both_ranks_with_code_2(tmp_path, imagefolder):
    out = tmp_path / 'out'
    out.mkdir()
    owner = checkpoint.claim_output_dir(str(out))
    try:
        exits, _, stderr = run_two_ranks(out, 'none', '--data-path', imagefolder, '--epochs', '1', '--output_dir', out)
    finally:
        owner.close()
    assert_every_rank_stopped_together(exits, stderr, 2)
    errors = error_lines(stderr)
    assert len(errors) == 1 and errors[0].startswith(f'[rank 0] error: --output_dir {out} is in use by pid'), errors


def test_a_node_local_output_dir_stops_both_ranks_with_code_2(tmp_path, imagefolder):
    out = tmp_path / 'out'
    exits, _, stderr = run_two_ranks(out, 'node-local-output-dir', '--data-path', imagefolder, '--epochs', '1',
                                     '--output_dir', out)
    assert_every_rank_stopped_together(exits, stderr, 2)
    errors = error_lines(stderr)
    assert errors[0].startswith(f'[rank 1] error: --output_dir {out}-node1 on '), errors
    assert 'is not the directory rank 0 writes' in errors[0] and len(errors) == 2, errors


def test_more_tasks_per_node_than_gpus_is_refused_before_submitting(tmp_path, capsys):
    import run_with_submitit
    code = run_with_submitit.cli(['--ngpus', '2', '--ntasks-per-node', '4', '--model', 'test_vit',
                                  '--job_dir', str(tmp_path / 'jobs')])
    assert code == 2
    assert capsys.readouterr().err.startswith('error: --ntasks-per-node 4 is more than --ngpus 2: ')
    assert not (tmp_path / 'jobs').exists()  # nothing submitted
