"""Check what the CPU test suite cannot see: one command, within a time budget (8 minutes on one GPU).

    python -m tools.gpu_check [--device cuda|cpu] [--json FILE] [--out DIR] [--nproc N] [--budget SECONDS]

On a generated ImageFolder (tests/imagefolder.py) with a randomly initialised convnet teacher, every
training run through main.py under torchrun (NCCL on CUDA, gloo on the CPU):

  reference     a 2-epoch hard-distillation run: fp16 on CUDA (fp32 on the CPU), --compile,
                --deterministic, a step checkpoint every 5 steps
  SIGTERM       the same command stopped by SIGTERM in the middle of epoch 1: its output_dir must hold
                the step checkpoints of epoch 1 (every 5 steps, the newest --keep-last, none of the
                finished epoch 0); then --resume auto: its final weights must equal the uninterrupted
                run's, bit for bit
  plain         a 2-epoch run of the plain student in bf16 (on a CPU: bf16 only where it is the CPU's
                default, i.e. fast; else fp32), --compile, its EMA on the CPU
  compile       in the reference (distilled) and the plain run, every graph torch.compile makes and
                every call of one is counted by phase: the student's evaluations must run compiled
                graphs, and training after an evaluation must reuse its graphs (no recompilation:
                train -> eval -> train)
  syncs         (CUDA) one epoch with torch.cuda.set_sync_debug_mode('warn'): a host-device sync is
                allowed only at the steps that print a progress line
  benchmark     (CUDA) training images/s of deit_tiny, deit_small and deit_base at 224 in bf16, eager
                and compiled, next to timm's published training figures; fp16; fp32 with and without TF32

--device cpu runs the same checks with tiny models and images (torch.compile with the aot_eager backend:
graph capture and AOT autograd, without the C++ build); the rows that need CUDA say SKIP. The table is
printed (and written to --json); the exit code is 1 when a check fails. Every step is budgeted: what
would not finish within --budget is skipped, and says so.
"""
import argparse
import collections
import contextlib
import functools
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import precision

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 4
KEEP_LAST = 2


@dataclass(frozen=True)
class Sizes:
    """What the runs train on one device type: real sizes on CUDA, the smallest that still test the
    mechanics on the CPU."""
    student: str  # distilled
    plain: str
    teacher: str
    input_size: int
    train_per_class: int
    batch: int
    workers: int
    print_freq: int  # the SIGTERM is sent at epoch 1's second progress line
    save_every: int  # --save-interval-steps
    precision: str  # of the reference run (its SIGTERM and resume too): an --amp-dtype, or 'float32'
    compile_backend: str  # torch.compile's backend in every run


SIZES = {
    # 1024 images: 32 steps of 16 per epoch on each of two GPUs
    'cuda': Sizes('deit_tiny_distilled_patch16_224', 'deit_tiny_patch16_224', 'regnety_002', 224, 256, 16, 4,
                  10, 5, 'float16', 'inductor'),
    # 96 images of 16 px: 12 steps of 4 per epoch on each of two ranks. torch.compile's 'eager' backend:
    # dynamo's graph capture and guards (what decides recompilation), no code generation.
    'cpu': Sizes('deit_micro_distilled_patch4_16', 'deit_micro_patch4_16', 'test_resnet', 16, 24, 4, 0,
                 4, 2, 'float32', 'eager'),
}

# Training throughput at 224 px (bf16): (model, batch) with timm's published figure for it:
# huggingface/pytorch-image-models results/benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv
# (commit 5e7d47ca; PyTorch 1.12, CUDA 11.3, one RTX 3090, AMP fp16, NCHW, the batch sizes below).
BENCH_MODELS = [('deit_tiny_patch16_224', 512, 2290.53), ('deit_small_patch16_224', 384, 1053.64),
                ('deit_base_patch16_224', 192, 390.88)]
