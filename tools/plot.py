"""Draw the training curves of one or more runs from their log.txt into one PNG.

    python -m tools.plot output/run_a output/run_b -o curves.png

Three panels against the epoch: train and test loss, test top-1 (and the EMA model's top-1 where
the run logged it), and the learning rate. Each run has one colour, labelled with its directory
name; in a panel with two curves per run, the train (or EMA) curve is dashed.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import matplotlib

matplotlib.use('Agg')  # headless: no display on compute nodes or in CI
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402

# Fixed so that the PNG is FIGSIZE * dpi pixels: predictable for reports and tests.
FIGSIZE = (15.0, 4.5)

# (panel title, y label, [(log.txt key, curve label, line style)])
PANELS = [
    ('Loss', 'loss', [('train_loss', 'train', '--'), ('test_loss', 'test', '-')]),
    ('Top-1 accuracy', 'top-1 (%)', [('test_acc1', 'test', '-'), ('test_ema_acc1', 'EMA', '--')]),
    ('Learning rate', 'learning rate', [('train_lr', None, '-')]),
]


class PlotError(Exception):
    """A missing or unreadable log: reported as one line, exit code 2.

    Not utils.UserError: utils imports torch and timm (~10 s cold), which drawing a log never needs.
    """


def read_log(run_dir: Path) -> List[dict]:
    """The epoch records of a run directory's log.txt (one JSON object per line), in epoch order."""
    log = run_dir / 'log.txt'
    if not log.is_file():
        raise PlotError(f'{run_dir} has no log.txt: give the --output_dir of a main.py run')
    records = []
    for number, line in enumerate(log.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise PlotError(f'{log} line {number} is not JSON: is it a main.py log?') from None
    records = [r for r in records if 'epoch' in r]
    if not records:
        raise PlotError(f'{log} holds no epoch yet')
    return sorted(records, key=lambda r: r['epoch'])


def run_labels(run_dirs: Sequence[Path]) -> List[str]:
    """Directory names as legend labels; the paths as given when two runs share a name."""
    names = [d.resolve().name for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [str(d) for d in run_dirs]


def series(records: Sequence[dict], key: str) -> Tuple[List[int], List[float]]:
    """(epochs, values) of one logged metric, skipping epochs that did not log it."""
    points = [(r['epoch'], r[key]) for r in records if r.get(key) is not None]
    return [e for e, _ in points], [v for _, v in points]


def draw(runs: Dict[str, List[dict]], title: str = '') -> plt.Figure:
    """One figure, one panel per entry of PANELS, one colour per run."""
    fig, axes = plt.subplots(1, len(PANELS), figsize=FIGSIZE)
    colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
    for ax, (panel_title, ylabel, curves) in zip(axes, PANELS):
        for index, (run, records) in enumerate(runs.items()):
            for key, curve, style in curves:
                epochs, values = series(records, key)
                if epochs:
                    ax.plot(epochs, values, style, marker='.', color=colours[index % len(colours)],
                            label=f'{run} {curve}' if curve else run)
        ax.set_title(panel_title)
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize='small')
    axes[-1].ticklabel_format(axis='y', style='sci', scilimits=(-2, 3))  # lr values like 5e-4
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_runs(run_dirs: Sequence[Path], output: Path, title: str = '', dpi: int = 100) -> None:
    """Read every run's log.txt and write the curves to ``output`` (format from its suffix)."""
    runs = dict(zip(run_labels(run_dirs), (read_log(d) for d in run_dirs)))
    fig = draw(runs, title)
    try:
        fig.savefig(output, dpi=dpi)  # no bbox_inches='tight': it would change the pixel size
    except (ValueError, OSError) as e:
        raise PlotError(f'cannot write {output}: {e}') from None
    finally:
        plt.close(fig)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('python -m tools.plot', description=__doc__.split('\n\n')[0])
    parser.add_argument('run_dirs', nargs='+', type=Path, metavar='OUTPUT_DIR',
                        help='--output_dir of a main.py run (holding log.txt)')
    parser.add_argument('-o', '--output', type=Path, default=Path('curves.png'), help='image to write')
    parser.add_argument('--title', default='', help='title above the panels')
    parser.add_argument('--dpi', type=int, default=100,
                        help=f'pixels per inch: the image is {FIGSIZE[0]:g} x {FIGSIZE[1]:g} inches')
    return parser


def cli(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        if args.dpi <= 0:
            raise PlotError(f'--dpi must be positive, got {args.dpi}')
        plot_runs(args.run_dirs, args.output, args.title, args.dpi)
    except PlotError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'wrote {args.output}')
    return 0


if __name__ == '__main__':
    sys.exit(cli())
