"""Does distillation help a DeiT student on DIGITS? The pre-registered study of docs/distillation-study.md.

    python -m tools.distillation_study   # 49 runs, two at a time; output/distillation-study/

Stage 1 searches three settings (100 or 300 labelled images, the teacher's augmentation)
with seeds 0-2: per seed a teacher, the plain student and the DeiT⚗ student (distillation token).
Stage 2 takes the setting with the largest z to fresh seeds 10-14 with every student of the
paper's Table 3, applies the decision rule (DeiT⚗ beats plain by more than 2 standard errors of
the difference) and prints Table 3 in miniature next to the paper's ImageNet numbers. Every run is
main.py through quickstart.run_stage; a run already done with the same command is read back, so
an interrupted study continues where it stopped. Other flags go to every main.py run (e.g.
``--epochs 1`` for a trial of the machinery).
"""
import argparse
import json
import math
import statistics
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from quickstart import CONFIGS, REPO, Stage, run_stage

# C (longer training) and E (larger patches) are the settings of later studies, each run with its own
# seeds: see docs/distillation-study.md for their commands.
SEARCH = ('A', 'B', 'D')
SEARCH_SEEDS = (0, 1, 2)
CONFIRM_SEEDS = (10, 11, 12, 13, 14)


class Setting(NamedTuple):
    what: str
    data: List[str]     # main.py flags of its teacher and students: data, batch size, schedule
    teacher: List[str]  # main.py flags of its teacher only
    patch: int = 4      # the students' patch size: deit_micro[_distilled]_patch{4,8}_16


def student_model(patch: int, distilled: bool) -> str:
    return f'deit_micro{"_distilled" if distilled else ""}_patch{patch}_16'


_100_LABELS = ['--data-set', 'DIGITS-100', '--batch-size', '16', '--epochs', '100', '--warmup-epochs', '10']
SETTINGS = {
    'A': Setting('100 labels, 100 epochs', _100_LABELS, []),
    'B': Setting('300 labels, 34 epochs (the same steps as A)',
                 ['--data-set', 'DIGITS-300', '--batch-size', '16', '--epochs', '34', '--warmup-epochs', '3'], []),
    'C': Setting('100 labels, 150 epochs (longer)',
                 ['--data-set', 'DIGITS-100', '--batch-size', '16', '--epochs', '150', '--warmup-epochs', '10'], []),
    'D': Setting("as A, teacher with the student's augmentation", _100_LABELS,
                 ['--mixup', '0.8', '--cutmix', '1.0', '--mixup-prob', '0.5', '--reprob', '0.25']),
    'E': Setting('as A, students with 8x8 patches (4 tokens)', _100_LABELS, [], patch=8),
}

# Student variants (flags on top of student.yaml); all but plain also get the teacher.
VARIANTS = {
    'plain': [],
    'soft': ['--distillation-type', 'soft', '--no-distillation-token',
             '--distillation-alpha', '0.1', '--distillation-tau', '3.0'],  # the paper's values (its section 6)
    'hard': ['--distillation-type', 'hard', '--no-distillation-token'],
    'deit': ['--distillation-type', 'hard'],  # the distilled model of the setting's patch size
}
SEARCH_VARIANTS = ('plain', 'deit')
CONFIRM_VARIANTS = ('plain', 'soft', 'hard', 'deit')


class Row(NamedTuple):
    paper: str            # the row of the paper's Table 3
    run: str              # teacher or a key of VARIANTS
    metric: str           # the log.txt key of its last epoch
    ti: Optional[float]   # the paper's ImageNet top-1, DeiT-Ti 224
    b: Optional[float]    # the paper's ImageNet top-1, DeiT-B 224


