"""The DeiT story in one command, on a CPU, in a few minutes: ``python quickstart.py``.

On scikit-learn's handwritten digits (``--data-set DIGITS``, no download) it trains, through
main.py and the configs of configs/quickstart/:

1. a small RegNetY convnet teacher;
2. a DeiT student that learns from the teacher through its distillation token (hard distillation);
3. the same student, with the same budget, without distillation;

then prints their top-1 accuracies on the DIGITS validation split, and the decision of the
pre-registered distillation study (docs/distillation-study.md). Every run is seeded, and the
outputs (checkpoints, log.txt, args.yaml, the full console output) go to output/quickstart/.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import List, NamedTuple, Tuple

REPO = Path(__file__).resolve().parent
CONFIGS = REPO / 'configs' / 'quickstart'
STUDY = REPO / 'docs' / 'distillation-study.md'


class Stage(NamedTuple):
    name: str
    what: str
    argv: List[str]


def stages(output: Path, extra: List[str]) -> List[Stage]:
    """The three runs; ``extra`` (main.py flags) is added to each, after its config."""
    teacher = ['--config', str(CONFIGS / 'teacher.yaml'), *extra]
    student = ['--config', str(CONFIGS / 'student.yaml'), *extra]
    distil = ['--model', 'deit_micro_distilled_patch4_16', '--distillation-type', 'hard',
              '--teacher-model', 'regnety_tiny_os8', '--teacher-path', str(output / 'teacher' / 'checkpoint.pth')]
    return [Stage('teacher', 'RegNetY convnet teacher', teacher),
            Stage('distilled', 'DeiT student, hard distillation', student + distil),
            Stage('plain', 'DeiT student, no distillation', student)]


def run_stage(stage: Stage, out: Path, threads: int, progress: bool = True) -> dict:
    """Run main.py for one stage into ``out``, printing one progress line per epoch (``progress``)
    or none; returns its last log line and the seconds it took."""
    out.mkdir(parents=True, exist_ok=True)
    # --start-over: running a stage again keeps the earlier run's files in out/previous-<time>/
    argv = [sys.executable, str(REPO / 'main.py'), *stage.argv, '--output_dir', str(out), '--start-over']
    # A fixed thread count: the same numbers on every run on the same machine.
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED='1')
    if progress:
        print(f'\n== {stage.name}: {stage.what}\n   {" ".join(argv[1:])}', flush=True)
    start, epoch, lines = time.time(), 0, []
    with subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        for line in proc.stdout:
            lines.append(line)
            if progress and line.startswith('Accuracy of the network'):
                print(f'   [{stage.name}] epoch {epoch:2d}  {time.time() - start:4.0f} s  '
                      f'top-1 {line.split(":", 1)[1].strip()}', flush=True)
                epoch += 1
    (out / 'console.txt').write_text(''.join(lines))
    if proc.returncode != 0:
        errors = [line for line in lines if 'error:' in line]  # a user mistake: main.py's one error line
        sys.exit(''.join(errors[-1:] or lines[-15:]) + f'{stage.name} failed (exit {proc.returncode}); '
                 f'see {out / "console.txt"}')
    log = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    return {**log[-1], 'seconds': time.time() - start}


def get_args_parser() -> argparse.ArgumentParser:
    """The quickstart's own flags; the flags it does not know go to main.py."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog='Other flags are main.py flags for all three runs, e.g. --epochs 1.')
    parser.add_argument('--output', default=str(REPO / 'output' / 'quickstart'), help='where the three runs go')
    parser.add_argument('--threads', type=int, default=2, help='CPU threads of each run (OMP_NUM_THREADS)')
    return parser


def main(argv=None) -> int:
    args, extra = get_args_parser().parse_known_args(argv)
    output = Path(args.output)

    start = time.time()
    results = [(stage, run_stage(stage, output / stage.name, args.threads)) for stage in stages(output, extra)]
    print(f'\nTop-1 on the DIGITS validation split (360 images); {time.time() - start:.0f} s in all.\n')
    print(format_table(results))
    print(f'\nThe distillation studies ({STUDY.relative_to(REPO)}):')
    for number, decision in enumerate(study_decisions(), start=1):
        print(f'  study {number}: {decision}')
    return 0


def study_decisions() -> List[str]:
    """The decision line of each distillation study, in the order docs/distillation-study.md records them."""
    return [line[len('Decision: '):] for line in STUDY.read_text().splitlines() if line.startswith('Decision: ')]


def format_table(results: List[Tuple[Stage, dict]]) -> str:
    """A Markdown table: one row per run, top-1 of its last epoch and of its best one."""
    rows = ['| run | top-1 | best top-1 | time |', '| --- | ---: | ---: | ---: |']
    rows += [f'| {stage.name}: {stage.what} | {last["test_acc1"]:.1f}% | {last["max_accuracy"]:.1f}% '
             f'| {last["seconds"]:.0f} s |' for stage, last in results]
    return '\n'.join(rows)


if __name__ == '__main__':
    sys.exit(main())