TIMM_SOURCE = 'timm results/benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv (RTX 3090, AMP fp16)'


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('python -m tools.gpu_check', description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda', choices=('cuda', 'cpu'),
                        help='cuda (default; without CUDA: one line, exit 0) or cpu: every check that needs no GPU')
    parser.add_argument('--out', default='', help='working directory (default: a new temporary one)')
    parser.add_argument('--json', default='', metavar='FILE', help='also write the results as JSON to FILE')
    parser.add_argument('--nproc', type=int, default=None, help='torchrun processes (default: 2; on CUDA min(2, GPUs))')
    parser.add_argument('--budget', type=float, default=450,
                        help='seconds for the whole check (default 450: under 8 minutes with the start-up); '
                             'what would not fit is skipped')
    parser.add_argument('--sync-probe', default='', help=argparse.SUPPRESS)  # internal: see sync_probe
    parser.add_argument('--compile-probe', default='', help=argparse.SUPPRESS)  # internal: see compile_probe
    parser.add_argument('--compile-backend', default='inductor', help=argparse.SUPPRESS)
    return parser


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------

def result(check: str, ok: Optional[bool], detail: str) -> dict:
    """One row of the table; ok None: measured, not judged."""
    return {'check': check, 'result': {True: 'PASS', False: 'FAIL', None: '-'}[ok], 'detail': detail}


