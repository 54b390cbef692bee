"""A trained model's row of the paper's evaluation table (its Table 5): parameters, image size, inference
throughput, ImageNet, ImageNet-ReaL and ImageNet-V2 top-1.

    python -m tools.eval_table --model deit_tiny_patch16_224 --resume output/tiny/checkpoint.pth \\
        --imagenet /data/imagenet --real-labels real.json --imagenet-v2 /data/imagenetv2-matched-frequency

Each top-1 is ``main.py --eval`` on that set (``--data-path DIR [--real-labels FILE]``, then ``--data-set
IMNETV2``), in this process; a set not given is left out of the row with a note. Throughput is measured as the
paper's Table 1: inference only, on one device, in the precision the evaluation resolved, with the largest
power-of-two batch that fits up to 4096 on a GPU (on a CPU, ``--throughput-batch``), as the median of
``--passes`` timed passes after a warm-up. Other flags go to every main.py evaluation (``--device``,
``--no-amp``, ``--input-size``, ``--batch-size``, ``--num_workers`` ...).
"""
import argparse
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

import checkpoint
import config
import inference
import main
import speedups
import utils
from engine import autocast
from precision import Precision
from utils import UserError

LARGEST_GPU_BATCH = 4096  # the paper's Table 1: the largest batch that fits, here a power of two up to this


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('python -m tools.eval_table', description=__doc__.split('\n\n')[0],
                                     epilog='Other flags go to every main.py --eval run.')
    parser.add_argument('--resume', required=True, metavar='CHECKPOINT', help='the trained checkpoint (file or URL)')
    parser.add_argument('--model', default='', help='timm model name (default: the one the checkpoint records)')
    parser.add_argument('--imagenet', default='', metavar='DIR',
                        help="ImageNet folder whose val/ is evaluated (main.py's --data-path)")
    parser.add_argument('--real-labels', default='', metavar='FILE',
                        help='real.json of google-research/reassessed-imagenet: ReaL top-1 of the --imagenet images')
    parser.add_argument('--imagenet-v2', default='', metavar='DIR',
                        help='ImageNet-V2 folder (class folders 0 ... 999; main.py --data-set IMNETV2)')
    parser.add_argument('--markdown', action='store_true', help='print the row as a Markdown table')
    parser.add_argument('--throughput-batch', default=64, type=int, metavar='N',
                        help='the batch of the throughput on a CPU (on a GPU: the largest power of two that fits, '
                             f'up to {LARGEST_GPU_BATCH})')
    parser.add_argument('--passes', default=10, type=int, metavar='N',
                        help='timed passes of the throughput, after one warm-up pass (their median counts)')
    return parser


def main_args(argv: List[str]) -> argparse.Namespace:
    """main.py's arguments for ``argv``, parsed by its own parser (defaults, --config)."""
    parser = config.CommandLineParser(description='main.py', parents=[main.get_args_parser()])
    return config.parse_args(parser, argv)


def evaluations(args) -> Tuple[List[Tuple[str, List[str]]], List[str]]:
    """The main.py flags of each evaluation to run, and a note for each set left out."""
    runs, notes = [], []
    if args.imagenet:
        real = ['--real-labels', args.real_labels] if args.real_labels else []
        runs.append(('ImageNet', ['--data-set', 'IMNET', '--data-path', args.imagenet, *real]))
    else:
        notes.append('no --imagenet: ImNet and ReaL top-1 left out')
    if args.imagenet and not args.real_labels:
        notes.append('no --real-labels: ReaL top-1 left out')
    if args.imagenet_v2:
        runs.append(('ImageNet-V2', ['--data-set', 'IMNETV2', '--data-path', args.imagenet_v2]))
    else:
        notes.append('no --imagenet-v2: V2 top-1 left out')
    return runs, notes


def run_main(argv: List[str]) -> Tuple[dict, argparse.Namespace]:
    """``main.py --eval`` in this process: its metrics, and its arguments as it resolved them."""
    run_args = main_args(argv)
    try:
        stats = main.main(run_args)
    finally:
        utils.leave_distributed()
    return stats, run_args


def resolved_eval_args(argv: List[str]) -> argparse.Namespace:
    """main.py's arguments for ``argv`` resolved as its evaluation resolves them (model, device, precision),
    where no evaluation ran."""
    run_args = main_args(argv)
    main.adopt_recorded_models(run_args)
    main.resolve_args(run_args)
    utils.leave_distributed()
    return run_args


def timed_passes(model: torch.nn.Module, batch: int, input_size: int, device: torch.device,
                 amp_dtype: Optional[torch.dtype], passes: int) -> List[float]:
    """Seconds of each of ``passes`` forward passes over a random batch, after one warm-up pass."""
    images = torch.randn(batch, 3, input_size, input_size, device=device)
    seconds = []
    with torch.inference_mode(), autocast(device, amp_dtype):
        for i in range(passes + 1):
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model(images)
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            if i:  # the warm-up builds kernels and caches
                seconds.append(time.perf_counter() - start)
                print(f'throughput: batch {batch}, pass {i}/{passes}: {batch / seconds[-1]:.1f} images/s', flush=True)
    return seconds


