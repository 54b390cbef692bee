"""quickstart.py end to end on DIGITS, one epoch per run (the real one takes minutes); args.yaml."""
import argparse
import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

import config
import main
import quickstart as quickstart_py
from conftest import REPO, run_cli


SMALL = ['--epochs', '1', '--batch-size', '100', '--data-set', 'DIGITS-100']


@pytest.fixture(scope='module')
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp('quickstart')
    printed = io.StringIO()
    with redirect_stdout(printed):  # its three runs are main.py processes of their own
        # main.py flags after its own reach every run: one epoch on DIGITS' 100-image training split
        assert quickstart_py.main(['--output', str(out), '--threads', '1', *SMALL]) == 0
    return out, printed.getvalue()


def read_args(path):
    return yaml.safe_load(path.read_text())


def test_teacher_then_distilled_and_plain_students_and_a_table(quickstart):
    out, stdout = quickstart
    assert stdout.index('== teacher') < stdout.index('== distilled') < stdout.index('== plain')
    assert '[plain] epoch  0' in stdout  # one progress line per epoch
    table = stdout[stdout.index('| run |'):].splitlines()
    assert [row.split('|')[1].split(':')[0].strip() for row in table[2:5]] == ['teacher', 'distilled', 'plain']
    assert 'The distillation studies (docs/distillation-study.md):' in stdout
    assert stdout.count('DeiT⚗ (both heads) - plain: ') == len(quickstart_py.study_decisions()) == 3

    teacher, distilled, plain = (read_args(out / run / 'args.yaml') for run in ('teacher', 'distilled', 'plain'))
    assert teacher['model'] == 'regnety_tiny_os8'
    assert all(run['data_set'] == 'DIGITS-100' and run['epochs'] == 1 for run in (teacher, distilled, plain))
    assert distilled['distillation_type'] == 'hard' and plain['distillation_type'] == 'none'
    assert distilled['teacher_path'] == str(out / 'teacher' / 'checkpoint.pth')
    assert (distilled['model'], plain['model']) == ('deit_micro_distilled_patch4_16', 'deit_micro_patch4_16')
    different = {k for k in plain if plain[k] != distilled[k]}
    assert different == {'model', 'distillation_type', 'teacher_model', 'teacher_path', 'output_dir'}  # same budget


def test_without_flags_every_run_trains_on_digits(tmp_path):
    parser = main.get_args_parser()
    runs = {stage.name: config.parse_args(argparse.ArgumentParser(parents=[parser]), stage.argv)
            for stage in quickstart_py.stages(tmp_path, [])}
    assert list(runs) == ['teacher', 'distilled', 'plain']
    assert all(args.data_set == 'DIGITS' for args in runs.values())


def test_args_yaml_is_a_valid_config_and_is_rewritten_on_resume(quickstart):
    out, _ = quickstart
    teacher = out / 'teacher'
    saved = read_args(teacher / 'args.yaml')
    assert 'distributed' not in saved and 'config' not in saved  # run state and --config are not settings
    parser = main.get_args_parser()
    assert config.load_config(str(teacher / 'args.yaml'), parser) == saved

    proc = run_cli('--config', teacher / 'args.yaml', '--epochs', 2, '--resume', teacher / 'checkpoint.pth')
    assert 'Continuing at epoch 1' in proc.stdout
    resumed = read_args(teacher / 'args.yaml')
    assert (resumed['epochs'], resumed['resume']) == (2, str(teacher / 'checkpoint.pth'))


def test_a_bad_flag_stops_it_with_main_pys_error_line(tmp_path):
    with pytest.raises(SystemExit) as stop:  # the message of sys.exit: one stderr line, exit code 1
        quickstart_py.main(['--output', str(tmp_path), '--epochs', 'x'])
    first, second = stop.value.code.strip().splitlines()
    assert first.endswith("error: argument --epochs: invalid int value: 'x'")
    assert second.startswith('teacher failed (exit 2)') and 'Traceback' not in stop.value.code


# Every README command that runs on a CPU, in README order, in a fresh directory: tiny data and one epoch
# substituted, outputs under tmp/ instead of the repository's output/. The quickstart is the fixture's run.
NEEDS_MORE_THAN_A_CPU = {'run_with_submitit.py': 'Slurm', 'tools.gpu_check': 'CUDA',
                         'tools.distillation_study': '45 minutes (its machinery runs below at toy scale)'}


