"""User mistakes end in one 'error:' line and a non-zero exit, before any work is done."""
import hashlib
import http.server
import threading
from functools import partial

import pytest
import torch

import main
from conftest import FAST, run_main
from utils import UserError
from weights import load_checkpoint


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'Traceback' not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0]


def test_missing_data_path(tmp_path):
    proc = run_main('--data-path', tmp_path / 'nope', '--model', 'deit_tiny_patch4_32', *FAST, check=False)
    assert_one_line_error(proc, 'nope', 'is not a directory')


@pytest.mark.parametrize('flag,value', [('--batch-size', '0'), ('--epochs', '0'), ('--lr', '-1')])
def test_impossible_numbers(imagefolder, flag, value):
    proc = run_main('--data-path', imagefolder, '--model', 'deit_tiny_patch4_32', *FAST, flag, value, check=False)
    assert_one_line_error(proc, flag)


def test_unknown_model_and_missing_teacher(imagefolder, tmp_path):
    proc = run_main('--data-path', imagefolder, '--model', 'deit_tiny_patch99', *FAST, check=False)
    assert_one_line_error(proc, 'unknown --model deit_tiny_patch99')
    proc = run_main('--data-path', imagefolder, '--model', 'deit_tiny_distilled_patch4_32', *FAST,
                    '--distillation-type', 'hard', '--teacher-path', tmp_path / 'teacher.pth', check=False)
    assert_one_line_error(proc, '--teacher-path', 'does not exist')


def test_distillation_needs_a_distilled_student(imagefolder, teacher_checkpoint):
    proc = run_main('--data-path', imagefolder, '--model', 'deit_tiny_patch4_32', *FAST, '--distillation-type',
                    'hard', '--teacher-model', 'regnety_002', '--teacher-path', teacher_checkpoint, check=False)
    assert_one_line_error(proc, 'no distillation head', '_distilled_')


def test_foreign_checkpoint_names_the_mismatch(imagefolder, teacher_checkpoint):
    proc = run_main('--data-path', imagefolder, '--model', 'deit_tiny_patch4_32', *FAST, '--eval',
                    '--resume', teacher_checkpoint, check=False)
    assert_one_line_error(proc, 'does not fit the model', 'missing keys')


def test_device_falls_back_to_cpu_with_one_warning():
    if torch.cuda.is_available():
        pytest.skip('CUDA is present: there is nothing to fall back from')
    from utils import resolve_device
    assert resolve_device('cuda') == torch.device('cpu')


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
