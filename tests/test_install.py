"""requirements.txt states the supported ranges, constraints.txt pins what CI installs, and they agree."""
import json
import subprocess
import sys

import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO


def requirements(name: str):
    lines = (line.split('#')[0].strip() for line in (REPO / name).read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def test_requirements_are_ranges_and_constraints_pin_each_one_inside_its_range():
    pins = {canonicalize_name(r.name): r for r in requirements('constraints.txt')}
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == '==' for r in pins.values())
    for req in requirements('requirements.txt'):
        assert req.specifier, f'{req}: state the lowest supported version'
        assert all(spec.operator not in ('==', '===') for spec in req.specifier), \
            f'{req}: an exact pin belongs in constraints.txt'
        pinned = next(iter(pins[canonicalize_name(req.name)].specifier)).version
        assert req.specifier.contains(pinned), f'constraints.txt pins {req.name}=={pinned}, outside {req}'


def test_ci_and_the_readme_install_with_the_constraints():
    command = 'python -m pip install -r requirements.txt -c constraints.txt'
    assert command in (REPO / '.ci' / 'run').read_text()
    assert command in (REPO / 'README.md').read_text()


CPU_ONLY = 'python -m pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu'


def test_the_requirements_ranges_keep_the_torch_already_installed(tmp_path):
    """The README's CPU-only install puts torch from PyTorch's CPU index first, then requirements.txt: pip must
    keep that torch. (CPU wheels cannot be downloaded here: offline, pip installs nothing over the torch present,
    and the range accepts a local +cpu build of it.)"""
    assert CPU_ONLY in (REPO / 'README.md').read_text()
    report = tmp_path / 'report.json'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--dry-run', '--no-index', '--quiet', '--report', report,
                    '-r', 'requirements.txt'], cwd=REPO, check=True, timeout=300)
    assert json.loads(report.read_text())['install'] == []
    torch_range = next(r.specifier for r in requirements('requirements.txt') if r.name == 'torch')
    assert torch_range.contains(torch.__version__.split('+')[0] + '+cpu')
