"""The multi-node path against a real Slurm cluster (scripts/local_slurm.sh start).

Each job runs 1 node x 2 CPU tasks (gloo) through run_with_submitit.py, as a user would.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit

from conftest import REPO, run_cli

pytestmark = pytest.mark.slurm

DEFAULT_CONF = '/tmp/slurm-lab/etc/slurm.conf'
START_HINT = 'start one with `bash scripts/local_slurm.sh start` and `export SLURM_CONF=/tmp/slurm-lab/etc/slurm.conf`'


def slurm_env() -> dict:
    return dict(os.environ, SLURM_CONF=os.environ.get('SLURM_CONF', DEFAULT_CONF), OMP_NUM_THREADS='1',
                PYTHONUNBUFFERED='1')


@pytest.fixture(scope='module', autouse=True)
def slurm_cluster():
    env = slurm_env()
    up = shutil.which('sinfo') and Path(env['SLURM_CONF']).is_file() and subprocess.run(
        ['sinfo', '-h'], env=env, capture_output=True, timeout=30).returncode == 0
    if not up:
        if os.environ.get('CI') == 'true':
            pytest.fail(f'no Slurm cluster in CI: .ci/run must {START_HINT.split("`")[1]}')
        pytest.skip(f'no Slurm cluster: {START_HINT}')
    os.environ['SLURM_CONF'] = env['SLURM_CONF']  # for submitit's sacct/scancel calls from this process


def submit(tmp_path, *train_args, epochs=2, model='test_vit'):
    """Submit through the real command line; returns submitit's handle on the job."""
    argv = ['run_with_submitit.py', '--ngpus', '0', '--nodes', '1', '--ntasks-per-node', '2',
            '--cpus-per-task', '1', '--timeout', '60', '--job_dir', str(tmp_path / 'jobs' / '%j'),
            '--model', model, '--input-size', '32', '--batch-size', '6', '--epochs', str(epochs),
            '--warmup-epochs', '0', '--cooldown-epochs', '0', '--num_workers', '0', '--print-freq', '100',
            '--no-model-ema', '--dist-eval', *map(str, train_args)]
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=slurm_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r'Submitted job_id: (\d+)', proc.stdout).group(1)
    out_dir = tmp_path / 'jobs' / job_id
    assert f'Checkpoints and log.txt: {out_dir}' in proc.stdout
    return submitit.SlurmJob(folder=tmp_path / 'jobs' / '%j', job_id=job_id), out_dir


FINAL_STATES = {'COMPLETED', 'FAILED', 'CANCELLED', 'TIMEOUT', 'OUT_OF_MEMORY', 'NODE_FAIL', 'PREEMPTED'}


def wait_done(job, timeout):
    """Wait until Slurm's accounting shows the job in a final state (a requeue is not one)."""
    deadline = time.time() + timeout
    while job.watcher.get_state(job.job_id, mode='force').split()[0] not in FINAL_STATES:
        if time.time() > deadline:
            job.cancel(check=False)
            pytest.fail(f'job {job.job_id} not done after {timeout}s (state {job.state}):\n{job.stderr()}')
        time.sleep(1)
    return job.state.split()[0]


def epochs_logged(out_dir):
    return [json.loads(line)['epoch'] for line in (out_dir / 'log.txt').read_text().splitlines()]


def test_two_task_job_trains_and_its_checkpoint_evaluates(imagefolder, tmp_path):
    job, out_dir = submit(tmp_path, '--data-path', imagefolder, epochs=2)
    assert wait_done(job, timeout=240) == 'COMPLETED', job.stderr()
    stdout = job.stdout()
    assert 'distributed init (rank 0, world 2, gloo)' in stdout
    log = [json.loads(line) for line in (out_dir / 'log.txt').read_text().splitlines()]
    assert [row['epoch'] for row in log] == [0, 1]
    proc = run_cli('--data-path', imagefolder, '--model', 'test_vit', '--input-size', '32',
                   '--device', 'cpu', '--num_workers', '0', '--eval', '--resume', out_dir / 'checkpoint.pth')
    acc1 = float(re.findall(r'\* Acc@1 ([\d.]+)', proc.stdout)[-1])
    assert acc1 == pytest.approx(log[-1]['test_acc1'], abs=1e-3)


def test_preempted_job_is_requeued_and_resumes(imagefolder, tmp_path):
    # DeiT-Ti's epochs last long enough to preempt the job between its first and its last one
    job, out_dir = submit(tmp_path, '--data-path', imagefolder, epochs=5, model='deit_tiny_patch4_32')
    deadline = time.time() + 180
    while not (out_dir / 'checkpoint.pth').is_file():  # epoch 0 is done
        assert time.time() < deadline and not job.done(force_check=True), f'no epoch finished:\n{job.stderr()}'
        time.sleep(0.5)
    job._interrupt()  # what Slurm sends on preemption: SIGTERM, then USR2
    assert wait_done(job, timeout=300) == 'COMPLETED', job.stderr()
    stdout = job.stdout()
    assert 'Requeuing' in stdout or 'Requeuing' in job.stderr()
    resumed_at = [int(e) for e in re.findall(r'Continuing at epoch (\d+)', stdout)]
    assert len(resumed_at) == 1 and 1 <= resumed_at[0] <= 4, stdout[-3000:]
    assert epochs_logged(out_dir) == [0, 1, 2, 3, 4]


def test_failing_job_is_reported_failed_with_its_error(tmp_path):
    job, _ = submit(tmp_path, '--data-path', tmp_path / 'missing-data', epochs=1)
    assert wait_done(job, timeout=120) == 'FAILED'
    with pytest.raises(Exception) as failure:
        job.result()
    text = str(failure.value) + job.stderr()
    assert 'missing-data is not a directory' in text
