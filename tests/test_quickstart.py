"""quickstart.py end to end on DIGITS, one epoch per run (the real one takes minutes); args.yaml."""
import sys

import pytest
import yaml

import config
import main
from conftest import run_main


@pytest.fixture(scope='module')
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp('quickstart')
    proc = run_main('--output', out, '--threads', '1', '--epochs', '1', '--batch-size', '128',
                    launcher=(sys.executable, 'quickstart.py'))
    return out, proc.stdout


def read_args(path):
    return yaml.safe_load(path.read_text())


def test_teacher_then_distilled_and_plain_students_and_a_table(quickstart):
    out, stdout = quickstart
    assert stdout.index('== teacher') < stdout.index('== distilled') < stdout.index('== plain')
    assert '[plain] epoch  0' in stdout  # one progress line per epoch
    table = stdout[stdout.index('| run |'):].splitlines()
    assert [row.split('|')[1].split(':')[0].strip() for row in table[2:]] == ['teacher', 'distilled', 'plain']

    teacher, distilled, plain = (read_args(out / run / 'args.yaml') for run in ('teacher', 'distilled', 'plain'))
    assert teacher['model'] == 'regnety_tiny_os8' and teacher['data_set'] == 'DIGITS'
    assert distilled['distillation_type'] == 'hard' and plain['distillation_type'] == 'none'
    assert distilled['teacher_path'] == str(out / 'teacher' / 'checkpoint.pth')
    assert (distilled['model'], plain['model']) == ('deit_micro_distilled_patch4_16', 'deit_micro_patch4_16')
    different = {k for k in plain if plain[k] != distilled[k]}
    assert different == {'model', 'distillation_type', 'teacher_model', 'teacher_path', 'output_dir'}  # same budget


def test_args_yaml_is_a_valid_config_and_is_rewritten_on_resume(quickstart):
    out, _ = quickstart
    teacher = out / 'teacher'
    saved = read_args(teacher / 'args.yaml')
    assert 'distributed' not in saved and 'config' not in saved  # run state and --config are not settings
    parser = main.get_args_parser()
    assert config.load_config(str(teacher / 'args.yaml'), parser) == saved

    proc = run_main('--config', teacher / 'args.yaml', '--epochs', 2, '--resume', teacher / 'checkpoint.pth')
    assert 'Continuing at epoch 1' in proc.stdout
    resumed = read_args(teacher / 'args.yaml')
    assert (resumed['epochs'], resumed['resume']) == (2, str(teacher / 'checkpoint.pth'))


def test_a_bad_flag_stops_it_with_main_pys_error_line(tmp_path):
    proc = run_main('--output', tmp_path, '--epochs', 'x', launcher=(sys.executable, 'quickstart.py'), check=False)
    assert proc.returncode == 1
    first, second = proc.stderr.strip().splitlines()
    assert first.endswith("error: argument --epochs: invalid int value: 'x'")
    assert second.startswith('teacher failed (exit 2)') and 'Traceback' not in proc.stderr