def cpu_runnable(command: str, program: str) -> bool:
    """Not a download (https://), ImageNet, several GPUs (torchrun, launch), an elided command (...) or a
    program that needs more than a CPU."""
    return not (program in NEEDS_MORE_THAN_A_CPU or command.startswith(('torchrun', 'HF_HUB_OFFLINE'))
                or any(word in command for word in ('https://', '/path/to/imagenet', 'torch.distributed', '...')))


def test_every_readme_command_that_runs_on_a_cpu_exits_0(quickstart, imagefolder, tmp_path, capsys):
    import benchmark
    import export
    import predict
    from test_docs import program_and_argv, shell_commands
    from tools import plot
    quickstart_out, _ = quickstart
    ran = []
    for command in shell_commands((REPO / 'README.md').read_text()):
        program, argv = program_and_argv(command)
        if not program or not cpu_runnable(command, program):
            continue
        argv = [word.replace('output/quickstart', str(quickstart_out)).replace('output/', f'{tmp_path}/output/')
                .replace('/path/to/imagefolder', str(imagefolder)).replace('photos/', f'{imagefolder}/val/')
                .replace('more/*.jpg', f'{imagefolder}/train/class_0/*.jpg') for word in argv]
        if program == 'quickstart.py':
            code = 0 if argv == [] else 'not the command the fixture ran'  # the fixture ran it (one epoch)
        elif program == 'main.py':
            code = run_cli(*argv, *(['--epochs', '1'] if '--help' not in argv else []), check=False).returncode
        elif program == 'benchmark.py':
            code = benchmark.cli([*argv, '--quick', '--json', str(tmp_path / 'bench.json')])
        else:
            try:
                code = {'export.py': export.cli, 'predict.py': predict.cli, 'tools.plot': plot.cli}[program](argv)
            except SystemExit as e:
                code = e.code
        assert code == 0, f'README: `{command}` exited {code}: {capsys.readouterr().err[-2000:]}'
        ran.append(program)
    assert ran == ['quickstart.py', 'main.py', 'predict.py', 'export.py', 'export.py', 'tools.plot', 'main.py',
                   'benchmark.py']
    assert {p.name for p in (tmp_path / 'output' / 'tiny').iterdir()} >= {'preds.csv', 'deit_tiny.safetensors',
                                                                        'deit_tiny.onnx'}
    assert (quickstart_out / 'curves.png').is_file()


# The distillation study (tools/distillation_study.py): its statistics from known values, its plan,
# and its machinery end to end at toy scale (one setting, one seed, one epoch).

def test_study_statistics_from_known_values():
    from tools.distillation_study import difference, helps, mean_std, verdict

    assert mean_std([90.0, 92.0, 94.0]) == (92.0, 2.0)  # sample std (n - 1)
    diff, se, z = difference([90.0, 92.0, 94.0], [88.0, 88.0, 91.0])  # std 2 and sqrt(3)
    assert diff == pytest.approx(3.0) and se == pytest.approx((4 / 3 + 3 / 3) ** 0.5)
    assert z == pytest.approx(3.0 / (7 / 3) ** 0.5) and z < 2 and not helps(diff, se)
    assert helps(*difference([95.0, 96.0, 97.0], [90.0, 91.0, 92.0])[:2])  # 5 points, SE 0.82
    assert verdict(3.0, 1.4, '>') == 'holds' and verdict(-3.0, 1.4, '>') == 'reversed'
    assert verdict(2.0, 1.4, '>').startswith('unresolved') and verdict(2.0, 1.4, '=').startswith('holds')
    assert verdict(3.0, 1.4, '=').startswith('does not hold') and mean_std([1.0])[1] != mean_std([1.0])[1]  # NaN