def throughput(model: torch.nn.Module, input_size: int, device: torch.device, amp_dtype: Optional[torch.dtype],
               cpu_batch: int, passes: int) -> Tuple[float, int]:
    """(images/s, batch) of inference: the median pass of the largest power-of-two batch that fits, up to
    LARGEST_GPU_BATCH, on a GPU; of ``cpu_batch`` elsewhere."""
    batch = LARGEST_GPU_BATCH if device.type == 'cuda' else cpu_batch
    while True:
        try:
            return batch / statistics.median(timed_passes(model, batch, input_size, device, amp_dtype, passes)), batch
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise UserError(f'the model does not fit in the memory of {device} even at batch 1') from None
            print(f'throughput: batch {batch} does not fit in the memory of {device}, trying {batch // 2}', flush=True)
        torch.cuda.empty_cache()  # outside the handler: its traceback no longer holds the failed pass's tensors
        batch //= 2


def measure_throughput(args, run_args: argparse.Namespace) -> Tuple[float, int, int, str]:
    """(images/s, parameters, image size, what was measured) of the checkpoint's model as the evaluation
    ran it: its device, precision, TF32 setting and --compile."""
    trained = inference.load_trained_model(args.resume, run_args.model, input_size=run_args.input_size)
    device = run_args.device
    amp_dtype = getattr(torch, run_args.amp_dtype) if run_args.amp else None
    main.set_fp32_precision(device, run_args.tf32)
    model = trained.model.to(device)
    speedups.unfuse_cpu_bf16_attention(model, device, amp_dtype)  # as main.py's evaluation runs it
    parameters = sum(p.numel() for p in model.parameters())
    if run_args.compile:
        model = speedups.compile_or_eager(model, 'student')
    images_per_s, batch = throughput(model, trained.input_size, device, amp_dtype, args.throughput_batch, args.passes)
    where = (torch.cuda.get_device_name(device) if device.type == 'cuda'
             else f'CPU, torch threads: {torch.get_num_threads()}')
    how = (f'the largest power of two that fits, up to {LARGEST_GPU_BATCH}' if device.type == 'cuda'
           else '--throughput-batch')
    precision = Precision(amp_dtype, reason="the evaluation's").name
    measured = (f'throughput: inference in {precision} on {where}, batch {batch} ({how}), median of {args.passes} '
                f'passes')
    return images_per_s, parameters, trained.input_size, measured


def table_row(name: str, parameters: int, input_size: int, images_per_s: float,
              top1: Dict[str, float]) -> Dict[str, str]:
    """The row's columns, in the paper's order and format (parameters in millions, top-1 to one decimal)."""
    row = {'network': name, 'params': f'{parameters / 1e6:.1f}M', 'image size': str(input_size),
           'throughput (im/s)': f'{images_per_s:.1f}'}
    row.update({f'{key} top-1': f'{value:.1f}' for key, value in top1.items()})
    return row


def format_row(row: Dict[str, str], markdown: bool) -> str:
    if markdown:
        align = ['---'] + ['---:'] * (len(row) - 1)
        return '\n'.join('| ' + ' | '.join(cells) + ' |' for cells in (list(row), align, list(row.values())))
    widths = [max(len(k), len(v)) for k, v in row.items()]
    return '\n'.join('  '.join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip()
                     for cells in (list(row), list(row.values())))


def run(args, extra: List[str]) -> str:
    """Evaluate every set given, measure the throughput, and return the table with its notes."""
    runs, notes = evaluations(args)
    common = ['--eval', '--resume', args.resume, *(['--model', args.model] if args.model else []), *extra]
    top1, run_args = {}, None
    for what, flags in runs:
        print(f'--- {what}: main.py {" ".join([*common, *flags])}', flush=True)
        stats, run_args = run_main([*common, *flags])
        if what == 'ImageNet':
            top1['ImNet'] = stats['acc1']
            if args.real_labels:
                top1['ReaL'] = stats['real_acc1']
        else:
            top1['V2'] = stats['acc1']
    if run_args is None:
        run_args = resolved_eval_args(common)
    print('--- throughput', flush=True)
    images_per_s, parameters, input_size, measured = measure_throughput(args, run_args)
    row = table_row(run_args.model, parameters, input_size, images_per_s, top1)
    return '\n'.join([format_row(row, args.markdown), '', measured, *(f'note: {note}' for note in notes)])


def cli(argv=None) -> int:
    parser = get_args_parser()
    args, extra = parser.parse_known_args(argv)
    if args.real_labels and not args.imagenet:
        parser.error('--real-labels scores the --imagenet validation images: add --imagenet DIR')
    if args.passes < 1 or args.throughput_batch < 1:
        parser.error('--passes and --throughput-batch take a positive number')
    try:
        table = run(args, extra)
    except utils.RunError as e:
        utils.print_error(e)
        return e.exit_code
    except checkpoint.TrainingInterrupted as stop:  # a stop signal during an evaluation
        print(f'{stop}', file=sys.stderr)
        return 128 + stop.signum
    print(table)
    return 0


if __name__ == '__main__':
    sys.exit(cli())
