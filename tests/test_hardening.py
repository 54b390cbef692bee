"""Hostile environments: copies that change mtimes, stop signals, concurrent runs, bombs, full disks,
torn logs, impossible numbers and non-finite losses (in-process where the property allows)."""
import json
import os
import time

import pytest
import torch

import checkpoint
import utils
import weights


def save_position(path, epoch, step=None):
    torch.save({'model': {'w': torch.zeros(2)}, 'epoch': epoch, 'step': step}, path)


def test_resume_auto_follows_the_recorded_position_not_file_times(tmp_path):
    save_position(tmp_path / 'checkpoint.pth', 39)  # a finished 40-epoch run
    save_position(tmp_path / 'checkpoint-e0022-s000005.pth', 22, 5)  # left over, then touched by a copy
    save_position(tmp_path / 'checkpoint-e0039-s000002.pth', 39, 2)
    later = time.time() + 100
    os.utime(tmp_path / 'checkpoint-e0022-s000005.pth', (later, later))
    assert checkpoint.find_newest_checkpoint(str(tmp_path)) == str(tmp_path / 'checkpoint.pth')

    # A renamed file: its contents, not its name, say where it stands.
    os.rename(tmp_path / 'checkpoint-e0022-s000005.pth', tmp_path / 'checkpoint-e0099-s000001.pth')
    save_position(tmp_path / 'checkpoint-e0040-s000003.pth', 40, 3)
    assert checkpoint.find_newest_checkpoint(str(tmp_path)) == str(tmp_path / 'checkpoint-e0040-s000003.pth')


def test_the_epoch_checkpoint_prunes_the_step_checkpoints_of_finished_epochs(tmp_path):
    for epoch, step in ((2, 5), (3, 1), (3, 4)):
        save_position(tmp_path / f'checkpoint-e{epoch:04d}-s{step:06d}.pth', epoch, step)
    checkpointer = checkpoint.Checkpointer(str(tmp_path), payload=None, keep_last=5)
    checkpointer.after_epoch(2, str(tmp_path / 'checkpoint.pth'))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint-e0003-s000001.pth', 'checkpoint-e0003-s000004.pth']
    checkpointer.after_epoch(3, str(tmp_path / 'checkpoint.pth'))
    assert list(tmp_path.iterdir()) == []


def test_resuming_says_which_log_records_it_drops(tmp_path, capsys):
    (tmp_path / 'log.txt').write_text(''.join(json.dumps({'epoch': e, 'train_loss': 1.0}) + '\n' for e in range(4)))
    utils.EpochLog(str(tmp_path), resume_epoch=4).close()
    assert 'dropping' not in capsys.readouterr().out
    utils.EpochLog(str(tmp_path), resume_epoch=2).close()
    assert 'dropping the records of epochs 2, 3 from log.txt' in capsys.readouterr().out
    assert [json.loads(line)['epoch'] for line in (tmp_path / 'log.txt').read_text().splitlines()] == [0, 1]


def test_a_non_finite_loss_reaches_no_checkpoint_and_names_its_step(tmp_path):
    import pytest
    from engine import LossScaler, NonFiniteLossError, TrainOptions, train_one_epoch
    from losses import DistillationLoss

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(2, 4), torch.tensor([0, 1])) for _ in range(4)]
    batches[2][0][0, 0] = float('inf')  # step 2's loss is NaN, and so are the weights after it
    checkpointer = checkpoint.Checkpointer(
        str(tmp_path), payload=lambda epoch, steps, metrics: {'model': model.state_dict()}, every_steps=1, keep_last=9)
    criterion = DistillationLoss(torch.nn.CrossEntropyLoss(), None, 'none', 0.0, 1.0)
    with pytest.raises(NonFiniteLossError, match='non-finite loss in epoch 0 at step 2'):
        train_one_epoch(model, criterion, batches, optimizer, torch.device('cpu'), 0, LossScaler(False, 'cpu'),
                        TrainOptions(print_freq=100), checkpointer=checkpointer)
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == ['checkpoint-e0000-s000001.pth', 'checkpoint-e0000-s000002.pth']
    for name in saved:
        assert all(torch.isfinite(v).all() for v in torch.load(tmp_path / name)['model'].values()), name