# Touvron et al. 2021 (arXiv:2012.12877), Table 3; its teacher (RegNetY-16GF, 82.9%): section 5.2.
TABLE3 = [
    Row('DeiT, no distillation', 'plain', 'test_acc1', 72.2, 81.8),
    Row('DeiT, usual distillation (soft, class token)', 'soft', 'test_acc1', 72.2, 81.8),
    Row('DeiT, hard distillation (class token)', 'hard', 'test_acc1', 74.3, 83.0),
    Row('DeiT⚗: class embedding', 'deit', 'test_acc1_cls', 73.9, 83.0),
    Row('DeiT⚗: distil. embedding', 'deit', 'test_acc1_dist', 74.6, 83.1),
    Row('DeiT⚗: class+distillation', 'deit', 'test_acc1_both', 74.5, 83.4),
    Row('teacher (RegNetY convnet)', 'teacher', 'test_acc1', None, 82.9),
]
# The paper's orderings checked here: (row a, relation, row b), rows by their index in TABLE3.
ORDERINGS = [(2, '>', 0), (1, '=', 0), (2, '>', 1), (5, '>', 0), (4, '>', 3), (5, '>', 2), (5, '>', 6)]


class Run(NamedTuple):
    out: Path                # its output folder
    stage: Stage
    teacher: Optional[Path]  # the teacher run it needs, or None


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------

