"""tools/gpu_check.py: what a CPU can check of it (its GPU runs need a GPU)."""
import json
import os
import subprocess
import sys

import torch

from conftest import FAST, REPO
from tools import gpu_check


def test_without_a_gpu_it_skips_with_one_line_and_exit_0(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert gpu_check.cli([]) == 0
    assert capsys.readouterr().out.splitlines() == [
        'gpu_check: skipped: no CUDA device here (torch.cuda.is_available() is False)']


def test_the_table_lists_every_check_and_a_failed_one_makes_the_exit_code_1():
    rows = [gpu_check.result('step checkpoints', True, 'checkpoint-e0001-s000005.pth'),
            gpu_check.result('resumed == uninterrupted', False, 'largest weight difference 0.002'),
            gpu_check.result('TF32 speeds up fp32', None, '1.00x')]
    table = gpu_check.format_table(rows, ['check', 'result', 'detail']).splitlines()
    assert [cell.strip() for cell in table[0].split('|')[1:4]] == ['check', 'result', 'detail']
    assert [line.split('|')[2].strip() for line in table[2:]] == ['PASS', 'FAIL', '-']
    assert len({len(line) for line in table}) == 1  # aligned columns
    assert gpu_check.exit_code(rows) == 1 and gpu_check.exit_code([rows[0], rows[2]]) == 0


def test_recompiles_are_counted_where_training_resumes_after_the_evaluation():
    output = '\n'.join([
        'Recompiling function forward',  # epoch 0's first steps: not counted
        'Epoch: [0] [ 0/32]', 'Test: [0/3]', 'Recompiling function forward',  # train -> eval: not counted
        '* Acc@1 25.000 Acc@5 100.000 loss 1.386 (100 images, both head)',
        '* Acc@1 25.000 Acc@5 100.000 loss 1.386 (100 images, both head)',  # the EMA's evaluation
        'Recompiling function forward',  # eval -> train: counted
        'Epoch: [1] [ 0/32]', 'Epoch: [1] [10/32]', 'Test: [0/3]'])
    assert gpu_check.recompiles_when_training_resumes(output) == 1
    assert gpu_check.recompiles_when_training_resumes('Epoch: [0] [ 0/32]') is None  # the run died early


def test_a_sync_at_a_step_without_a_progress_line_fails_the_sync_check():
    assert gpu_check.progress_steps(64, 10) == [0, 10, 20, 30, 40, 50, 60, 63]
    at_progress_lines = {step: {'engine.py:125': 1, 'utils.py:170': 2} for step in (0, 10, 20, 30, 40, 50, 60, 63)}
    assert gpu_check.sync_verdict(at_progress_lines, 64, 10)['result'] == 'PASS'
    every_step = {step: {**at_progress_lines.get(step, {}), 'timm/utils/model_ema.py:250': 1} for step in range(64)}
    verdict = gpu_check.sync_verdict(every_step, 64, 10)
    assert verdict['result'] == 'FAIL'
    assert 'at 56 steps without a progress line, from timm/utils/model_ema.py:250 x56' in verdict['detail']
    assert gpu_check.sync_verdict({}, 12, 10)['result'] == 'FAIL'  # too short an epoch to tell


def test_sigterm_is_sent_at_the_first_matching_line_and_the_output_is_kept(tmp_path):
    child = ('import signal, sys, time\n'
             'signal.signal(signal.SIGTERM, lambda *a: (print("stopped by SIGTERM", flush=True), sys.exit(143)))\n'
             'for step in range(100):\n'
             '    print(f"Epoch: [1] [{step:2d}/100]", flush=True)\n'
             '    time.sleep(0.02)\n')
    on_line, sent = gpu_check.signal_at(r'Epoch: \[1\] \[\s*10/')
    code, output = gpu_check.run_streaming([sys.executable, '-c', child], tmp_path / 'log', 60, on_line=on_line)
    assert code == 143 and sent == ['Epoch: [1] [10/100]']
    assert output.rstrip().endswith('stopped by SIGTERM') and (tmp_path / 'log').read_text() == output


def test_the_sync_probe_runs_main_py_and_writes_its_call_sites(imagefolder, tmp_path):
    sites = tmp_path / 'syncs.json'
    proc = subprocess.run([sys.executable, '-m', 'tools.gpu_check', '--sync-probe', str(sites), '--',
                           '--data-path', str(imagefolder), '--model', 'test_vit', '--epochs', '1',
                           '--no-model-ema', *FAST], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-2000:]
    # main.py trained its 6 steps (72 images, batch 12) through the probe; without CUDA nothing to count
    assert json.loads(sites.read_text()) == {'steps': 6, 'syncs': {}}
