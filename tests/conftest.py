import copy
import functools
import http.server
import io
import os
import signal
import subprocess
import sys
import threading
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import timm
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from imagefolder import make_imagefolder  # noqa: E402
import models  # noqa: E402,F401  (registers our students in timm, as main.py does)

# Flags that make a run take seconds on 2 CPU cores. fp32 (--no-amp): the default precision depends on
# the CPU (precision.py), and tests that compare numbers must not.
FAST = ['--input-size', '32', '--batch-size', '12', '--num_workers', '0', '--warmup-epochs', '0',
        '--cooldown-epochs', '0', '--print-freq', '100', '--device', 'cpu', '--no-amp']


def run_main(*args, launcher=(sys.executable, 'main.py'), timeout=300, check=True, env=None):
    """Run main.py (or a launcher) in a subprocess from the repo root; returns CompletedProcess."""
    full_env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', **(env or {}))
    proc = subprocess.run([*launcher, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f'exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}')
    return proc


def run_cli(*args, check=True) -> subprocess.CompletedProcess:
    """main.cli in this process, as run_main runs main.py: no interpreter start and torch import (seconds each).

    For what needs no process of its own (exit codes of signals, torchrun and workers do). What a run
    changes for the whole process is put back: stop-signal handlers, deterministic algorithms, glibc's
    malloc settings.
    """
    import main
    import speedups
    from checkpoint import STOP_SIGNALS
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    deterministic = torch.are_deterministic_algorithms_enabled()
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(stdout), redirect_stderr(stderr):
            try:
                code = main.cli(list(map(str, args)))
            except SystemExit as e:  # argparse and config errors exit as main.py's do
                code = e.code
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        torch.use_deterministic_algorithms(deterministic)
        speedups.keep_freed_memory(False)
    proc = subprocess.CompletedProcess(['main.py', *map(str, args)], code, stdout.getvalue(), stderr.getvalue())
    if check and code != 0:
        raise AssertionError(f'exit {code}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}')
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> str:
    """Exit ``code``, one 'error:' line holding every fragment, no traceback; returns that line."""
    assert proc.returncode == code, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def twin_vits_and_batches(steps: int):
    """Two identical seeded 10-class test_vit at 32 px (a reference and a model to compare with it), and
    ``steps`` seeded batches of 4 images as the data loader yields them."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g), [])
               for _ in range(steps)]
    torch.manual_seed(0)
    reference = timm.create_model('test_vit', num_classes=10, img_size=32)
    return reference, copy.deepcopy(reference), batches


@pytest.fixture(scope='session', autouse=True)
def one_torch_thread():
    """One intra-op thread in this process, as run_main gives each run: on 2 busy shared cores a second
    thread mostly waits for a core, and small models' steps ran many times slower with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def imagefolder(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp('data'), num_classes=3, train_per_class=24, val_per_class=8)


@pytest.fixture(scope='session')
def teacher_checkpoint(imagefolder, tmp_path_factory) -> Path:
    """A small RegNetY convnet trained for one epoch on the generated data."""
    out = tmp_path_factory.mktemp('teacher')
    run_cli('--data-path', imagefolder, '--model', 'regnety_002', '--epochs', '1', '--lr', '5e-3',
            '--no-model-ema', '--output_dir', out, *FAST)
    return out / 'checkpoint.pth'


@pytest.fixture
def weights_server(tmp_path, monkeypatch):
    """A local http server over tmp_path/'served', and a fresh torch.hub cache."""
    served = tmp_path / 'served'
    served.mkdir()
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()
