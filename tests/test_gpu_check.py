"""tools/gpu_check.py run for real: on the CPU every check that needs no GPU (with CUDA, the GPU run too)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import FAST, REPO
from tools import gpu_check


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='the GPU run needs CUDA; python -m tools.gpu_check runs it'))])
def test_gpu_check_passes_every_check_its_device_can_run(device, tmp_path):
    results = tmp_path / 'results.json'
    proc = subprocess.run([sys.executable, '-m', 'tools.gpu_check', '--device', device, '--json', str(results),
                           '--out', str(tmp_path / 'runs'), '--budget', '1500' if device == 'cpu' else '450'],
                          cwd=REPO, capture_output=True, text=True, timeout=1800, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = {row['check']: row for row in json.loads(results.read_text())['rows']}
    assert all(row['result'] in ('PASS', 'SKIP', '-') for row in rows.values()), rows
    passed = {name for name, row in rows.items() if row['result'] == 'PASS'}
    assert {'SIGTERM mid-epoch', 'step checkpoints', '--resume auto after SIGTERM', 'resumed == uninterrupted',
            'compiled evaluation (distilled student)', 'compiled evaluation (plain student)',
            'no recompile: train -> eval -> train (distilled student)',
            'no recompile: train -> eval -> train (plain student)'} <= passed, rows
    assert any(name.startswith(('bf16 --compile plain', 'fp32 --compile plain')) for name in passed)
    if device == 'cpu':
        assert {name for name, row in rows.items() if row['result'] == 'SKIP'} == set(gpu_check.CUDA_ONLY)
    else:
        assert json.loads(results.read_text())['seconds'] < 8 * 60


def test_without_a_gpu_the_default_device_skips_with_one_line_and_exit_0(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert gpu_check.cli([]) == 0
    assert capsys.readouterr().out.splitlines() == [
        'gpu_check: skipped: no CUDA device here (torch.cuda.is_available() is False); '
        '--device cpu runs the checks that need no GPU']


def test_step_checkpoints_must_be_those_of_the_stopped_epoch(tmp_path):
    def verdict(*names, stopped_at=(1, 7)):
        for path in tmp_path.glob('*.pth'):
            path.unlink()
        for name in names:
            (tmp_path / name).touch()
        return gpu_check.step_checkpoint_verdict(tmp_path, stopped_at, every=2)['result']
    assert verdict('checkpoint-e0001-s000006.pth', 'checkpoint-e0001-s000007.pth') == 'PASS'
    assert verdict('checkpoint-e0001-s000007.pth') == 'FAIL'  # only the stop's own: the interval wrote none
    assert verdict('checkpoint-e0000-s000010.pth', 'checkpoint-e0001-s000007.pth') == 'FAIL'  # not pruned
    assert verdict() == 'FAIL' and verdict('checkpoint-e0001-s000006.pth', stopped_at=None) == 'FAIL'


def test_a_sync_at_a_step_without_a_progress_line_fails_the_sync_check():
    assert gpu_check.progress_steps(64, 10) == [0, 10, 20, 30, 40, 50, 60, 63]
    at_progress_lines = {step: {'engine.py:125': 1, 'utils.py:170': 2} for step in (0, 10, 20, 30, 40, 50, 60, 63)}
    assert gpu_check.sync_verdict(at_progress_lines, 64, 10)['result'] == 'PASS'
    every_step = {step: {**at_progress_lines.get(step, {}), 'timm/utils/model_ema.py:250': 1} for step in range(64)}
    verdict = gpu_check.sync_verdict(every_step, 64, 10)
    assert verdict['result'] == 'FAIL'
    assert 'at 56 steps without a progress line, from timm/utils/model_ema.py:250 x56' in verdict['detail']
    assert gpu_check.sync_verdict({}, 12, 10)['result'] == 'FAIL'  # too short an epoch to tell


def test_the_sync_probe_runs_main_py_and_writes_its_call_sites(imagefolder, tmp_path):
    sites = tmp_path / 'syncs.json'
    proc = subprocess.run([sys.executable, '-m', 'tools.gpu_check', '--sync-probe', str(sites), '--',
                           '--data-path', str(imagefolder), '--model', 'test_vit', '--epochs', '1',
                           '--no-model-ema', *FAST], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-2000:]
    # main.py trained its 6 steps (72 images, batch 12) through the probe; without CUDA nothing to count
    assert json.loads(sites.read_text()) == {'steps': 6, 'syncs': {}}
