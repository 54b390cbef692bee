"""User mistakes end in one 'error:' line and a non-zero exit, before any work is done."""
import argparse
import hashlib
import http.server
import re
import threading
from functools import partial

import pytest
import torch

import config
import main
import run_with_submitit
from conftest import FAST, assert_one_line_error, run_cli, run_main
from utils import UserError, resolve_device
from weights import load_checkpoint


def test_missing_data_path(tmp_path):
    proc = run_cli('--data-path', tmp_path / 'nope', '--model', 'deit_tiny_patch4_32', *FAST, check=False)
    assert_one_line_error(proc, 'nope', 'is not a directory')


@pytest.mark.parametrize('flag,value', [('--batch-size', '0'), ('--epochs', '0'), ('--lr', '-1')])
def test_impossible_numbers(imagefolder, flag, value):
    proc = run_cli('--data-path', imagefolder, '--model', 'deit_tiny_patch4_32', *FAST, flag, value, check=False)
    assert_one_line_error(proc, flag)


def test_unknown_model_and_missing_teacher(imagefolder, tmp_path):
    proc = run_cli('--data-path', imagefolder, '--model', 'deit_tiny_patch99', *FAST, check=False)
    assert_one_line_error(proc, 'unknown --model deit_tiny_patch99')
    proc = run_cli('--data-path', imagefolder, '--model', 'deit_tiny_distilled_patch4_32', *FAST,
                   '--distillation-type', 'hard', '--teacher-path', tmp_path / 'teacher.pth', check=False)
    assert_one_line_error(proc, '--teacher-path', 'does not exist')


def test_distillation_needs_a_distilled_student(imagefolder, teacher_checkpoint):
    proc = run_cli('--data-path', imagefolder, '--model', 'deit_tiny_patch4_32', *FAST, '--distillation-type',
                   'hard', '--teacher-model', 'regnety_002', '--teacher-path', teacher_checkpoint, check=False)
    assert_one_line_error(proc, 'no distillation head', '_distilled_')


def test_foreign_checkpoint_names_the_mismatch(imagefolder, teacher_checkpoint):
    proc = run_cli('--data-path', imagefolder, '--model', 'deit_tiny_patch4_32', *FAST, '--eval',
                   '--resume', teacher_checkpoint, check=False)
    assert_one_line_error(proc, 'does not fit the model (--model deit_tiny_patch4_32)', 'missing keys',
                          'it holds a regnety_002 (its recorded model): give --model regnety_002, or leave --model out')


def test_eval_without_model_uses_the_model_the_checkpoint_records(imagefolder, teacher_checkpoint):
    proc = run_cli('--data-path', imagefolder, *FAST, '--eval', '--resume', teacher_checkpoint)
    assert f'--model regnety_002: the model --resume {teacher_checkpoint} records (give --model to choose another)' \
        in proc.stdout.splitlines()
    assert '* Acc@1' in proc.stdout


def test_finetune_and_teacher_path_of_an_original_checkpoint_give_their_recorded_models(tmp_path, capsys):
    original = tmp_path / 'original.pth'  # the original scripts record their args as a Namespace
    torch.save({'model': {}, 'args': argparse.Namespace(model='deit_tiny_patch4_32', input_size=32)}, original)
    teacher = tmp_path / 'teacher.pth'
    torch.save({'model': {}, 'args': {'model': 'regnety_002'}}, teacher)
    args = main.get_args_parser().parse_args(['--finetune', str(original), '--distillation-type', 'hard',
                                              '--teacher-path', str(teacher)])
    main.adopt_recorded_models(args)
    assert (args.model, args.input_size, args.teacher_model) == ('deit_tiny_patch4_32', 32, 'regnety_002')
    printed = capsys.readouterr().out.splitlines()
    assert f'--model deit_tiny_patch4_32 --input-size 32: the model --finetune {original} records ' \
        '(give --model to choose another)' in printed
    assert f'--teacher-model regnety_002: the model --teacher-path {teacher} records ' \
        '(give --teacher-model to choose another)' in printed
    for flags, model, size in ((['--model', 'deit_tiny_patch4_32'], 'deit_tiny_patch4_32', 32),  # its own model
                               (['--model', 'deit_tiny_patch16_224'], 'deit_tiny_patch16_224', 224),  # another one
                               (['--input-size', '64'], 'deit_tiny_patch4_32', 64)):  # given sizes are kept
        given = main.get_args_parser().parse_args(['--finetune', str(original), *flags])
        main.adopt_recorded_models(given)
        assert (given.model, given.input_size) == (model, size)
    assert type(config.plain_args(main.get_args_parser().parse_args([]))['input_size']) is int  # yaml writes it


def test_finetune_none_drops_the_url_a_recipe_gives():
    recipe = ['--config', 'configs/deit_base_patch16_384_finetune.yaml']
    parser = config.CommandLineParser(parents=[main.get_args_parser()])
    assert config.parse_args(parser, recipe).finetune.startswith('https://')
    assert config.parse_args(parser, [*recipe, '--finetune', 'none']).finetune == ''


