"""README.md, CONTRIBUTING.md and docs/*.md stay true to the code: every command they give parses with the current command
line (nothing runs), every relative link and #anchor resolves, every `module.name` they cite exists."""
import argparse
import importlib
import re
import shlex
from typing import Iterator, List, Tuple

import pytest

import benchmark
import config
import export
import main
import predict
import quickstart
import run_with_submitit
from conftest import REPO
from tools import distillation_study, eval_table, gpu_check, pack_shards, plot, teacher_agreement

DOCS = [REPO / 'README.md', REPO / 'CONTRIBUTING.md', *sorted((REPO / 'docs').glob('*.md'))]
FENCED = re.compile(r'```(\w*)\n(.*?)```', re.S)
# Programs whose commands are not the project's.
NOT_OURS = ('pip', 'pytest', 'tensorboard')


def shell_commands(text: str) -> Iterator[str]:
    """The commands of the ```bash blocks (continuation lines joined, $VARS of the block expanded) and of
    the inline `python ...` / `torchrun ...` spans."""
    for language, block in FENCED.findall(text):
        if language != 'bash':
            continue
        variables = {}
        for line in block.replace('\\\n', ' ').splitlines():
            line = re.sub(r'\s+#.*$', '', line).strip()
            assignment = re.fullmatch(r'([A-Z_]+)="(.*)"', line)
            if assignment:
                variables[assignment[1]] = assignment[2]
            elif line:
                yield re.sub(r'\$([A-Z_]+)', lambda m: variables[m[1]], line)
    prose = FENCED.sub('', text).replace('\n', ' ')
    yield from re.findall(r'`((?:python|torchrun|OMP_NUM_THREADS=\S+ python) [^`]*)`', prose)


def program_and_argv(command: str) -> Tuple[str, List[str]]:
    """('main.py', [...]) for `python main.py ...`, `torchrun ... main.py ...` and the old launcher;
    ('tools.plot', [...]) for `python -m tools.plot ...`; ('', []) for what is not a project command."""
    words = [w for w in shlex.split(command.replace('...', '')) if not re.fullmatch(r'[A-Z_]+=\S*', w)]
    if words[:1] == ['torchrun'] or words[:3] == ['python', '-m', 'torch.distributed.launch']:
        scripts = [i for i, word in enumerate(words) if word.endswith('.py')]
        words = words[scripts[0]:] if scripts else []
    elif words[:2] == ['python', '-m']:
        words = words[2:]
    elif words[:1] == ['python']:
        words = words[1:]
    else:
        return '', []
    if not words or words[0] in NOT_OURS or words[0].startswith('torch.'):
        return '', []
    return words[0], words[1:]


def main_args(argv: List[str]) -> argparse.Namespace:
    return config.parse_args(argparse.ArgumentParser(parents=[main.get_args_parser()]), argv)


def parse(program: str, argv: List[str]) -> None:
    """Parse argv as `program` would, with its real parser; a bad flag or value raises SystemExit."""
    own_flags_then_main = {'quickstart.py': quickstart, 'tools.distillation_study': distillation_study,
                           'tools.eval_table': eval_table}
    parsers = {'benchmark.py': benchmark, 'export.py': export, 'tools.plot': plot, 'tools.gpu_check': gpu_check,
               'tools.teacher_agreement': teacher_agreement, 'tools.pack_shards': pack_shards,
               'predict.py': predict}
    if argv == ['--help']:
        argv = []
    if program == 'main.py':
        main_args(argv)
    elif program == 'run_with_submitit.py':
        run_with_submitit.parse_args(argv)
    elif program in own_flags_then_main:
        _, extra = own_flags_then_main[program].get_args_parser().parse_known_args(argv)
        main_args(extra)
    else:
        assert program in parsers, f'{program}: a documented program this test does not know'
        parsers[program].get_args_parser().parse_args(argv)


def documented_commands() -> List[Tuple[str, str]]:
    return [(path.relative_to(REPO).as_posix(), command) for path in DOCS
            for command in shell_commands(path.read_text()) if program_and_argv(command)[0]]


def test_the_docs_give_commands_of_every_program():
    programs = {program_and_argv(command)[0] for _, command in documented_commands()}
    assert {'main.py', 'run_with_submitit.py', 'benchmark.py', 'quickstart.py', 'export.py', 'tools.plot',
            'tools.gpu_check', 'tools.distillation_study', 'tools.teacher_agreement', 'tools.pack_shards',
            'tools.eval_table', 'predict.py'} <= programs


@pytest.mark.parametrize('where,command', documented_commands(),
                         ids=[f'{where}:{program_and_argv(command)[0]}' for where, command in documented_commands()])
def test_documented_command_parses_with_the_current_cli(where, command, capsys):
    program, argv = program_and_argv(command)
    try:
        parse(program, argv)
    except SystemExit:
        pytest.fail(f'{where}: `{command}` does not parse: {capsys.readouterr().err.strip().splitlines()[-1]}')


def github_anchor(heading: str) -> str:
    """The #fragment GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def anchors(text: str) -> set:
    return {github_anchor(m[1]) for m in re.finditer(r'^#+\s+(.*)$', FENCED.sub('', text), re.M)}


def test_every_relative_link_and_anchor_of_the_docs_resolves():
    broken = []
    for path in DOCS:
        text = path.read_text()
        for link in re.findall(r'\]\(([^)\s]+)\)', FENCED.sub('', text)):
            if re.match(r'\w+://', link):
                continue
            target, _, fragment = link.partition('#')
            file = (path.parent / target) if target else path
            if not file.exists() or fragment and fragment not in anchors(file.read_text()):
                broken.append(f'{path.relative_to(REPO)}: {link}')
    assert not broken


def test_every_module_name_the_docs_cite_exists():
    modules = {p.stem for p in REPO.glob('*.py')}
    files = ('pth', 'py', 'yaml', 'txt', 'csv', 'json', 'md', 'safetensors', 'lock', 'sh', 'tar', 'gz')
    missing = []
    for path in DOCS:
        for span in re.findall(r'`([^`\n]+)`', FENCED.sub('', path.read_text())):
            for module, name in re.findall(r'(?<![\w./])([a-z_]+)\.([A-Za-z_]\w*)', span):
                if module in modules and name not in files and not hasattr(importlib.import_module(module), name):
                    missing.append(f'{path.relative_to(REPO)}: {module}.{name}')
    assert not missing