def test_a_stop_signal_in_training_stops_after_the_step_and_a_second_one_at_once(capsys):
    # before training a signal ends the process at once: test_sigterm_while_starting_exits_with_its_line
    import signal
    import pytest
    saved = {s: signal.getsignal(s) for s in checkpoint.STOP_SIGNALS}
    try:
        signals = checkpoint.StopSignals()
        signals.install()
        signals.training()
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: a stop request like SIGTERM
        time.sleep(0.1)
        assert signals.signum == signal.SIGINT
        assert 'stopping after the current step' in capsys.readouterr().out
        with pytest.raises(checkpoint.TrainingInterrupted, match='SIGINT a second time, at once'):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


class SignalsItsOwnProcessGroup(torch.utils.data.Dataset):
    """Each item sends SIGTERM and SIGINT to the worker that loads it, as a signal to the group would."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        import signal
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        return index


def test_data_loader_workers_ignore_stop_signals():
    loader = torch.utils.data.DataLoader(SignalsItsOwnProcessGroup(), batch_size=2, num_workers=1,
                                         worker_init_fn=checkpoint.ignore_stop_signals)
    assert [b.tolist() for b in loader] == [[0, 1], [2, 3]]


def test_ctrl_c_to_the_process_group_saves_a_step_checkpoint_and_exits_with_one_line(imagefolder, tmp_path):
    import re
    import signal
    import subprocess
    import sys
    from conftest import FAST, REPO
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    proc = subprocess.Popen([sys.executable, 'main.py', '--data-path', str(imagefolder), '--model', 'test_vit', *FAST,
                             '--num_workers', '2', '--epochs', '3', '--print-freq', '1', '--output_dir', str(tmp_path)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal's foreground job
    for line in proc.stdout:
        if line.startswith('Epoch: [0]'):
            break
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the trainer and its workers receive it
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert 'Traceback' not in stderr, stderr[-3000:]
    match = re.search(r'stopped by SIGINT after step (\d+) of epoch 0; saved checkpoint (\S+);', stderr)
    assert match, stderr[-3000:]
    assert torch.load(match.group(2), weights_only=True)['step'] == int(match.group(1))


def test_an_output_directory_has_one_owner_and_the_refused_run_touches_nothing(imagefolder, tmp_path):
    import socket
    import pytest
    from conftest import FAST, assert_one_line_error, run_cli
    owner = checkpoint.claim_output_dir(str(tmp_path))
    assert owner is not None
    temporary = tmp_path / '.checkpoint.pth.tmp4242'  # the owner's checkpoint being written
    temporary.write_bytes(b'half')
    with pytest.raises(utils.UserError, match=f'in use by pid {os.getpid()} on {socket.gethostname()}'):
        checkpoint.claim_output_dir(str(tmp_path))

    proc = run_cli('--data-path', imagefolder, '--model', 'test_vit', *FAST, '--output_dir', tmp_path, check=False)
    assert_one_line_error(proc, 'error: --output_dir', f'in use by pid {os.getpid()}')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['.checkpoint.pth.tmp4242', '.lock']
    owner.close()  # the run ends: the next one owns the directory and cleans what a kill left
    checkpoint.claim_output_dir(str(tmp_path)).close()
    assert not temporary.exists()


def test_a_run_refused_at_resume_leaves_the_directory_as_it_was(imagefolder, tmp_path):
    from conftest import FAST, assert_one_line_error, run_cli
    save_position(tmp_path / 'checkpoint.pth', 0)  # another model's weights
    (tmp_path / 'args.yaml').write_text('model: deit_small_patch16_224\n')
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    proc = run_cli('--data-path', imagefolder, '--model', 'test_vit', *FAST, '--output_dir', tmp_path,
                   '--resume', 'auto', check=False)
    assert_one_line_error(proc, 'does not fit the model')
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != '.lock'}
    assert after == before


def write_bomb(path, width=65000, height=65000):
    """A few-hundred-byte JPEG whose frame header claims ``width`` x ``height`` pixels."""
    from PIL import Image
    import io
    buffer = io.BytesIO()
    Image.new('RGB', (16, 16), (200, 30, 30)).save(buffer, 'JPEG')
    data = bytearray(buffer.getvalue())
    sof = data.index(b'\xff\xc0')
    data[sof + 5:sof + 9] = height.to_bytes(2, 'big') + width.to_bytes(2, 'big')
    path.write_bytes(bytes(data))


def test_a_decompression_bomb_is_an_unreadable_image_on_both_pipelines(tmp_path):
    from torchvision.datasets import ImageFolder
    import datasets
    import fast_data
    from imagefolder import make_imagefolder
    root = make_imagefolder(tmp_path, num_classes=1, train_per_class=2, val_per_class=0)
    bomb = root / 'train' / 'class_0' / '0000.jpg'
    write_bomb(bomb)
    pipelines = {'PIL': ImageFolder(root / 'train', transform=datasets.EvalTransform(48)),
                 'fast': ImageFolder(root / 'train', transform=fast_data.FastEvalTransform(48),
                                     loader=fast_data.open_lazily)}
    for name, folder in pipelines.items():
        image, target, unreadable = datasets.RobustSamples(folder, replace=True)[0]  # the next image instead
        assert image.shape[-2:] == (48, 48) or image.shape[:2] == (48, 48), name
        assert len(unreadable) == 1 and str(bomb) in unreadable[0], name
        assert 'DecompressionBombError' in unreadable[0], (name, unreadable)


def test_a_full_disk_while_saving_is_one_line_naming_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import builtins
    import errno
    import pytest
    path = tmp_path / 'checkpoint.pth'
    checkpoint.save_atomic({'model': {'w': torch.zeros(3)}}, str(path))

    class FullDisk:
        """A file that the OS stops accepting after a few bytes."""
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(utils, 'open', lambda *a, **k: FullDisk(builtins.open(*a, **k)), raising=False)
    with pytest.raises(utils.SaveError, match=f'cannot write {path}: No space left on device \\(ENOSPC\\)'):
        checkpoint.save_atomic({'model': {'w': torch.ones(3)}}, str(path))
    monkeypatch.undo()
    assert torch.equal(weights.load_checkpoint(str(path))['model']['w'], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint.pth']

    read_only = OSError(errno.EROFS, os.strerror(errno.EROFS))
    with pytest.raises(utils.SaveError, match='Read-only file system \\(EROFS\\)'):
        utils.write_atomic(str(path), lambda f: (_ for _ in ()).throw(read_only))


def test_a_failed_save_exits_with_its_own_code_and_one_line(monkeypatch, capsys):
    import errno
    import main
    def refuse(args):
        raise utils.SaveError('O/checkpoint.pth', OSError(errno.EIO, os.strerror(errno.EIO)))
    monkeypatch.setattr(main, 'main', refuse)
    assert main.cli(['--device', 'cpu']) == 4
    assert capsys.readouterr().err.splitlines() == [
        'error: cannot write O/checkpoint.pth: Input/output error (EIO); its previous version, if any, is intact: '
        'free space or fix the file system, then continue with --resume auto']


def test_a_torn_last_line_of_log_txt_is_dropped_with_a_warning_on_resume(tmp_path, capsys):
    records = [json.dumps({'epoch': e, 'train_loss': 1.0}) for e in range(3)]
    (tmp_path / 'log.txt').write_text('\n'.join(records) + '\n' + records[0][:9])  # killed during an append
    log = utils.EpochLog(str(tmp_path), resume_epoch=3)
    assert 'ignoring line 4, not a complete record' in capsys.readouterr().out
    log.write({'epoch': 3, 'train_loss': 0.5})
    assert [json.loads(line)['epoch'] for line in (tmp_path / 'log.txt').read_text().splitlines()] == [0, 1, 2, 3]


def test_a_split_without_a_readable_image_is_refused_before_training(imagefolder, tmp_path):
    import shutil
    import pytest
    from torchvision.datasets import ImageFolder
    from conftest import FAST, assert_one_line_error, run_cli
    from datasets import RobustSamples
    root = tmp_path / 'data'
    shutil.copytree(imagefolder, root)
    for image in (root / 'val').rglob('*.jpg'):
        image.write_bytes(b'not an image')
    with pytest.raises(utils.UserError, match='none of 8 validation images sampled across the split can be read'):
        RobustSamples(ImageFolder(root / 'val'), replace=False).check_readable('validation')
    RobustSamples(ImageFolder(root / 'train'), replace=True).check_readable('training')  # readable: no error

    proc = run_cli('--data-path', root, '--model', 'test_vit', *FAST, '--epochs', '1', check=False)
    assert_one_line_error(proc, 'validation images sampled')
    assert 'Start training' not in proc.stdout


def test_impossible_numbers_are_refused_before_any_data_is_read():
    import pytest
    import main
    parser = main.get_args_parser()
    with pytest.raises(utils.UserError, match='--batch-size 7 must be even with mixup/cutmix'):
        main.validate_args(parser.parse_args(['--batch-size', '7', '--model', 'test_vit', '--input-size', '32']))
    main.validate_args(parser.parse_args(['--batch-size', '7', '--mixup', '0', '--cutmix', '0', '--model', 'test_vit',
                                          '--input-size', '32']))
    with pytest.raises(utils.UserError, match='--input-size 8 is too small for --model deit_tiny_patch16_224 '
                                              r'\(patch size 16\)'):
        main.validate_args(parser.parse_args(['--model', 'deit_tiny_patch16_224', '--input-size', '8']))
    main.validate_args(parser.parse_args(['--model', 'regnety_002', '--input-size', '32']))  # a convnet: fine


def test_resuming_mid_epoch_with_another_batch_size_continues_at_the_same_sample_or_is_refused():
    import pytest
    from checkpoint import step_to_resume_at
    ckpt = {'epoch': 4, 'step': 3, 'args': {'batch_size': 8, 'world_size': 1},
            'sampler': {'epoch': 4, 'start_index': 24}}
    assert step_to_resume_at(ckpt, 'c.pth', batch_size=8, accum_steps=1, world_size=1) == 3
    assert step_to_resume_at(ckpt, 'c.pth', batch_size=12, accum_steps=1, world_size=1) == 2  # 24 = 2 x 12
    assert step_to_resume_at(ckpt, 'c.pth', batch_size=4, accum_steps=3, world_size=1) == 2  # 24 = 2 x (4 x 3)
    with pytest.raises(utils.UserError, match='not a step boundary with --batch-size 16 --grad-accum-steps 1: '
                                              'resume with --batch-size 8 --grad-accum-steps 1'):
        step_to_resume_at(ckpt, 'c.pth', batch_size=16, accum_steps=1, world_size=1)
    with pytest.raises(utils.UserError, match='with 1 processes: resume it with 1 processes'):
        step_to_resume_at(ckpt, 'c.pth', batch_size=8, accum_steps=1, world_size=2)


def test_a_bit_flipped_or_non_checkpoint_file_is_refused_with_one_line(tmp_path):
    import pytest
    path = tmp_path / 'checkpoint.pth'
    torch.save({'model': {'w': torch.arange(1000, dtype=torch.float32)}}, path)
    data = bytearray(path.read_bytes())
    data[data.index(torch.arange(1000, dtype=torch.float32).numpy().tobytes()[400:408]) + 3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(utils.UserError, match='fails its CRC check'):
        weights.load_checkpoint(str(path))
    assert not checkpoint.is_readable_checkpoint(str(path))
    text = tmp_path / 'teacher.txt'
    text.write_text('cat /etc/passwd\n')
    with pytest.raises(utils.UserError, match='not a PyTorch checkpoint'):
        weights.load_checkpoint(str(text))


def test_unreadable_images_are_counted_once_and_resuming_a_finished_run_says_so(tmp_path):
    from conftest import FAST, run_cli
    from imagefolder import make_imagefolder
    root = make_imagefolder(tmp_path / 'data', num_classes=2, train_per_class=12, val_per_class=2)
    (root / 'train' / 'class_1' / 'garbage.jpg').write_bytes(b'not an image at all')
    out = tmp_path / 'out'
    common = ['--data-path', root, '--model', 'test_vit', *FAST, '--epochs', '1', '--output_dir', out]
    run_cli(*common)  # repeated augmentation: the garbage file is drawn 3 times
    assert json.loads((out / 'log.txt').read_text())['train_unreadable_images'] == 1
    log = (out / 'log.txt').read_text()
    proc = run_cli(*common, '--resume', 'auto')
    assert 'Nothing to train' in proc.stdout and 'raise --epochs' in proc.stdout
    assert 'Continuing at epoch' not in proc.stdout and (out / 'log.txt').read_text() == log


@pytest.mark.parametrize('delay', [0.5, 2.0, 4.0])
def test_sigterm_while_starting_exits_with_its_line(tmp_path, delay):
    """At any moment before training (torch loading, the data and its imports, the model): one line,
    exit code 128 + signal, and nothing half-imported that turns it into another error."""
    import re
    import signal
    import subprocess
    import sys
    from conftest import REPO
    proc = subprocess.Popen([sys.executable, 'main.py', '--data-set', 'DIGITS', '--model', 'test_vit', '--device', 'cpu',
                             '--output_dir', str(tmp_path / 'out')], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    if 'Start training' in stdout:
        pytest.skip(f'training had started within {delay} s: the step-checkpoint path, tested elsewhere')
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert re.fullmatch(r'stopped by SIGTERM (while starting|before training started); nothing to save yet.*',
                        stderr.strip()), stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Several ranks (torchrun, gloo on the CPU)
# ---------------------------------------------------------------------------------------------

def test_a_torchrun_restart_continues_the_run_instead_of_starting_it_again(tmp_path, monkeypatch, capsys):
    # The cases a real restart below does not reach: no checkpoint yet, and a --resume on the command line.
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '1')
    assert checkpoint.resume_source('', str(tmp_path)) == ''  # restarted before any checkpoint: a fresh start
    assert checkpoint.resume_source('start.pth', str(tmp_path)) == 'start.pth'
    save_position(tmp_path / 'checkpoint-e0000-s000003.pth', 0, 3)
    assert checkpoint.resume_source('', str(tmp_path)) == str(tmp_path / 'checkpoint-e0000-s000003.pth')
    assert checkpoint.resume_source('start.pth', str(tmp_path)) == str(tmp_path / 'checkpoint-e0000-s000003.pth')
    assert 'torchrun restart 1: continuing the run from' in capsys.readouterr().out
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '0')  # the first attempt: the command line as given
    assert checkpoint.resume_source('start.pth', str(tmp_path)) == 'start.pth'


def test_a_torchrun_restart_after_a_killed_rank_resumes_and_ends_with_the_uninterrupted_weights(imagefolder,
                                                                                                tmp_path):
    # elastic_worker.py's watchdog ends a hung worker (with its traceback) well within the subprocess timeout
    import sys
    from conftest import FAST, run_main
    from test_resilience import assert_same_tensors
    flags = ['--data-path', imagefolder, '--model', 'test_vit', *FAST, '--batch-size', '4', '--epochs', '2',
             '--deterministic', '--save-interval-steps', '1']
    torchrun = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2')
    killed = run_main(*flags, '--output_dir', tmp_path / 'killed',
                      launcher=(*torchrun, '--max-restarts=1', 'tests/elastic_worker.py'), timeout=900)
    assert 'torchrun restart 1: continuing the run from' in killed.stdout
    assert 'Continuing at epoch 0 step' in killed.stdout
    run_main(*flags, '--output_dir', tmp_path / 'whole', launcher=(*torchrun, 'main.py'), timeout=300)
    ours, ref = (torch.load(tmp_path / run / 'checkpoint.pth', weights_only=True) for run in ('killed', 'whole'))
    assert ours['epoch'] == ref['epoch'] == 1
    for key in ('model', 'optimizer'):
        assert_same_tensors(ours[key], ref[key], key)


def two_ranks(scenario, out):
    import sys
    from conftest import run_main
    run_main(scenario, out, launcher=(sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                      '--nproc_per_node=2', 'tests/two_ranks.py'), timeout=120)
    return [json.loads((out / f'rank{rank}.json').read_text()) for rank in (0, 1)]


def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_the_message(tmp_path):
    results = two_ranks('nan', tmp_path)
    assert results == ['3: non-finite loss in epoch 0 at step 2: lower --lr, set --clip-grad, or check the data; no '
                       'checkpoint holds its weights (--resume auto continues from the last finite one)'] * 2


def test_a_torchrun_restart_counted_on_one_node_only_resumes_every_rank_from_the_same_checkpoint(tmp_path):
    torch.save({'model': {}, 'epoch': 0, 'step': 3}, tmp_path / 'checkpoint-e0-s3.pth')
    assert two_ranks('restart', tmp_path) == [str(tmp_path / 'checkpoint-e0-s3.pth')] * 2


def test_a_stop_signal_on_one_rank_stops_every_rank_after_the_same_step_within_a_few_steps(tmp_path):
    results = two_ranks('signal', tmp_path)
    lag = checkpoint.RankAgreement.LAG
    assert results == [f'stopped by SIGTERM after step {5 + lag} of epoch 0; saved no checkpoint (no --output_dir); '
                       f'continue with --resume auto'] * 2