def test_an_unknown_model_suggests_the_input_size_form_or_the_closest_names():
    assert main.unknown_model('deit_tiny_patch16_384', '--model') == \
        'unknown --model deit_tiny_patch16_384: use --model deit_tiny_patch16_224 --input-size 384'
    assert main.unknown_model('resnet5O', '--model').startswith('unknown --model resnet5O: did you mean resnet50 or')


def test_a_script_error_is_the_same_line_from_a_real_process(tmp_path):
    """The in-process checks above stand for main.py: its own process prints the same line and exit code."""
    args = ('--data-path', tmp_path / 'nope', '--model', 'deit_tiny_patch4_32', *FAST)
    assert assert_one_line_error(run_main(*args, check=False), 'nope', 'is not a directory') == \
        assert_one_line_error(run_cli(*args, check=False))


def test_a_mistyped_flag_is_one_line_naming_the_closest_flag(capsys):
    proc = run_cli('--batchsize', '3', check=False)
    assert proc.stderr == 'error: unrecognized argument --batchsize: did you mean --batch-size?\n'
    assert proc.returncode == 2 and proc.stdout == ''
    with pytest.raises(SystemExit) as exited:  # run_with_submitit.py extends main.py's parser
        run_with_submitit.parse_args(['--output-dir', 'x', '--gpus', '1'])
    assert exited.value.code == 2
    assert capsys.readouterr().err == \
        'error: unrecognized argument --output-dir (and 1 more): did you mean --output_dir?\n'


def test_help_shows_every_flag_in_its_group_with_its_default():
    proc = run_cli('--help', check=False)
    assert proc.returncode == 0
    groups = re.findall(r'^(\w[\w ]*):$', proc.stdout, re.M)
    assert groups == ['options', 'data', 'model', 'distillation', 'optimisation', 'augmentation',
                      'runs and checkpoints', 'distributed', 'performance']
    assert 'training epochs (default: 300)' in proc.stdout and '(default: 0.0005)' in proc.stdout
    assert '(default: None)' not in proc.stdout and '(default: )' not in proc.stdout
    assert not [a.option_strings for a in main.get_args_parser()._actions if not a.help]


def test_device_falls_back_to_cpu_with_one_warning(imagefolder):
    if torch.cuda.is_available():
        pytest.skip('CUDA is present: there is nothing to fall back from')
    proc = run_cli('--data-path', imagefolder, '--model', 'test_vit', '--eval', *FAST, '--device', 'cuda')
    printed = (proc.stdout + proc.stderr).splitlines()
    assert [line for line in printed if line.startswith('warning:') and 'cuda' in line] == [
        'warning: --device cuda requested but CUDA is not available; using the CPU']
    assert '* Acc@1' in proc.stdout  # and the evaluation ran, on the CPU


def test_the_default_device_falls_back_to_cpu_without_a_warning(capsys):
    if torch.cuda.is_available():
        pytest.skip('CUDA is present: there is nothing to fall back from')
    assert resolve_device(main.get_args_parser().parse_args([]).device) == torch.device('cpu')
    assert capsys.readouterr().out == ''
    assert resolve_device(main.get_args_parser().parse_args(['--device', 'cuda']).device) == torch.device('cpu')
    assert capsys.readouterr().out.startswith('warning: --device cuda requested')


def test_a_run_prints_a_settings_summary_and_evaluation_lines_naming_the_ema_model(imagefolder):
    proc = run_cli('--data-path', imagefolder, '--model', 'test_vit', *FAST, '--epochs', 1)
    summaries = [line for line in proc.stdout.splitlines() if line.startswith('* ')]
    assert len(summaries) == 2, summaries
    assert 'Namespace(' not in proc.stdout
    assert 'train 1 epoch: --model test_vit at 32 px on IMNET' in proc.stdout  # the settings summary
    assert re.fullmatch(r'\* Acc@1 [\d.]+ Acc@5 [\d.]+ loss [\d.]+ \(24 images\)', summaries[0])
    assert re.fullmatch(r'\* EMA model: Acc@1 [\d.]+ Acc@5 [\d.]+ loss [\d.]+ \(24 images\)', summaries[1])


@pytest.fixture
def http_server(tmp_path):
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()


def test_checkpoint_url_is_downloaded_and_hash_checked(http_server, tmp_path_factory, monkeypatch):
    folder, base = http_server
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path_factory.mktemp('hub')))
    weights = {'model': {'w': torch.arange(4.0)}}
    plain = folder / 'plain.pth'
    torch.save(weights, plain)
    digest = hashlib.sha256(plain.read_bytes()).hexdigest()
    (folder / f'weights-{digest[:8]}.pth').write_bytes(plain.read_bytes())
    (folder / 'weights-deadbeef.pth').write_bytes(plain.read_bytes())

    loaded = load_checkpoint(f'{base}/weights-{digest[:8]}.pth')
    assert torch.equal(loaded['model']['w'], weights['model']['w'])
    with pytest.raises(UserError, match='hash'):
        load_checkpoint(f'{base}/weights-deadbeef.pth')
    with pytest.raises(UserError, match='https'):
        load_checkpoint('http://example.com/weights-12345678.pth')
