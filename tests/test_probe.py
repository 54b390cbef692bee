"""The fault probe's cases that run in a second or two: a rerun into a finished run's directory, links and
special files in the data, foreign fine-tuning weights, paths with ~ and $VARS, checkpoints that are
truncated, in safetensors or from a newer version."""
import json
import os

import pytest
import torch

import checkpoint
import utils
import weights


def test_a_truncated_checkpoint_is_called_truncated(tmp_path):
    torch.save({'model': {'w': torch.randn(1000)}}, tmp_path / 'checkpoint.pth')
    data = (tmp_path / 'checkpoint.pth').read_bytes()
    half = tmp_path / '.checkpoint.pth.tmp123'
    half.write_bytes(data[:len(data) // 2])
    with pytest.raises(utils.UserError, match='truncated: a zip archive whose end is missing'):
        weights.load_checkpoint(str(half))


def test_safetensors_weights_load_and_a_truncated_one_is_refused(tmp_path):
    from safetensors.torch import save_file
    state = {'w': torch.arange(6.0).reshape(2, 3), 'b': torch.ones(2)}
    save_file(state, tmp_path / 'model.safetensors')
    loaded = weights.load_checkpoint(str(tmp_path / 'model.safetensors'))
    assert weights.model_state_from_checkpoint(loaded, 'model.safetensors').keys() == state.keys()
    assert torch.equal(loaded['w'], state['w'])
    data = (tmp_path / 'model.safetensors').read_bytes()
    (tmp_path / 'cut.safetensors').write_bytes(data[:-8])
    with pytest.raises(utils.UserError, match='cannot read safetensors file .*cut.safetensors'):
        weights.load_checkpoint(str(tmp_path / 'cut.safetensors'))


def test_a_checkpoint_records_its_format_and_a_newer_one_is_refused(tmp_path):
    model = torch.nn.Linear(2, 2)
    ckpt = {'model': model.state_dict(), 'format_version': checkpoint.FORMAT_VERSION + 1}
    with pytest.raises(utils.UserError, match=f'format {checkpoint.FORMAT_VERSION + 1}, newer than'):
        checkpoint.check_format_version(ckpt, 'new.pth')
    checkpoint.check_format_version({'model': model.state_dict()}, 'old.pth')  # no version: an older file
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    from timm.scheduler import CosineLRScheduler
    from engine import LossScaler
    state = checkpoint.TrainingState(model, optimizer, CosineLRScheduler(optimizer, t_initial=2), LossScaler(False),
                                     None, {}, 1)
    assert state.payload(0)['format_version'] == checkpoint.FORMAT_VERSION


def test_a_train_folder_without_class_folders_is_one_clear_line(tmp_path):
    from conftest import FAST, assert_one_line_error, run_cli
    from imagefolder import make_imagefolder
    root = make_imagefolder(tmp_path / 'data', num_classes=2, train_per_class=2, val_per_class=1)
    for folder in (root / 'train').iterdir():
        for image in folder.iterdir():
            image.rename(root / 'train' / f'{folder.name}-{image.name}')
        folder.rmdir()
    proc = run_cli('--data-path', root, '--model', 'test_vit', *FAST, check=False)
    line = assert_one_line_error(proc, f'{root / "train"} has no class folders')
    assert '.:' not in line


def test_a_new_run_into_a_finished_runs_directory_is_refused_and_touches_nothing(imagefolder, tmp_path):
    from conftest import FAST, assert_one_line_error, run_cli
    common = ['--data-path', imagefolder, '--model', 'test_vit', *FAST, '--epochs', '1', '--output_dir', tmp_path]
    run_cli(*common)
    (tmp_path / '.lock').unlink()  # the refused run may take the lock; every other file must stay as it was
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    proc = run_cli(*common, check=False)
    assert_one_line_error(proc, f'--output_dir {tmp_path} holds another run', '--resume auto', 'another --output_dir',
                          '--start-over')
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != '.lock'} == before

    run_cli(*common, '--start-over')  # starting over keeps the previous run aside, byte for byte
    aside, = tmp_path.glob('previous-*')
    assert {p.name: p.read_bytes() for p in aside.iterdir() if p.is_file()} == before
    assert len((tmp_path / 'log.txt').read_text().splitlines()) == 1


def test_resume_auto_over_unreadable_checkpoints_starts_fresh_and_keeps_them_aside(imagefolder, tmp_path):
    from conftest import FAST, run_cli
    (tmp_path / 'checkpoint.pth').write_bytes(b'PK\x03\x04 cut short')
    run_cli('--data-path', imagefolder, '--model', 'test_vit', *FAST, '--epochs', '1', '--output_dir', tmp_path,
            '--resume', 'auto')
    aside, = tmp_path.glob('previous-*')
    assert (aside / 'checkpoint.pth').read_bytes() == b'PK\x03\x04 cut short'
    assert torch.load(tmp_path / 'checkpoint.pth', weights_only=True)['epoch'] == 0


def test_paths_in_a_config_and_in_flags_expand_tilde_and_variables(tmp_path, monkeypatch):
    import argparse
    import config
    import main
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    monkeypatch.setenv('RUNS', str(tmp_path / 'runs'))
    recipe = tmp_path / 'home' / 'recipe.yaml'
    recipe.parent.mkdir()
    recipe.write_text('output_dir: ~/deit_out\ndata-path: $RUNS/data\nfinetune: https://127.0.0.1/$x.pth\n')
    parser = argparse.ArgumentParser(parents=[main.get_args_parser()])
    args = config.parse_args(parser, ['--config', '~/recipe.yaml', '--resume=~/ck.pth'])
    assert args.output_dir == str(tmp_path / 'home' / 'deit_out')
    assert args.data_path == str(tmp_path / 'runs' / 'data')
    assert args.resume == str(tmp_path / 'home' / 'ck.pth')
    assert args.finetune == 'https://127.0.0.1/$x.pth'  # a URL is not a path


def test_finetune_from_another_architecture_is_refused_unless_partial_is_asked_for(tmp_path, capsys):
    import timm
    import main
    path = tmp_path / 'resnet.pth'
    torch.save({'model': timm.create_model('resnet10t', num_classes=5).state_dict()}, path)
    model = timm.create_model('test_vit', num_classes=3)
    with pytest.raises(utils.UserError, match=r'sets 0 of the model.s \d+ weight tensors .* match nothing in the '
                                              r'model .* seems to hold a ResNet .*--finetune-partial'):
        main.load_finetune_weights(model, str(path))
    # a backbone on purpose: the ViT's blocks from a checkpoint without its patch embedding
    vit = timm.create_model('test_vit', num_classes=3).state_dict()
    torch.save({'model': {k: v for k, v in vit.items() if not k.startswith('patch_embed.')}}, path)
    main.load_finetune_weights(model, str(path), partial=True)
    assert 'keep their initialisation (patch_embed.proj.weight, patch_embed.proj.bias)' in capsys.readouterr().out
    assert torch.equal(model.state_dict()['blocks.0.attn.qkv.weight'], vit['blocks.0.attn.qkv.weight'])


def test_a_symlink_loop_and_a_fifo_in_the_data_are_skipped_with_one_warning(tmp_path):

    from conftest import FAST, run_cli
    from imagefolder import make_imagefolder
    root = make_imagefolder(tmp_path / 'data', num_classes=2, train_per_class=12, val_per_class=2)
    os.symlink('..', root / 'train' / 'class_0' / 'loop')
    os.mkfifo(root / 'train' / 'class_0' / 'fifo.jpg')
    out = tmp_path / 'out'
    proc = run_cli('--data-path', root, '--model', 'test_vit', *FAST, '--epochs', '1', '--output_dir', out)
    warnings = [line for line in proc.stdout.splitlines() if line.startswith('warning:') and 'skipped' in line]
    assert len(warnings) == 1, proc.stdout[-3000:]
    assert 'looping back up the tree' in warnings[0] and 'a FIFO' in warnings[0] and 'fifo.jpg' in warnings[0]
    assert json.loads((out / 'log.txt').read_text())['train_unreadable_images'] == 0
    from data_files import ClassFolders
    samples = ClassFolders(str(root / 'train')).samples
    assert len(samples) == 24 and all(f'class_{label}' in path for path, label in samples)


def test_a_fifo_is_refused_at_open_without_blocking(tmp_path):

    from data_files import load_rgb
    os.mkfifo(tmp_path / 'late.jpg')  # appeared after the folder walk
    with pytest.raises(OSError, match='not a regular file \\(a FIFO\\)'):
        load_rgb(str(tmp_path / 'late.jpg'))


def test_a_stop_signal_during_a_stuck_read_saves_the_last_finished_step_and_exits(tmp_path):
    import re
    import signal
    import subprocess
    import sys
    import time
    from conftest import FAST, REPO
    from imagefolder import make_imagefolder
    root = make_imagefolder(tmp_path / 'data', num_classes=2, train_per_class=40, val_per_class=2)
    marker, out = tmp_path / 'hang', tmp_path / 'out'
    proc = subprocess.Popen([sys.executable, 'tests/stuck_reader.py', '--data-path', str(root), '--model', 'test_vit',
                             *FAST, '--batch-size', '4', '--print-freq', '1', '--epochs', '1', '--output_dir', str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, 'STUCK_MARKER': str(marker), 'OMP_NUM_THREADS': '1',
                                 'PYTHONUNBUFFERED': '1'})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith('Epoch: [0] [ 2/'):
            marker.touch()  # the reads from now on hang
            break
    time.sleep(1)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    output = ''.join(lines) + rest
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert time.time() - sent < 30
    match = re.search(r'stopped by SIGTERM after step (\d+) of epoch 0 \(the next batch did not come within 1 s: '
                      r'a data-loader read is stuck\); saved checkpoint (\S+);', output)
    assert match, output[-3000:]
    assert torch.load(match.group(2), weights_only=True)['step'] == int(match.group(1)) >= 3