def test_study_plan_shares_plain_runs_and_gives_each_student_its_seeds_teacher(tmp_path):
    from tools.distillation_study import plan

    runs = plan(tmp_path, ['A', 'D'], ['plain', 'deit'], [0, 1], [])
    names = [str(run.out.relative_to(tmp_path)) for run in runs]
    assert names[:4] == ['A/seed0/teacher', 'A/seed1/teacher', 'D/seed0/teacher', 'D/seed1/teacher']
    assert sorted(names[4:]) == ['A/seed0/deit', 'A/seed0/plain', 'A/seed1/deit', 'A/seed1/plain',
                                 'D/seed0/deit', 'D/seed1/deit']  # D's plain students are A's: the same command
    deit = next(run for run in runs if str(run.out.relative_to(tmp_path)) == 'D/seed1/deit')
    assert deit.teacher == tmp_path / 'D' / 'seed1' / 'teacher'
    assert str(deit.teacher / 'checkpoint.pth') in deit.stage.argv and '--mixup' not in deit.stage.argv


def test_study_setting_e_trains_8x8_patch_students_apart_from_a():
    from tools.distillation_study import plan

    planned = plan(Path('out'), ['A', 'E'], ['plain', 'deit'], [0], [])
    runs = {str(run.out.relative_to('out')): run.stage.argv for run in planned}
    assert sorted(runs) == ['A/seed0/deit', 'A/seed0/plain', 'A/seed0/teacher',
                            'E/seed0/deit', 'E/seed0/plain', 'E/seed0/teacher']  # E's plain is not A's: other model
    model = {name: argv[argv.index('--model') + 1] for name, argv in runs.items() if '--model' in argv}
    assert model == {'A/seed0/plain': 'deit_micro_patch4_16', 'A/seed0/deit': 'deit_micro_distilled_patch4_16',
                     'E/seed0/plain': 'deit_micro_patch8_16', 'E/seed0/deit': 'deit_micro_distilled_patch8_16'}
    assert runs['E/seed0/teacher'][runs['E/seed0/teacher'].index('--data-set') + 1] == 'DIGITS-100'


def test_study_runs_both_stages_and_prints_table3_in_the_papers_order(tmp_path, capsys):
    from tools import distillation_study as study

    toy = ['--output', str(tmp_path), '--settings', 'A', '--search-seeds', '0', '--confirm-seeds', '0',
           '--epochs', '1', '--warmup-epochs', '0', '--batch-size', '96']
    assert study.main(toy) == 0
    printed = capsys.readouterr().out
    search = printed[printed.index('| setting |'):].splitlines()
    assert search[2].startswith('| A: 100 labels') and 'Chosen for stage 2 (largest z): A' in printed
    table = printed[printed.index('| Table 3 row |'):].splitlines()
    assert [row.split(' | ')[0][2:] for row in table[2:9]] == [row.paper for row in study.TABLE3]
    assert table[2].endswith('| 72.2 | 81.8 |') and table[7].endswith('| 74.5 | 83.4 |')
    assert printed.count(' points, SE ') == len(study.ORDERINGS) and 'Decision: DeiT⚗ (both heads) - plain' in printed
    assert '5 runs;' in printed  # stage 2 reused stage 1's teacher, plain and DeiT⚗ of the same seed
    assert (tmp_path / 'results.md').read_text().startswith('## Stage 1')

    args = {run: read_args(tmp_path / 'A' / 'seed0' / run / 'args.yaml') for run in study.CONFIRM_VARIANTS}
    assert args['plain']['data_set'] == 'DIGITS-100' and args['plain']['batch_size'] == 96  # extra flags last
    assert read_args(tmp_path / 'A' / 'seed0' / 'teacher' / 'args.yaml')['model'] == 'regnety_tiny_os8'
    assert (args['soft']['distillation_type'], args['soft']['distillation_tau'], args['soft']['distillation_alpha'],
            args['soft']['distillation_token']) == ('soft', 3.0, 0.1, False)
    assert (args['deit']['model'], args['deit']['distillation_token']) == ('deit_micro_distilled_patch4_16', True)
    budget = {'epochs', 'batch_size', 'lr', 'seed', 'data_set', 'mixup', 'smoothing', 'warmup_epochs'}
    assert all(args[run][k] == args['plain'][k] for run in args for k in budget)  # the same budget

    consoles = {path: path.stat().st_mtime_ns for path in tmp_path.glob('A/seed0/*/console.txt')}
    assert study.main(toy) == 0  # done runs are read back, not rerun
    assert capsys.readouterr().out.count('A/seed0/') == 8  # 3 runs of stage 1, 5 of stage 2
    assert consoles == {path: path.stat().st_mtime_ns for path in tmp_path.glob('A/seed0/*/console.txt')}