def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (n - 1; NaN for a single value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def difference(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float, float]:
    """mean(a) - mean(b), its standard error sqrt(s_a^2/n_a + s_b^2/n_b) (unpaired) and their ratio z."""
    (mean_a, std_a), (mean_b, std_b) = mean_std(a), mean_std(b)
    diff = mean_a - mean_b
    se = math.sqrt(std_a ** 2 / len(a) + std_b ** 2 / len(b))
    if math.isnan(se) or se == 0:  # one seed, or runs that agree to the last digit
        return diff, se, math.nan if math.isnan(se) or not diff else math.copysign(math.inf, diff)
    return diff, se, diff / se


def verdict(diff: float, se: float, relation: str) -> str:
    """Whether the paper's ``a relation b`` holds here: by more than 2 SE (for '=': within 2 SE)."""
    if math.isnan(se):
        return 'unresolved (one seed)'
    if relation == '=':
        return 'holds (within 2 SE)' if abs(diff) <= 2 * se else 'does not hold (more than 2 SE apart)'
    if diff > 2 * se:
        return 'holds'
    if diff < -2 * se:
        return 'reversed'
    return 'unresolved (within 2 SE)'


def helps(diff: float, se: float) -> bool:
    """The decision rule: a gain of more than 2 standard errors of the difference."""
    return diff > 2 * se


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------

def teacher_run(output: Path, name: str, seed: int, extra: List[str]) -> Run:
    setting = SETTINGS[name]
    argv = ['--config', str(CONFIGS / 'teacher.yaml'), *setting.data, *setting.teacher, '--seed', str(seed), *extra]
    return Run(output / name / f'seed{seed}' / 'teacher', Stage('teacher', 'teacher', argv), None)


def student_run(output: Path, name: str, variant: str, seed: int, extra: List[str]) -> Run:
    """A student of setting ``name``; the plain students of settings with the same data and patch are one run."""
    setting = SETTINGS[name]
    model = student_model(setting.patch, distilled=variant == 'deit')
    argv = ['--config', str(CONFIGS / 'student.yaml'), *setting.data, '--model', model, *VARIANTS[variant],
            '--seed', str(seed)]
    teacher = None
    if variant == 'plain':
        name = next(other for other, s in SETTINGS.items() if (s.data, s.patch) == (setting.data, setting.patch))
    else:
        teacher = teacher_run(output, name, seed, extra).out
        argv += ['--teacher-model', 'regnety_tiny_os8', '--teacher-path', str(teacher / 'checkpoint.pth')]
    return Run(output / name / f'seed{seed}' / variant, Stage(variant, variant, argv + extra), teacher)


def plan(output: Path, names: Sequence[str], variants: Sequence[str], seeds: Sequence[int],
         extra: List[str]) -> List[Run]:
    """Teachers first, so that a student waiting for its teacher never waits for a queued run."""
    teachers = [teacher_run(output, name, seed, extra) for name in names for seed in seeds]
    students = {run.out: run for seed in seeds for name in names for variant in variants
                for run in [student_run(output, name, variant, seed, extra)]}  # shared plain runs once
    return teachers + list(students.values())


def run_once(run: Run, threads: int) -> dict:
    """The run's last log line: read back when the same command already ran to the end, else run it."""
    done = run.out / 'result.json'
    if done.is_file():
        saved = json.loads(done.read_text())
        if saved['argv'] == run.stage.argv:
            return saved['last']
    last = run_stage(run.stage, run.out, threads, progress=False)
    done.write_text(json.dumps({'argv': run.stage.argv, 'last': last}))
    return last


def run_all(runs: List[Run], output: Path, jobs: int, threads: int) -> Dict[Path, dict]:
    """All runs, ``jobs`` at a time, each student after its teacher; one line per finished run."""
    futures: Dict[Path, Future] = {}
    count = [0]
    lock = threading.Lock()  # one whole line at a time

    def run_after_teacher(run: Run) -> dict:
        if run.teacher is not None:
            futures[run.teacher].result()
        last = run_once(run, threads)
        with lock:
            count[0] += 1
            print(f'[{count[0]:2d}/{len(runs)}] {run.out.relative_to(output)}: top-1 {last["test_acc1"]:.1f}% '
                  f'({last["seconds"]:.0f} s)', flush=True)
        return last

    pool = ThreadPoolExecutor(jobs)
    try:
        for run in runs:
            futures[run.out] = pool.submit(run_after_teacher, run)
        return {out: future.result() for out, future in futures.items()}
    finally:
        pool.shutdown(cancel_futures=True)  # after a failed run: start no other


def values(results: Dict[Path, dict], runs: List[Run], variant: str, metric: str) -> List[float]:
    return [results[run.out][metric] for run in runs if run.stage.name == variant]


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

def pm(values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    return f'{mean:.1f} ± {std:.1f}'


def search_table(results: Dict[Path, dict], runs_of: Dict[str, List[Run]]) -> str:
    rows = ['| setting | teacher | plain | DeiT⚗ (both heads) | DeiT⚗ - plain | SE | z |',
            '| --- | ---: | ---: | ---: | ---: | ---: | ---: |']
    for name, runs in runs_of.items():
        plain, deit = values(results, runs, 'plain', 'test_acc1'), values(results, runs, 'deit', 'test_acc1_both')
        diff, se, z = difference(deit, plain)
        rows.append(f'| {name}: {SETTINGS[name].what} | {pm(values(results, runs, "teacher", "test_acc1"))} '
                    f'| {pm(plain)} | {pm(deit)} | {diff:+.1f} | {se:.1f} | {z:.1f} |')
    return '\n'.join(rows)


def choose(results: Dict[Path, dict], runs_of: Dict[str, List[Run]]) -> str:
    """The setting with the largest z (the first of equals)."""
    def z(name: str) -> float:
        runs = runs_of[name]
        score = difference(values(results, runs, 'deit', 'test_acc1_both'),
                           values(results, runs, 'plain', 'test_acc1'))[2]
        return -math.inf if math.isnan(score) else score
    return max(runs_of, key=z)


def table3(results: Dict[Path, dict], runs: List[Run], seeds: int) -> str:
    rows = [f'| Table 3 row | here: top-1 %, mean ± std (n = {seeds}) | DeiT-Ti ImageNet | DeiT-B ImageNet |',
            '| --- | ---: | ---: | ---: |']
    for row in TABLE3:
        paper = [f'{v:.1f}' if v is not None else '' for v in (row.ti, row.b)]
        rows.append(f'| {row.paper} | {pm(values(results, runs, row.run, row.metric))} | {paper[0]} | {paper[1]} |')
    return '\n'.join(rows)


def orderings(results: Dict[Path, dict], runs: List[Run]) -> str:
    lines = []
    for number, (a, relation, b) in enumerate(ORDERINGS, 1):
        row_a, row_b = TABLE3[a], TABLE3[b]
        diff, se, z = difference(values(results, runs, row_a.run, row_a.metric),
                                 values(results, runs, row_b.run, row_b.metric))
        lines.append(f'{number}. {row_a.paper} {relation} {row_b.paper}: {diff:+.1f} points, SE {se:.1f}, '
                     f'z {z:.1f}: {verdict(diff, se, relation)}')
    return '\n'.join(lines)


def decision(results: Dict[Path, dict], runs: List[Run], seeds: int) -> str:
    diff, se, z = difference(values(results, runs, 'deit', 'test_acc1_both'),
                             values(results, runs, 'plain', 'test_acc1'))
    answer = 'distillation helps here' if helps(diff, se) else 'no gain shown by the rule'
    return (f'DeiT⚗ (both heads) - plain: {diff:+.1f} points, {seeds} seeds, SE {se:.1f}, '
            f'{z:.1f} standard errors: {answer} (rule: more than 2 SE).')


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def seed_list(text: str) -> List[int]:
    return [int(s) for s in text.split(',')]


def get_args_parser() -> argparse.ArgumentParser:
    """The study's own flags; the flags it does not know go to every main.py run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog='Other flags are main.py flags for every run, e.g. --epochs 1. '
                                            'The defaults are the protocol of docs/distillation-study.md.')
    parser.add_argument('--output', default=str(REPO / 'output' / 'distillation-study'))
    parser.add_argument('--jobs', type=int, default=2, help='runs at a time')
    parser.add_argument('--threads', type=int, default=1, help='CPU threads of each run (OMP_NUM_THREADS)')
    parser.add_argument('--settings', default=','.join(SEARCH), help='stage 1 settings, comma-separated')
    parser.add_argument('--search-seeds', type=seed_list, default=list(SEARCH_SEEDS))
    parser.add_argument('--confirm-seeds', type=seed_list, default=list(CONFIRM_SEEDS))
    return parser


def main(argv=None) -> int:
    parser = get_args_parser()
    args, extra = parser.parse_known_args(argv)
    output = Path(args.output)
    names = args.settings.split(',')
    unknown = [name for name in names if name not in SETTINGS]
    if unknown:
        parser.error(f'unknown --settings {",".join(unknown)}: choose among {",".join(SETTINGS)}')
    start = time.time()

    print(f'Stage 1, the search: settings {", ".join(names)}, seeds {args.search_seeds}', flush=True)
    runs_of = {name: plan(output, [name], SEARCH_VARIANTS, args.search_seeds, extra) for name in names}
    search = {run.out: run for runs in runs_of.values() for run in runs}
    results = run_all(sorted(search.values(), key=lambda run: run.teacher is not None), output, args.jobs,
                      args.threads)
    chosen = choose(results, runs_of)
    report = [f'## Stage 1, the search (seeds {", ".join(map(str, args.search_seeds))}; last-epoch top-1 %, '
              f'mean ± std)', '', search_table(results, runs_of), '',
              f'Chosen for stage 2 (largest z): {chosen}: {SETTINGS[chosen].what}.']
    print('\n' + '\n'.join(report) + '\n', flush=True)

    print(f'Stage 2, the confirmation: setting {chosen}, seeds {args.confirm_seeds}', flush=True)
    confirm = plan(output, [chosen], CONFIRM_VARIANTS, args.confirm_seeds, extra)
    results.update(run_all(confirm, output, args.jobs, args.threads))
    seeds = len(args.confirm_seeds)
    stage2 = [f'## Stage 2: Table 3 in miniature (setting {chosen}, seeds '
              f'{", ".join(map(str, args.confirm_seeds))}; last-epoch top-1 on the 360 DIGITS validation images)', '',
              table3(results, confirm, seeds), '', "The paper's orderings here:", '', orderings(results, confirm),
              '', 'Decision: ' + decision(results, confirm, seeds), '',
              f'{len(set(search) | {run.out for run in confirm})} runs; {time.time() - start:.0f} s.']
    print('\n' + '\n'.join(stage2), flush=True)
    (output / 'results.md').write_text('\n'.join(report + [''] + stage2) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
