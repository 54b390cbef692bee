"""``--config FILE.yaml``: parser defaults from a YAML file, and the run's arguments as ``args.yaml``
(and as the plain data a checkpoint saves).

The keys of a config are flag names, spelled like the flag (``batch-size``) or like its argparse
destination (``batch_size``). The file replaces the parser's defaults, so flags given on the
command line still win. A mistake in the file (unknown key, wrong type) is a ``UserError`` naming
the key.
"""
import argparse
import difflib
import os
from pathlib import Path
from typing import Dict, List, Optional

import yaml

from utils import UserError, is_main_process, is_url, write_text_atomic

class HelpFormatter(argparse.HelpFormatter):
    """Each flag's help ends with its default, except where there is none to show: a switch that is off
    unless given (or the negation of one that is on), and an unset value (None, '') whose help says what
    unset means."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=34)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ''
        default = action.default
        if ('%(default)' in text or default is None or default is False or default == ''
                or default is argparse.SUPPRESS or isinstance(action, argparse._StoreFalseAction)):
            return text
        if action.nargs == 0:  # a switch that is on by default
            return text + ' (default: on)'
        return text + ' (default: %(default)s)'


class CommandLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose --help shows defaults and whose mistakes are one ``error:`` line (exit 2)
    without the usage block; an unknown flag is answered with the closest known one."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('formatter_class', HelpFormatter)
        kwargs.setdefault('usage', '%(prog)s [flags]  (--help: every flag with its default, by group)')
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(self.unknown_arguments(unknown))
        return parsed

    def unknown_arguments(self, unknown: List[str]) -> str:
        """'unrecognized argument --batchsize: did you mean --batch-size?' for the first unknown flag."""
        flags = [word for word in unknown if word.startswith('-')]
        if not flags:
            return f'unrecognized arguments: {" ".join(unknown)} (flags start with --)'
        given = flags[0].split('=', 1)[0]
        known = [flag for action in self._actions for flag in action.option_strings]
        close = closest_flags(given, known)
        more = f' (and {len(flags) - 1} more)' if len(flags) > 1 else ''
        return (f'unrecognized argument {given}{more}: '
                + (f'did you mean {" or ".join(close)}?' if close else 'see --help for the flags'))

    def error(self, message: str):
        self.exit(2, f'error: {message}\n')


def closest_flags(given: str, known: List[str], n: int = 2) -> List[str]:
    """The known flags nearest to ``given``, spelling differences of - and _ and of case ignored."""
    def norm(flag: str) -> str:
        return flag.lstrip('-').replace('_', '-').lower()
    by_norm = {}
    for flag in known:
        by_norm.setdefault(norm(flag), flag)
    return [by_norm[m] for m in difflib.get_close_matches(norm(given), by_norm, n=n, cutoff=0.6)]


# Options that are not run settings: --config itself (configs do not nest) and --help.
NOT_KEYS = ('config', 'help')


def _actions_by_key(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    """Each valid key (dest, and every long flag without its dashes) -> the action that stores it.

    Negated switches (``--no-model-ema``) are left out: their key is the positive dest
    (``model_ema: false``), which avoids two keys for one setting.
    """
    keys = {}
    for action in parser._actions:
        if action.dest in NOT_KEYS or action.dest == argparse.SUPPRESS:
            continue
        keys.setdefault(action.dest, action)
        if not isinstance(action, argparse._StoreFalseAction):
            for flag in action.option_strings:
                if flag.startswith('--'):
                    keys.setdefault(flag[2:], action)
    return keys


def _convert(action: argparse.Action, key: str, value, path: str):
    """``value`` checked and converted as argparse would convert it on the command line."""
    where = f'{key!r} in --config {path}'
    if value is None:
        if action.default is not None:
            raise UserError(f'{where} may not be empty (its default is {action.default!r})')
        return None
    if action.nargs == 0:  # a switch: store_true / store_false
        if not isinstance(value, bool):
            raise UserError(f'{where} must be true or false, got {value!r}')
        return value
    if isinstance(action.nargs, int) or action.nargs in ('+', '*'):
        items = value if isinstance(value, list) else [value]
        return [_convert_one(action, where, item) for item in items]
    if isinstance(value, (list, dict)):
        raise UserError(f'{where} takes one value, got {value!r}')
    return _convert_one(action, where, value)


def _convert_one(action: argparse.Action, where: str, value):
    # Through str() like a command-line word: PyYAML reads 5e-4 (no dot) as a string, and a bool
    # or a fraction must not pass silently as an int.
    convert = action.type or str
    try:
        result = convert(str(value))
    except (TypeError, ValueError):
        raise UserError(f'{where} must be {getattr(convert, "__name__", "valid")}, got {value!r}') from None
    if action.choices is not None and result not in action.choices:
        raise UserError(f'{where} is {result!r}, not one of {", ".join(map(str, action.choices))}')
    return result


def load_config(path: str, parser: argparse.ArgumentParser) -> Dict[str, object]:
    """The settings of a YAML config as ``{dest: value}``, ready for ``parser.set_defaults``."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding='utf-8'))
    except OSError as e:
        raise UserError(f'cannot read --config {path}: {e.strerror}') from None
    except yaml.YAMLError as e:
        raise UserError(f'--config {path} is not valid YAML: {str(e).splitlines()[0]}') from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f'--config {path} must map flag names to values, found a {type(data).__name__}')

    actions = _actions_by_key(parser)
    settings = {}
    for key, value in data.items():
        action = actions.get(str(key))
        if action is None:
            close = difflib.get_close_matches(str(key), actions, n=1)
            raise UserError(f'unknown key {key!r} in --config {path}'
                            + (f': did you mean {close[0]!r}?' if close else ''))
        if action.dest in settings:
            raise UserError(f'{key!r} in --config {path} sets {action.dest} a second time')
        settings[action.dest] = _convert(action, str(key), value, path)
    return settings


