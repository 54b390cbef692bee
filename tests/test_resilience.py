"""Never lose a run: kills, signals, interrupted writes, corrupt inputs and hostile checkpoints."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from checkpoint import STEP_CHECKPOINT, find_newest_checkpoint, remove_stale_temporaries
from conftest import FAST, REPO, assert_one_line_error, run_cli
from utils import UserError
from weights import load_checkpoint

# A 0.3 M-parameter ViT: checkpoints of a few MB, so that writing one every step stays cheap.
TINY = ['--model', 'test_vit', *FAST, '--num_workers', '2', '--lr', '2e-3']


def popen_main(*args):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    # its own session: a test can kill the trainer with its data workers, which hold its output pipes
    return subprocess.Popen([sys.executable, 'main.py', *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def progress(output_dir: Path):
    """(epoch, steps done) of the newest step checkpoint, or None."""
    found = [tuple(map(int, STEP_CHECKPOINT.search(p.name).groups()))
             for p in output_dir.glob('checkpoint-e*-s*.pth')]
    return max(found) if found else None


def assert_same_tensors(a, b, where=''):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f'{where}[{i}]')


# fp32 with --layer-decay: its per-layer parameter groups and lr scales are restored as well
@pytest.mark.parametrize('precision, optimisation', [([], ['--layer-decay', '0.75']),
                                                     (['--amp', '--amp-dtype', 'bfloat16'], [])],
                         ids=['fp32-layer-decay', 'bf16'])
def test_sigkill_at_random_steps_and_resume_auto_gives_bit_identical_weights(imagefolder, tmp_path, precision,
                                                                             optimisation):
    common = ['--data-path', imagefolder, *TINY, *precision, *optimisation, '--epochs', '3', '--deterministic',
              '--save-interval-steps', '1']
    reference = tmp_path / 'reference'
    run_cli(*common, '--output_dir', reference)

    run = tmp_path / 'killed'
    rng = random.Random(int(time.time()))
    targets = sorted(rng.sample(range(2, 17), 2))  # global steps (6 per epoch) at which to kill
    for target in targets:
        proc = popen_main(*common, '--output_dir', run, '--resume', 'auto')
        deadline = time.time() + 240
        while (p := progress(run)) is None or p[0] * 6 + p[1] < target:
            assert proc.poll() is None, f'run ended before step {target}: {proc.communicate()[1][-2000:]}'
            assert time.time() < deadline, f'step {target} never reached'
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # as a node failure or Slurm's kill: the trainer and its workers
        proc.communicate(timeout=60)
    final = run_cli(*common, '--output_dir', run, '--resume', 'auto')
    assert re.search(r'Continuing at epoch \d step \d', final.stdout)
    assert f'precision: student {"bf16" if precision else "fp32"}' in final.stdout
    assert ('layers unfused' in final.stdout) == bool(precision)  # bf16 on a CPU: the unfused attention path

    ours = torch.load(run / 'checkpoint.pth', weights_only=True)
    ref = torch.load(reference / 'checkpoint.pth', weights_only=True)
    assert ours['epoch'] == ref['epoch'] == 2, targets
    for key in ('model', 'model_ema', 'optimizer'):
        assert_same_tensors(ours[key], ref[key], f'{key} (killed at steps {targets})')
    groups = ours['optimizer']['param_groups']
    assert groups == ref['optimizer']['param_groups']  # their lr, lr_scale, weight decay
    assert len({group.get('lr_scale', 1.0) for group in groups}) == (8 if optimisation else 1)  # test_vit: 8 layers
    timeless = [[{k: v for k, v in json.loads(line).items() if k != 'train_images_per_sec'}
                 for line in (d / 'log.txt').read_text().splitlines()] for d in (run, reference)]
    assert timeless[0] == timeless[1]  # the same losses and accuracies, epoch by epoch


KILL_MID_WRITE = '''
import os, signal, sys, torch
sys.path.insert(0, {repo!r})
import checkpoint
checkpoint.save_atomic({{'model': {{'w': torch.zeros(3)}}}}, {path!r})
real_save = torch.save
def dying_save(obj, f):
    f.write(b'PK\\x03\\x04 half a checkpoint')
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
checkpoint.save_atomic({{'model': {{'w': torch.ones(3)}}}}, {path!r})
'''


def test_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    path = tmp_path / 'checkpoint.pth'
    proc = subprocess.run([sys.executable, '-c', KILL_MID_WRITE.format(repo=str(REPO), path=str(path))])
    assert proc.returncode == -signal.SIGKILL
    assert torch.equal(load_checkpoint(str(path))['model']['w'], torch.zeros(3))
    assert list(tmp_path.glob('.checkpoint.pth.tmp*')), 'the interrupted temporary file should be there'
    remove_stale_temporaries(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint.pth']


def test_resume_auto_skips_an_unreadable_newer_checkpoint(tmp_path, capsys):
    good = tmp_path / 'checkpoint.pth'
    torch.save({'model': {}, 'epoch': 0}, good)
    time.sleep(0.01)
    bad = tmp_path / 'checkpoint-e0001-s000003.pth'
    bad.write_bytes(good.read_bytes()[:100])  # truncated
    assert find_newest_checkpoint(str(tmp_path)) == str(good)
    assert f'skipping unreadable checkpoint {bad}' in capsys.readouterr().out
    assert find_newest_checkpoint(str(tmp_path / 'empty')) == ''


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits(imagefolder, tmp_path):
    common = ['--data-path', imagefolder, *TINY, '--epochs', '3', '--keep-last', '1']
    proc = popen_main(*common, '--output_dir', tmp_path)
    for line in proc.stdout:  # the first progress line comes after step 0 of epoch 0
        if line.startswith('Epoch: [0]'):
            break
    else:
        pytest.fail(f'training never started: {proc.stderr.read()[-2000:]}')
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    match = re.search(r'stopped by SIGTERM after step (\d+) of epoch (\d+); saved checkpoint (\S+);', stderr)
    assert match, stderr
    saved = torch.load(match.group(3), weights_only=True)
    assert (saved['epoch'], saved['step']) == (int(match.group(2)), int(match.group(1)))
    resumed = run_cli(*common, '--output_dir', tmp_path, '--resume', 'auto')
    assert f'Continuing at epoch {match.group(2)} step {match.group(1)}' in resumed.stdout


# ---------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit, nothing lost
# ---------------------------------------------------------------------------------------------

def test_empty_class_folder(tmp_path):
    from imagefolder import make_imagefolder
    root = make_imagefolder(tmp_path / 'data', num_classes=2, train_per_class=4, val_per_class=2)
    (root / 'train' / 'class_empty').mkdir()
    (root / 'val' / 'class_empty').mkdir()
    proc = run_cli('--data-path', root, *TINY, check=False)
    assert_one_line_error(proc, 'class_empty')


def test_corrupt_images_are_skipped_counted_or_fail_with_strict_data(tmp_path):
    from imagefolder import make_imagefolder
    root = make_imagefolder(tmp_path / 'data', num_classes=2, train_per_class=12, val_per_class=3)
    victim = sorted((root / 'train' / 'class_0').iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated JPEG
    (root / 'train' / 'class_1' / 'garbage.jpg').write_bytes(b'not an image at all')
    out = tmp_path / 'out'
    proc = run_cli('--data-path', root, *TINY, '--epochs', '1', '--output_dir', out, '--no-repeated-aug')
    assert 'unreadable images were skipped' in proc.stdout
    log = json.loads((out / 'log.txt').read_text())
    assert log['train_unreadable_images'] == 2

    proc = run_cli('--data-path', root, *TINY, '--epochs', '1', '--strict-data', '--no-repeated-aug', check=False)
    assert_one_line_error(proc, 'unreadable image', '--strict-data')


def test_teacher_with_another_class_count(imagefolder, tmp_path):
    teacher = tmp_path / 'teacher.pth'
    torch.save({'model': __import__('timm').create_model('test_resnet', num_classes=7).state_dict()}, teacher)
    proc = run_cli('--data-path', imagefolder, *TINY, '--model', 'deit_tiny_distilled_patch4_32',
                   '--distillation-type', 'hard', '--teacher-model', 'test_resnet', '--teacher-path', teacher,
                   check=False)
    assert_one_line_error(proc, f'--teacher-path {teacher} predicts 7 classes, the data has 3',
                          f'--model test_resnet --finetune {teacher}', 'Distil on your own data')


def test_truncated_checkpoint_for_resume_finetune_and_eval(imagefolder, tmp_path):
    bad = tmp_path / 'bad.pth'
    torch.save({'model': {'w': torch.zeros(1000)}}, bad)
    bad.write_bytes(bad.read_bytes()[:300])
    for flags in (['--resume', bad], ['--finetune', bad], ['--eval', '--resume', bad]):
        proc = run_cli('--data-path', imagefolder, *TINY, *flags, check=False)
        assert_one_line_error(proc, 'cannot read checkpoint', str(bad))


def test_output_dir_that_cannot_be_created(imagefolder, tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('x')
    proc = run_cli('--data-path', imagefolder, *TINY, '--output_dir', blocker / 'out', check=False)
    assert_one_line_error(proc, 'cannot create --output_dir')


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(imagefolder, tmp_path):
    common = ['--data-path', imagefolder, *TINY, '--no-model-ema', '--print-freq', '1', '--output_dir', tmp_path]
    run_cli(*common, '--epochs', '1')
    before = (tmp_path / 'checkpoint.pth').read_bytes()
    # A new run in the same directory (the first one set aside) whose loss explodes in its first epoch.
    proc = run_cli(*common, '--epochs', '3', '--lr', '1e30', '--unscale-lr', '--start-over', check=False)
    assert_one_line_error(proc, 'non-finite loss in epoch 0', code=3)
    aside, = tmp_path.glob('previous-*')
    assert (aside / 'checkpoint.pth').read_bytes() == before
    assert not list(tmp_path.glob('checkpoint*.pth'))
    proc = run_cli(*common, '--epochs', '3', '--resume', aside / 'checkpoint.pth', '--opt', 'sgd', check=False)
    assert_one_line_error(proc, 'trained with --opt adamw')


class Payload:
    def __reduce__(self):
        return (os.system, (f'touch {MARKER}',))


MARKER = None


def test_a_malicious_checkpoint_is_refused_and_its_payload_never_runs(tmp_path):
    global MARKER
    MARKER = tmp_path / 'pwned'
    evil = tmp_path / 'evil.pth'
    torch.save({'model': Payload()}, evil)
    with pytest.raises(UserError, match='refusing to load'):
        load_checkpoint(str(evil))
    assert not MARKER.exists()
