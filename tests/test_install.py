"""requirements.txt states the supported ranges, constraints.txt pins what CI installs, and they agree."""
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
