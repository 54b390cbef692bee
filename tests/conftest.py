import functools
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
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


@pytest.fixture(scope='module')
def one_torch_thread():
    """Small models on busy shared cores: a second intra-op thread mostly waits (model init was 20x slower)."""
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
    run_main('--data-path', imagefolder, '--model', 'regnety_002', '--epochs', '1', '--lr', '5e-3',
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