def skipped(check: str, why: str) -> dict:
    return {'check': check, 'result': 'SKIP', 'detail': why}


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` (dicts) with ``columns``."""
    cells = [[str(row.get(c, '')) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = lambda values: '| ' + ' | '.join(v.ljust(w) for v, w in zip(values, widths)) + ' |'  # noqa: E731
    return '\n'.join([line(columns), line(['-' * w for w in widths])] + [line(r) for r in cells])


def exit_code(rows: Sequence[dict]) -> int:
    return 1 if any(row['result'] == 'FAIL' for row in rows) else 0


class Budget:
    """The seconds left of --budget."""

    def __init__(self, seconds: float):
        self.deadline = time.time() + seconds

    def left(self) -> float:
        return max(0.0, self.deadline - time.time())


# ---------------------------------------------------------------------------------------------
# Reading a run's output
# ---------------------------------------------------------------------------------------------

def progress_steps(steps: int, print_freq: int) -> List[int]:
    """The steps of an epoch after which engine.train_one_epoch prints a progress line."""
    return [step for step in range(steps) if step % print_freq == 0 or step == steps - 1]


def sync_verdict(syncs_by_step: Dict[int, Dict[str, int]], steps: int, print_freq: int) -> dict:
    """Host-device syncs are allowed only at the steps that print a progress line (reading the loss
    back is what the line costs); a sync at any other step fails, named by its call sites."""
    allowed = set(progress_steps(steps, print_freq))
    stray = {step: sites for step, sites in syncs_by_step.items() if step not in allowed}
    total = sum(n for sites in syncs_by_step.values() for n in sites.values())
    if stray:
        sites = collections.Counter()
        for step_sites in stray.values():
            sites.update(step_sites)
        listed = ', '.join(f'{site} x{n}' for site, n in sites.most_common())
        detail = f'{total} syncs; at {len(stray)} steps without a progress line, from {listed}'
    else:
        synced = sorted(syncs_by_step)
        detail = f'{total} syncs, all at progress-line steps ({len(synced)} of {len(allowed)}: {synced})'
    return result(f'host-device syncs ({steps} steps)', steps >= 50 and not stray, detail)


def compile_verdict(phases: Dict[str, Dict[str, int]], student: str) -> List[dict]:
    """From compile_probe's counts per phase ('train0', 'eval0:0' = epoch 0's first evaluation, the
    student's; ':1' is the EMA's): the student's evaluations ran compiled graphs, and epoch 1 (training
    after an evaluation, then evaluating again) compiled nothing new."""
    count = lambda phase, kind: phases.get(phase, {}).get(kind, 0)  # noqa: E731
    eval_calls = [count(f'eval{epoch}:0', 'call') for epoch in (0, 1)]
    rows = [result(f'compiled evaluation ({student})', all(eval_calls),
                   f'compiled-graph calls in the student\'s evaluation of epoch 0: {eval_calls[0]}, '
                   f'of epoch 1: {eval_calls[1]}')]
    again = count('train1', 'compile') + count('eval1:0', 'compile')
    trained = count('train1', 'call')
    ok = again == 0 and trained > 0 and all(eval_calls)
    detail = (f'graphs compiled in epoch 0: {count("train0", "compile")} training, '
              f'{count("eval0:0", "compile")} evaluation; in epoch 1: {again} ({trained} compiled-graph calls '
              f'in its training)')
    if not all(eval_calls):
        detail += '; the evaluation ran no compiled graph, so nothing was tested'
    rows.append(result(f'no recompile: train -> eval -> train ({student})', ok, detail))
    return rows


def max_weight_difference(path_a: Path, path_b: Path) -> float:
    a = torch.load(path_a, map_location='cpu', weights_only=True)
    b = torch.load(path_b, map_location='cpu', weights_only=True)
    return max((a['model'][k].float() - b['model'][k].float()).abs().max().item() for k in a['model'])


def step_checkpoint_verdict(run_dir: Path, stopped_at: Optional[Tuple[int, int]], every: int) -> dict:
    """After a stop at (epoch, step): the newest KEEP_LAST step checkpoints of that epoch, the stop's own
    and one written by the interval (a multiple of ``every``), none of the finished epoch before."""
    names = sorted(p.name for p in run_dir.glob('checkpoint-e*-s*.pth'))
    found = [(int(m.group(1)), int(m.group(2))) for m in map(re.compile(r'checkpoint-e(\d+)-s(\d+)').match, names)
             if m]
    ok = (stopped_at is not None and stopped_at in found and len(found) <= KEEP_LAST
          and all(epoch == stopped_at[0] for epoch, _ in found)
          and any(step % every == 0 and (epoch, step) != stopped_at for epoch, step in found))
    return result('step checkpoints', ok, f'stopped after {stopped_at}; in output_dir: {", ".join(names) or "none"}')


# ---------------------------------------------------------------------------------------------
# Training runs (subprocesses)
# ---------------------------------------------------------------------------------------------

def run_streaming(command: List[str], log: Path, timeout: float, env: Optional[dict] = None,
                  on_line: Optional[Callable[[str, subprocess.Popen], None]] = None) -> Tuple[int, str]:
    """Run ``command`` from the repo root, stdout and stderr merged (so that torch's logs keep their
    place among the progress lines) into ``log``; ``on_line`` sees every line. Killed at ``timeout``."""
    full_env = dict(os.environ, PYTHONUNBUFFERED='1', **(env or {}))
    proc = subprocess.Popen(command, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    lines = []
    try:
        with open(log, 'w') as f:
            for line in proc.stdout:
                f.write(line)
                lines.append(line)
                if on_line:
                    on_line(line, proc)
        code = proc.wait()
    finally:
        timer.cancel()
    return code, ''.join(lines)


def signal_at(pattern: str, signum: int = signal.SIGTERM) -> Tuple[Callable[[str, subprocess.Popen], None], list]:
    """An ``on_line`` callback sending ``signum`` to the process once, at the first line matching
    ``pattern``; the list it returns receives that line."""
    sent = []

    def on_line(line: str, proc: subprocess.Popen) -> None:
        if not sent and re.search(pattern, line):
            proc.send_signal(signum)
            sent.append(line.strip())
    return on_line, sent


def probed_torchrun(nproc: int, probe_json: Path, backend: str) -> List[str]:
    """main.py's command under torchrun, each rank through compile_probe (the arguments of main.py follow)."""
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
            '-m', 'tools.gpu_check', '--compile-probe', str(probe_json), '--compile-backend', backend, '--']


def prepare_data(out: Path, sizes: Sizes) -> Tuple[Path, Path]:
    """The ImageFolder and a teacher checkpoint (random weights: the mechanics, not the accuracy)."""
    sys.path.insert(0, str(REPO / 'tests'))
    from imagefolder import make_imagefolder  # the test suite's generator, one copy
    import timm
    data = make_imagefolder(out / 'data', num_classes=NUM_CLASSES, train_per_class=sizes.train_per_class,
                            val_per_class=25 if sizes.input_size >= 224 else 5)
    teacher = out / 'teacher.pth'
    torch.manual_seed(0)
    torch.save({'model': timm.create_model(sizes.teacher, num_classes=NUM_CLASSES).state_dict()}, teacher)
    return data, teacher


def common_flags(data: Path, sizes: Sizes, device: str) -> List[str]:
    return ['--data-path', str(data), '--input-size', str(sizes.input_size), '--device', device,
            '--epochs', '2', '--warmup-epochs', '1', '--cooldown-epochs', '0', '--batch-size', str(sizes.batch),
            '--num_workers', str(sizes.workers), '--print-freq', str(sizes.print_freq), '--compile',
            '--start-over']  # a check run again into the same --out keeps the earlier runs' files aside


def distilled_flags(teacher: Path, sizes: Sizes) -> List[str]:
    return ['--model', sizes.student, '--distillation-type', 'hard', '--teacher-model', sizes.teacher,
            '--teacher-path', str(teacher)]


def finished(output_dir: Path, code: int, output: str, name: str) -> dict:
    """A run that must have trained 2 epochs with finite losses."""
    log = output_dir / 'log.txt'
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    ok = code == 0 and [r['epoch'] for r in rows] == [0, 1] and all(math.isfinite(r['train_loss']) for r in rows)
    last = rows[-1] if rows else {}
    detail = (f'exit {code}, epochs {[r["epoch"] for r in rows]}, train loss '
              f'{last.get("train_loss", float("nan")):.4f}, test acc1 {last.get("test_acc1", float("nan")):.1f}%, '
              f'EMA acc1 {last.get("test_ema_acc1", float("nan")):.1f}%')
    if not ok:
        detail += f'; last output: {output.strip().splitlines()[-1] if output.strip() else "(none)"}'
    return result(name, ok, detail)


def read_probe(path: Path, student: str) -> List[dict]:
    if not path.is_file():
        return [result(f'compiled evaluation ({student})', False, 'the run wrote no compile counts')]
    return compile_verdict(json.loads(path.read_text()), student)


def check_reference_and_resume(out: Path, flags: List[str], sizes: Sizes, nproc: int, backend: str,
                               budget: Budget) -> List[dict]:
    """The distilled reference run; the same stopped by SIGTERM mid-epoch 1, then --resume auto."""
    precision = ['--no-amp'] if sizes.precision == 'float32' else ['--amp-dtype', sizes.precision]
    common = [*flags, *precision, '--deterministic', '--save-interval-steps', str(sizes.save_every),
              '--keep-last', str(KEEP_LAST)]
    reference, resumed = out / 'reference', out / 'resumed'
    launch = probed_torchrun(nproc, out / 'reference_compiles.json', backend)
    code, output = run_streaming(launch + common + ['--output_dir', str(reference)], out / 'reference.log',
                                 budget.left())
    name = {'float16': 'fp16', 'bfloat16': 'bf16', 'float32': 'fp32'}[sizes.precision]
    rows = [finished(reference, code, output, f'{name} --compile distilled, torchrun x{nproc}')]
    rows += read_probe(out / 'reference_compiles.json', 'distilled student')

    stop_mid_epoch_1, sent = signal_at(rf'Epoch: \[1\] \[\s*{sizes.print_freq}/')  # torchrun forwards it
    launch = probed_torchrun(nproc, out / 'sigterm_compiles.json', backend)
    code, output = run_streaming(launch + common + ['--output_dir', str(resumed)], out / 'sigterm.log',
                                 budget.left(), on_line=stop_mid_epoch_1)
    stopped = re.search(r'stopped by SIGTERM after step (\d+) of epoch (\d+); saved checkpoint \S+', output)
    rows.append(result('SIGTERM mid-epoch', bool(sent and stopped and code != 0),
                       f'exit {code}: ' + (stopped.group(0) if stopped else 'no "stopped by SIGTERM after step" line')))
    stopped_at = (int(stopped.group(2)), int(stopped.group(1))) if stopped else None
    rows.append(step_checkpoint_verdict(resumed, stopped_at, sizes.save_every))
    launch = probed_torchrun(nproc, out / 'resume_compiles.json', backend)
    code, output = run_streaming(launch + common + ['--output_dir', str(resumed), '--resume', 'auto'],
                                 out / 'resume.log', budget.left())
    rows.append(finished(resumed, code, output, '--resume auto after SIGTERM'))
    if (reference / 'checkpoint.pth').is_file() and (resumed / 'checkpoint.pth').is_file():
        diff = max_weight_difference(reference / 'checkpoint.pth', resumed / 'checkpoint.pth')
        rows.append(result('resumed == uninterrupted', diff == 0.0, f'largest weight difference {diff:.3g}'))
    else:
        rows.append(result('resumed == uninterrupted', False, 'a final checkpoint is missing'))
    return rows


def check_plain_student(out: Path, flags: List[str], sizes: Sizes, nproc: int, backend: str, bf16: bool,
                        budget: Budget) -> List[dict]:
    run_dir = out / 'plain'
    launch = probed_torchrun(nproc, out / 'plain_compiles.json', backend)
    code, output = run_streaming(
        launch + flags + ['--model', sizes.plain, *(['--amp-dtype', 'bfloat16'] if bf16 else ['--no-amp']),
                          '--model-ema-force-cpu', '--output_dir', str(run_dir)], out / 'plain.log', budget.left())
    rows = [finished(run_dir, code, output,
                     f'{"bf16" if bf16 else "fp32"} --compile plain --model-ema-force-cpu, torchrun x{nproc}')]
    return rows + read_probe(out / 'plain_compiles.json', 'plain student')


def counting_backend(backend: str, record: Callable[[str], None]) -> Callable:
    """torch.compile's ``backend``, with ``record('compile')`` for every graph it compiles and
    ``record('call')`` for every call of one."""
    compile_graph = torch._dynamo.lookup_backend(backend)

    def counted(graph_module, example_inputs):
        record('compile')
        compiled = compile_graph(graph_module, example_inputs)

        def run(*args):
            record('call')
            return compiled(*args)
        return run
    return counted


def compile_probe(out_json: str, backend: str, main_argv: List[str]) -> int:
    """In each rank of a run: main.py's command line, every graph torch.compile compiles and every call of
    one counted by phase ('train<epoch>'; 'eval<epoch>:<i>', the i-th evaluation after that epoch's
    training: 0 the student, 1 its EMA). Rank 0 writes {phase: {'compile': n, 'call': m}} to ``out_json``."""
    import main
    import speedups
    counts = collections.defaultdict(collections.Counter)
    phase = {'name': 'start', 'epoch': -1, 'evals': 0}

    def record(kind: str) -> None:
        counts[phase['name']][kind] += 1

    torch.compile = functools.partial(torch.compile, backend=counting_backend(backend, record))
    if backend != 'inductor':  # the probe of speedups builds with inductor (a C++ build on the CPU)
        speedups.compiler_problem = lambda device_type='cpu': ''
    train_one_epoch, evaluate = main.train_one_epoch, main.evaluate

    def train_phase(model, criterion, data_loader, optimizer, device, epoch, *args, **kwargs):
        phase.update(name=f'train{epoch}', epoch=epoch, evals=0)
        return train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, *args, **kwargs)

    def eval_phase(*args, **kwargs):
        phase['name'] = f'eval{phase["epoch"]}:{phase["evals"]}'
        phase['evals'] += 1
        return evaluate(*args, **kwargs)

    main.train_one_epoch, main.evaluate = train_phase, eval_phase
    code = main.cli(main_argv)
    if int(os.environ.get('RANK', 0)) == 0:
        Path(out_json).write_text(json.dumps({name: dict(kinds) for name, kinds in counts.items()}))
    return code


@contextlib.contextmanager
def sync_debug_mode(mode: str):
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode('default')


class CountedSteps:
    """Wraps a training loader; ``step`` is the step whose batch is being fetched or trained on."""

    def __init__(self, loader):
        self.loader, self.step, self.active = loader, -1, True

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):  # sampler, ...
        return getattr(self.loader, name)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            self.step += 1  # before the fetch: a sync while preparing this batch is this step's
            try:
                batch = next(batches)
            except StopIteration:
                self.step -= 1  # the epoch's end belongs to its last step
                return
            yield batch


def sync_probe(out_json: str, main_argv: List[str]) -> int:
    """In a subprocess: main.py's command line, every host-device sync inside train_one_epoch recorded
    by step and call site. Writes {'steps': N, 'syncs': {step: {site: count}}} to ``out_json``."""
    import main
    syncs = collections.defaultdict(collections.Counter)
    loaders = []

    def record(message, category, filename, lineno, file=None, line=None):
        if 'synchroniz' in str(message) and loaders and loaders[-1].active:
            syncs[loaders[-1].step][f'{os.path.relpath(filename, REPO)}:{lineno}'] += 1

    warnings.simplefilter('always')  # every occurrence, not once per place
    warnings.showwarning = record
    train_one_epoch = main.train_one_epoch

    def counted(model, criterion, data_loader, *args, **kwargs):
        loaders.append(CountedSteps(data_loader))
        debug = contextlib.nullcontext() if not torch.cuda.is_available() else sync_debug_mode('warn')
        try:
            with debug:  # without CUDA (tests): nothing to count, the rest of the probe still runs
                return train_one_epoch(model, criterion, loaders[-1], *args, **kwargs)
        finally:
            loaders[-1].active = False

    main.train_one_epoch = counted
    code = main.cli(main_argv)
    steps = len(loaders[0]) if loaders else 0
    Path(out_json).write_text(json.dumps({'steps': steps, 'syncs': {str(k): v for k, v in syncs.items()}}))
    return code


def check_syncs(out: Path, data: Path, teacher: Path, sizes: Sizes, budget: Budget) -> List[dict]:
    """One epoch, one process, fp16, eager (so that every sync has its Python call site)."""
    sites_json = out / 'syncs.json'
    flags = [arg for arg in common_flags(data, sizes, 'cuda') if arg != '--compile']
    argv = [*flags, *distilled_flags(teacher, sizes), '--epochs', '1', '--amp-dtype', 'float16',
            '--output_dir', str(out / 'syncs')]
    code, output = run_streaming([sys.executable, '-m', 'tools.gpu_check', '--sync-probe', str(sites_json), '--',
                                  *argv], out / 'syncs.log', budget.left())
    if code != 0 or not sites_json.is_file():
        return [result('host-device syncs', False, f'the probe run failed (exit {code}): see syncs.log')]
    probe = json.loads(sites_json.read_text())
    return [sync_verdict({int(step): sites for step, sites in probe['syncs'].items()}, probe['steps'], sizes.print_freq)]


# ---------------------------------------------------------------------------------------------
# Benchmark (in this process, CUDA)
# ---------------------------------------------------------------------------------------------

def bench_config(model_name: str, batch: int, precision: str, compiled: bool, tf32: bool = True,
                 steps: int = 20, warmup: int = 5) -> dict:
    """Training images/s and peak memory of engine.train_one_epoch on ``steps`` device-resident batches."""
    import timm
    from timm.optim import create_optimizer_v2
    import main
    import speedups
    from benchmark import engine_options
    from engine import LossScaler, train_one_epoch
    from losses import DistillationLoss
    device = torch.device('cuda')
    main.set_fp32_precision(device, tf32)
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=1000).to(device)
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-4, weight_decay=0.05, **speedups.optimizer_kwargs(device))
    if compiled:
        model = speedups.compile_or_eager(model, 'student')
    amp = precision != 'float32'
    scaler = LossScaler(enabled=precision == 'float16', device_type='cuda')
    criterion = DistillationLoss(torch.nn.CrossEntropyLoss(), None, 'none', 0.5, 1.0, distillation_token=False)
    data = (torch.randn(batch, 3, 224, 224, device=device), torch.randint(0, 1000, (batch,), device=device))
    options = engine_options(getattr(torch, precision) if amp else None)
    with contextlib.redirect_stdout(io.StringIO()):
        train_one_epoch(model, criterion, [data] * warmup, optimizer, device, 0, scaler, options)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        stats = train_one_epoch(model, criterion, [data] * steps, optimizer, device, 0, scaler, options)
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    name = {'float16': 'fp16', 'bfloat16': 'bf16', 'float32': 'fp32 TF32' if tf32 else 'fp32 (no TF32)'}[precision]
    row = {'model': model_name, 'batch': batch, 'config': f'{name} {"compile" if compiled else "eager"}',
           'images/s': round(steps * batch / seconds), 'peak GiB': round(torch.cuda.max_memory_allocated() / 2 ** 30, 2),
           'loss': round(stats['loss'], 3)}
    del model, optimizer
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    main.set_fp32_precision(device, True)
    return row


# the seconds a configuration is allowed to start with: a compiled one builds its kernels first
EAGER_SECONDS, COMPILE_SECONDS = 20, 120


def check_benchmark(budget: Budget) -> Tuple[List[dict], List[dict]]:
    """bf16 eager for the three models, fp16 and fp32 (TF32 or not) for deit_small, then bf16 compiled
    for each model while the budget lasts."""
    small = BENCH_MODELS[1]
    plan = ([(name, batch, 'bfloat16', False, True) for name, batch, _ in BENCH_MODELS]
            + [(small[0], small[1], 'float16', False, True), (small[0], small[1], 'float32', False, True),
               (small[0], small[1], 'float32', False, False)]
            + [(name, batch, 'bfloat16', True, True) for name, batch, _ in BENCH_MODELS])
    bench, rows = [], []
    for name, batch, precision, compiled, tf32 in plan:
        if budget.left() < (COMPILE_SECONDS if compiled else EAGER_SECONDS):
            rows.append(skipped(f'benchmark {name} {precision}{" compile" if compiled else ""}',
                                f'the time budget left ({budget.left():.0f} s) is too short'))
            continue
        bench.append(bench_config(name, batch, precision, compiled, tf32))
    published = {name: figure for name, _, figure in BENCH_MODELS}
    for row in bench:
        if row['config'].startswith('bf16'):
            row['timm published images/s'] = published[row['model']]
    rows.append(result('benchmark losses finite', all(math.isfinite(b['loss']) for b in bench),
                       ', '.join(f'{b["model"]} {b["config"]}: {b["loss"]}' for b in bench)))
    rate = {(b['model'], b['config']): b['images/s'] for b in bench}
    tf32_on, tf32_off = rate.get((small[0], 'fp32 TF32 eager')), rate.get((small[0], 'fp32 (no TF32) eager'))
    if tf32_on and tf32_off:
        has_tf32 = torch.cuda.get_device_capability() >= (8, 0)
        rows.append(result('TF32 speeds up fp32', tf32_on / tf32_off >= 1.2 if has_tf32 else None,
                           f'{tf32_on / tf32_off:.2f}x' + ('' if has_tf32 else ' (no TF32 before compute capability 8.0)')))
    return rows, bench


# ---------------------------------------------------------------------------------------------

CUDA_ONLY = ('host-device syncs', 'benchmark (deit_tiny/small/base at 224: bf16 eager and compiled, fp16, '
             'fp32 with and without TF32)')


def run_checks(args) -> int:
    start = time.time()
    budget = Budget(args.budget)
    out = Path(args.out or tempfile.mkdtemp(prefix='gpu_check-'))
    out.mkdir(parents=True, exist_ok=True)
    cuda = args.device == 'cuda'
    sizes = SIZES[args.device]
    nproc = args.nproc or (min(2, torch.cuda.device_count()) if cuda else 2)
    device_name = torch.cuda.get_device_name() if cuda else 'CPU'
    print(f'gpu_check: {device_name} x{torch.cuda.device_count() if cuda else 1}, torch {torch.__version__}, '
          f'{nproc} processes, budget {args.budget:.0f} s, runs in {out}', flush=True)
    data, teacher = prepare_data(out, sizes)
    flags = common_flags(data, sizes, args.device)
    backend = sizes.compile_backend
    # bf16 on a CPU only where it is that CPU's default: one without native bf16 emulates it many times
    # slower than fp32, which no budget fits
    plain_bf16 = cuda or precision.default_precision(torch.device('cpu')).dtype == torch.bfloat16
    steps = [('reference + SIGTERM/resume',
              lambda: check_reference_and_resume(out, flags + distilled_flags(teacher, sizes), sizes, nproc,
                                                 backend, budget)),
             ('plain student', lambda: check_plain_student(out, flags, sizes, nproc, backend, plain_bf16, budget))]
    if cuda:
        steps.append(('syncs', lambda: check_syncs(out, data, teacher, sizes, budget)))
    rows, bench = [], []
    for name, check in steps:
        print(f'gpu_check: {name} ({time.time() - start:.0f} s)', flush=True)
        rows += check() if budget.left() > 0 else [skipped(name, 'the time budget is spent')]
    if cuda:
        print(f'gpu_check: benchmark ({time.time() - start:.0f} s)', flush=True)
        bench_rows, bench = check_benchmark(budget)
        rows += bench_rows
    else:
        rows += [skipped(name, 'needs CUDA') for name in CUDA_ONLY]
    seconds = time.time() - start
    print(f'\n{format_table(rows, ["check", "result", "detail"])}\n')
    if bench:
        print(f'Training step (engine.train_one_epoch, device-resident batches) on {device_name}; timm\'s figures: '
              f'{TIMM_SOURCE}:')
        print(f'{format_table(bench, ["model", "batch", "config", "images/s", "timm published images/s", "peak GiB", "loss"])}\n')
    failed = [row['check'] for row in rows if row['result'] == 'FAIL']
    print(f'gpu_check: {len(failed)} failed check(s){": " + ", ".join(failed) if failed else ""} '
          f'in {seconds:.0f} s; logs in {out}')
    if args.json:
        Path(args.json).write_text(json.dumps({
            'device': device_name, 'torch': torch.__version__, 'processes': nproc, 'seconds': round(seconds),
            'rows': rows, 'benchmark': bench, 'timm_published': TIMM_SOURCE}, indent=1))
    return exit_code(rows)


def cli(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if '--' in argv:  # a probe: our flags, then main.py's
        argv, main_argv = argv[:argv.index('--')], argv[argv.index('--') + 1:]
    else:
        main_argv = []
    args = get_args_parser().parse_args(argv)
    if args.sync_probe:
        return sync_probe(args.sync_probe, main_argv)
    if args.compile_probe:
        return compile_probe(args.compile_probe, args.compile_backend, main_argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        print('gpu_check: skipped: no CUDA device here (torch.cuda.is_available() is False); '
              '--device cpu runs the checks that need no GPU')
        return 0
    return run_checks(args)


if __name__ == '__main__':
    sys.exit(cli())