# Settings that name files or folders: ``~`` and ``$VARS`` in them are expanded as a shell would have,
# since a config file (or a quoted or ``--flag=~/x`` word) reaches the program unexpanded.
PATH_KEYS = ('config', 'data_path', 'output_dir', 'resume', 'finetune', 'teacher_path', 'job_dir')


def expand_path(value: str) -> str:
    """``~`` and environment variables expanded, as in a shell; URLs and 'auto' as they are."""
    if not value or value == 'auto' or is_url(value):
        return value
    return os.path.expandvars(os.path.expanduser(value))


def parse_args(parser: argparse.ArgumentParser, argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Two passes: read ``--config`` alone, make the file's settings the defaults, then parse all.

    A config mistake exits like an argparse error (code 2), as one ``error: ...`` line. Paths
    (PATH_KEYS) are expanded, from the file and from the flags alike.
    """
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument('--config', default='')
    known, _ = first.parse_known_args(argv)
    if known.config:
        try:
            parser.set_defaults(**load_config(expand_path(known.config), parser))
        except UserError as e:
            parser.exit(2, f'error: {e}\n')
    args = parser.parse_args(argv)
    for key in PATH_KEYS:
        if isinstance(getattr(args, key, None), str):
            setattr(args, key, expand_path(getattr(args, key)))
    return args


def save_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Rank 0 writes ``output_dir/args.yaml``: this run's value of every parser setting, as plain data.

    Only the parser's settings are written (not the run state that main() adds), so the file is
    itself a valid ``--config`` that repeats the run.
    """
    # An --eval run into a training run's output_dir must not replace that run's args.yaml.
    if not args.output_dir or args.eval or not is_main_process():
        return
    # --distributed is accepted but the environment decides it (init_distributed_mode): run state, not a setting
    dests = {action.dest for action in _actions_by_key(parser).values()} - {'distributed'}
    plain = {k: v for k, v in plain_args(args).items() if k in dests}
    # args.lr is the lr this run used, already scaled to its batch: repeated as it is, not scaled again
    plain['unscale_lr'] = True
    source = f' (defaults from --config {args.config})' if getattr(args, 'config', '') else ''
    header = f'# The arguments of this run{source}; repeat it with --config this file.\n'
    write_text_atomic(os.path.join(args.output_dir, 'args.yaml'), header + yaml.safe_dump(plain, sort_keys=False))


def plain_args(args: argparse.Namespace) -> Dict[str, object]:
    """The arguments as plain data (a device or a path as its string): what args.yaml holds, and what a
    checkpoint saves so that it loads with torch.load(weights_only=True)."""
    return {k: _plain(v) for k, v in vars(args).items()}


def _plain(value):
    if value is None or isinstance(value, (bool, float)):
        return value
    if isinstance(value, int):
        return int(value)  # a plain int: yaml cannot write a subclass (utils.ParserDefaultInt)
    if isinstance(value, str):
        return str(value)  # a plain str: yaml cannot write a subclass (utils.DEFAULT_DEVICE)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)  # e.g. torch.device
