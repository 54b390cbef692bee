"""Check on a CUDA machine what the CPU test suite cannot: one command, under 10 minutes on one GPU.

    python -m tools.gpu_check [--out DIR] [--nproc N]

On a generated ImageFolder (tests/imagefolder.py) with a randomly initialised RegNetY teacher:

  fp16 run      a 2-epoch hard-distillation run of main.py under torchrun (NCCL), fp16, --compile,
                --deterministic, step checkpoints every 5 steps
  SIGTERM       the same command stopped by SIGTERM in the middle of epoch 1, then --resume auto:
                its final weights must equal the uninterrupted run's, bit for bit
  bf16 run      the same run in bf16, the EMA kept on the CPU (--model-ema-force-cpu), with
                TORCH_LOGS=recompiles: no recompilation may happen when training resumes after the
                evaluation (train -> eval -> train)
  syncs         one epoch (single process, fp16, eager) with torch.cuda.set_sync_debug_mode('warn')
                over its training steps: a host-device sync is allowed only where a progress line
                is printed, so no call site may sync more often than the progress lines
  benchmark     images/s and peak memory of a deit_small_patch16_224 training step at batch 128
                (engine.train_one_epoch on device-resident batches): fp16 / bf16 x eager / compile,
                fp32 with and without TF32 (on Ampere and newer TF32 must be faster)

It prints a table and exits 1 when a check fails. Without a GPU it prints one line and exits 0.
"""
import argparse
import collections
import contextlib
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
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

REPO = Path(__file__).resolve().parents[1]
STUDENT = 'deit_tiny_distilled_patch16_224'
TEACHER = 'regnety_002'
NUM_CLASSES = 4
TRAIN_PER_CLASS = 256  # 1024 images: 64 steps of 16 per epoch on one GPU, 32 on each of two
BATCH = 16
PRINT_FREQ = 10
BENCH_MODEL, BENCH_BATCH = 'deit_small_patch16_224', 128


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('python -m tools.gpu_check', description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='', help='working directory (default: a new temporary one)')
    parser.add_argument('--nproc', type=int, default=None, help='torchrun processes (default: min(2, GPUs))')
    parser.add_argument('--timeout', type=int, default=300, help='seconds allowed to each training run')
    parser.add_argument('--sync-probe', default='', help=argparse.SUPPRESS)  # internal: see sync_probe
    return parser


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------

def result(check: str, ok: Optional[bool], detail: str) -> dict:
    """One row of the table; ok None: measured or not applicable, not judged."""
    return {'check': check, 'result': {True: 'PASS', False: 'FAIL', None: '-'}[ok], 'detail': detail}


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` (dicts) with ``columns``."""
    cells = [[str(row.get(c, '')) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = lambda values: '| ' + ' | '.join(v.ljust(w) for v, w in zip(values, widths)) + ' |'  # noqa: E731
    return '\n'.join([line(columns), line(['-' * w for w in widths])] + [line(r) for r in cells])


def exit_code(rows: Sequence[dict]) -> int:
    return 1 if any(row['result'] == 'FAIL' for row in rows) else 0


# ---------------------------------------------------------------------------------------------
# Reading a run's output
# ---------------------------------------------------------------------------------------------

def recompiles_when_training_resumes(output: str) -> Optional[int]:
    """Recompilations logged (TORCH_LOGS=recompiles) between the end of epoch 0's evaluations and the
    first evaluation of epoch 1, i.e. while training resumes after eval; None if the markers are absent."""
    start_epoch_1 = output.find('Epoch: [1]')
    if start_epoch_1 < 0:
        return None
    end_of_eval_0 = output.rfind('* Acc@1', 0, start_epoch_1)
    eval_1 = output.find('Test:', start_epoch_1)
    if end_of_eval_0 < 0 or eval_1 < 0:
        return None
    return output.count('Recompiling function', end_of_eval_0, eval_1)


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


def max_weight_difference(path_a: Path, path_b: Path) -> float:
    a = torch.load(path_a, map_location='cpu', weights_only=True)
    b = torch.load(path_b, map_location='cpu', weights_only=True)
    return max((a['model'][k].float() - b['model'][k].float()).abs().max().item() for k in a['model'])


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


def torchrun(nproc: int) -> List[str]:
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', 'main.py']


def prepare_data(out: Path) -> Tuple[Path, Path]:
    """The ImageFolder and a teacher checkpoint (random weights: the mechanics, not the accuracy)."""
    sys.path.insert(0, str(REPO / 'tests'))
    from imagefolder import make_imagefolder  # the test suite's generator, one copy
    import timm
    data = make_imagefolder(out / 'data', num_classes=NUM_CLASSES, train_per_class=TRAIN_PER_CLASS,
                            val_per_class=25)
    teacher = out / 'teacher.pth'
    torch.manual_seed(0)
    torch.save({'model': timm.create_model(TEACHER, num_classes=NUM_CLASSES).state_dict()}, teacher)
    return data, teacher


def distilled_flags(data: Path, teacher: Path) -> List[str]:
    return ['--data-path', str(data), '--model', STUDENT, '--distillation-type', 'hard',
            '--teacher-model', TEACHER, '--teacher-path', str(teacher), '--epochs', '2', '--warmup-epochs', '1',
            '--cooldown-epochs', '0', '--batch-size', str(BATCH), '--num_workers', '4',
            '--print-freq', str(PRINT_FREQ),
            '--start-over']  # a check run again into the same --out keeps the earlier runs' files aside


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


def check_fp16_and_resume(out: Path, flags: List[str], nproc: int, timeout: float) -> List[dict]:
    common = [*flags, '--amp', '--amp-dtype', 'float16', '--compile', '--deterministic',
              '--save-interval-steps', '5']
    reference, resumed = out / 'fp16_reference', out / 'fp16_resumed'
    code, output = run_streaming(torchrun(nproc) + common + ['--output_dir', str(reference)],
                                 out / 'fp16_reference.log', timeout)
    rows = [finished(reference, code, output, f'fp16 --compile, torchrun x{nproc} (NCCL)')]
    steps = sorted(p.name for p in reference.glob('checkpoint-e*-s*.pth'))
    rows.append(result('step checkpoints', bool(steps), ', '.join(steps) or 'none written'))

    stop_mid_epoch_1, sent = signal_at(rf'Epoch: \[1\] \[\s*{PRINT_FREQ}/')  # torchrun forwards it
    code, output = run_streaming(torchrun(nproc) + common + ['--output_dir', str(resumed)],
                                 out / 'fp16_sigterm.log', timeout, on_line=stop_mid_epoch_1)
    stopped = re.search(r'stopped by SIGTERM [^;]*; saved checkpoint \S+', output)
    rows.append(result('SIGTERM mid-epoch', bool(sent and stopped and code != 0),
                       f'exit {code}: ' + (stopped.group(0) if stopped else 'no "stopped by SIGTERM" line')))
    code, output = run_streaming(torchrun(nproc) + common + ['--output_dir', str(resumed), '--resume', 'auto'],
                                 out / 'fp16_resume.log', timeout)
    rows.append(finished(resumed, code, output, '--resume auto after SIGTERM'))
    if (reference / 'checkpoint.pth').is_file() and (resumed / 'checkpoint.pth').is_file():
        diff = max_weight_difference(reference / 'checkpoint.pth', resumed / 'checkpoint.pth')
        rows.append(result('resumed == uninterrupted', diff == 0.0, f'largest weight difference {diff:.3g}'))
    else:
        rows.append(result('resumed == uninterrupted', False, 'a final checkpoint is missing'))
    return rows


def check_bf16_and_recompiles(out: Path, flags: List[str], nproc: int, timeout: float) -> List[dict]:
    run_dir = out / 'bf16'
    code, output = run_streaming(
        torchrun(nproc) + flags + ['--amp', '--amp-dtype', 'bfloat16', '--compile', '--model-ema-force-cpu',
                                   '--output_dir', str(run_dir)],
        out / 'bf16.log', timeout, env={'TORCH_LOGS': 'recompiles'})
    rows = [finished(run_dir, code, output, f'bf16 --compile --model-ema-force-cpu, torchrun x{nproc}')]
    again = recompiles_when_training_resumes(output)
    rows.append(result('no recompile: train -> eval -> train', again == 0,
                       f'{again if again is not None else "?"} when training resumed; '
                       f'{output.count("Recompiling function")} in the whole run'))
    return rows


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


def check_syncs(out: Path, flags: List[str], timeout: float) -> List[dict]:
    sites_json = out / 'syncs.json'
    argv = [*flags, '--epochs', '1', '--amp', '--amp-dtype', 'float16', '--output_dir', str(out / 'syncs')]
    code, output = run_streaming([sys.executable, '-m', 'tools.gpu_check', '--sync-probe', str(sites_json), '--',
                                  *argv], out / 'syncs.log', timeout)
    if code != 0 or not sites_json.is_file():
        return [result('host-device syncs', False, f'the probe run failed (exit {code}): see syncs.log')]
    probe = json.loads(sites_json.read_text())
    return [sync_verdict({int(step): sites for step, sites in probe['syncs'].items()}, probe['steps'], PRINT_FREQ)]


# ---------------------------------------------------------------------------------------------
# Benchmark (in this process)
# ---------------------------------------------------------------------------------------------

BENCH_CONFIGS = [  # (precision, compiled, tf32)
    ('float16', False, True), ('float16', True, True), ('bfloat16', False, True), ('bfloat16', True, True),
    ('float32', False, True), ('float32', False, False),
]


def bench_config(precision: str, compiled: bool, tf32: bool, steps: int = 30, warmup: int = 5) -> dict:
    """images/s and peak memory of engine.train_one_epoch on ``steps`` device-resident batches."""
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
    model = timm.create_model(BENCH_MODEL, num_classes=1000).to(device)
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-4, weight_decay=0.05, **speedups.optimizer_kwargs(device))
    if compiled:
        model = speedups.compile_or_eager(model, 'student')
    amp = precision != 'float32'
    scaler = LossScaler(enabled=precision == 'float16', device_type='cuda')
    criterion = DistillationLoss(torch.nn.CrossEntropyLoss(), None, 'none', 0.5, 1.0, distillation_token=False)
    batch = (torch.randn(BENCH_BATCH, 3, 224, 224, device=device),
             torch.randint(0, 1000, (BENCH_BATCH,), device=device))
    options = engine_options(getattr(torch, precision) if amp else None)
    with contextlib.redirect_stdout(io.StringIO()):
        train_one_epoch(model, criterion, [batch] * warmup, optimizer, device, 0, scaler, options)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        stats = train_one_epoch(model, criterion, [batch] * steps, optimizer, device, 0, scaler, options)
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    name = {'float16': 'fp16', 'bfloat16': 'bf16', 'float32': 'fp32 TF32' if tf32 else 'fp32 (no TF32)'}[precision]
    row = {'config': f'{name} {"compile" if compiled else "eager"}', 'images/s': f'{steps * BENCH_BATCH / seconds:.0f}',
           'peak GiB': f'{torch.cuda.max_memory_allocated() / 2 ** 30:.2f}', 'loss': f'{stats["loss"]:.3f}'}
    del model, optimizer
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return row


def check_benchmark() -> Tuple[List[dict], List[dict]]:
    bench = [bench_config(*config) for config in BENCH_CONFIGS]
    rows = [result('benchmark losses finite', all(math.isfinite(float(b['loss'])) for b in bench),
                   ', '.join(f'{b["config"]}: {b["loss"]}' for b in bench))]
    rate = {b['config']: float(b['images/s']) for b in bench}
    speedup = rate['fp32 TF32 eager'] / rate['fp32 (no TF32) eager']
    has_tf32 = torch.cuda.get_device_capability() >= (8, 0)
    rows.append(result('TF32 speeds up fp32', speedup >= 1.2 if has_tf32 else None,
                       f'{speedup:.2f}x' + ('' if has_tf32 else ' (no TF32 before compute capability 8.0)')))
    return rows, bench


# ---------------------------------------------------------------------------------------------

def run_checks(args) -> int:
    out = Path(args.out or tempfile.mkdtemp(prefix='gpu_check-'))
    out.mkdir(parents=True, exist_ok=True)
    nproc = args.nproc or min(2, torch.cuda.device_count())
    print(f'gpu_check: {torch.cuda.get_device_name()} x{torch.cuda.device_count()}, torch {torch.__version__}, '
          f'runs in {out}', flush=True)
    start = time.time()
    data, teacher = prepare_data(out)
    flags = distilled_flags(data, teacher)
    rows = []
    for name, check in (('fp16 + SIGTERM/resume', lambda: check_fp16_and_resume(out, flags, nproc, args.timeout)),
                        ('bf16 + recompiles', lambda: check_bf16_and_recompiles(out, flags, nproc, args.timeout)),
                        ('syncs', lambda: check_syncs(out, flags, args.timeout))):
        print(f'gpu_check: {name} ({time.time() - start:.0f} s)', flush=True)
        rows += check()
    print(f'gpu_check: benchmark ({time.time() - start:.0f} s)', flush=True)
    bench_rows, bench = check_benchmark()
    rows += bench_rows
    print(f'\n{format_table(rows, ["check", "result", "detail"])}\n')
    print(f'{BENCH_MODEL}, batch {BENCH_BATCH}, one training step (engine.train_one_epoch):')
    print(f'{format_table(bench, ["config", "images/s", "peak GiB", "loss"])}\n')
    failed = [row['check'] for row in rows if row['result'] == 'FAIL']
    print(f'gpu_check: {len(failed)} failed check(s){": " + ", ".join(failed) if failed else ""} '
          f'in {time.time() - start:.0f} s; logs in {out}')
    return exit_code(rows)


def cli(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if '--' in argv:  # the sync probe: our flags, then main.py's
        argv, main_argv = argv[:argv.index('--')], argv[argv.index('--') + 1:]
    else:
        main_argv = []
    args = get_args_parser().parse_args(argv)
    if args.sync_probe:
        return sync_probe(args.sync_probe, main_argv)
    if not torch.cuda.is_available():
        print('gpu_check: skipped: no CUDA device here (torch.cuda.is_available() is False)')
        return 0
    return run_checks(args)


if __name__ == '__main__':
    sys.exit(cli())
