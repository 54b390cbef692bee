"""Predict the classes of new images with a trained model: top-k class names and probabilities to a CSV file.

    python predict.py --resume output/run/checkpoint.pth photos/ more/*.jpg --topk 5 --output preds.csv

Images go through the evaluation transform of the run (its input size and crop, the fast data path) in
batches, in the default precision of the device (precision.py), as ``main.py --eval`` computes them; a
distilled model answers with its two heads averaged, as in evaluation. A file that cannot be read as an
image is skipped with one line and counted.
"""
import argparse
import csv
import glob
import io
import os
import sys
from typing import List

import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler

import fast_data
import inference
import speedups
import utils
from datasets import RobustSamples, TransformSettings, build_pipeline, collate_skipping
from engine import autocast, head_logits, split_batch
from main import default_num_workers
from precision import resolve_precision
from utils import MetricLogger, UserError

GLOB_CHARACTERS = set('*?[')


class ImageFiles(Dataset):
    """Image files in a given order; each item's target is its position in that order."""

    def __init__(self, paths: List[str], transform, loader):
        self.samples = [(path, i) for i, path in enumerate(paths)]
        self.transform, self.loader = transform, loader

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, position = self.samples[index]
        return self.transform(self.loader(path)), position


def expand_paths(paths: List[str]) -> List[str]:
    """Files, every file under a folder (sorted, hidden ones left out) and glob matches, in the order given,
    each once. A path that names nothing is a UserError."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            for folder, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
                found += [os.path.join(folder, f) for f in sorted(files) if not f.startswith('.')]
        elif os.path.isfile(path):
            found.append(path)
        elif GLOB_CHARACTERS & set(path) and glob.glob(path, recursive=True):
            found += sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        else:
            raise UserError(f'{path}: no such file, folder or matching files')
    return list(dict.fromkeys(found))


def prediction_loader(paths: List[str], trained: inference.TrainedModel, batch_size: int, num_workers: int,
                      device: torch.device, fast: bool):
    """Batches of the images at ``paths`` through the model's evaluation pipeline (datasets.build_pipeline)."""
    pipeline = build_pipeline(False, TransformSettings.for_eval(trained.input_size, trained.eval_crop_ratio, fast))
    samples = RobustSamples(ImageFiles(paths, pipeline.transform, pipeline.open_image), replace=False)
    loader = DataLoader(samples, sampler=SequentialSampler(samples), batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == 'cuda', collate_fn=collate_skipping)
    return fast_data.DeviceBatches(loader, pipeline.batch, device) if pipeline.batch else loader


@torch.inference_mode()
def predict(loader, model: torch.nn.Module, device: torch.device, amp_dtype, topk: int, print_freq: int = 10):
    """(position of the image, its top-k class indices, their probabilities) per readable image, and the
    unreadable files (each with its error)."""
    rows, skipped = [], []
    for batch in MetricLogger().log_every(loader, print_freq, 'Predict:'):
        images, positions, unreadable = split_batch(batch)
        for problem in unreadable:
            print(f'skipped {problem}', file=sys.stderr, flush=True)
        skipped += unreadable
        if len(images) == 0:
            continue
        with autocast(device, amp_dtype):
            logits = head_logits(model, images.to(device, non_blocking=True))['both']
        probabilities, classes = logits.float().softmax(dim=1).topk(topk, dim=1)
        rows += zip(positions.tolist(), classes.tolist(), probabilities.tolist())
    return rows, skipped


def write_csv(output: str, paths: List[str], rows, trained: inference.TrainedModel, topk: int) -> None:
    """One row per image: its path, then each of the top-k classes and its probability."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(['path'] + [f'{column}_{k}' for k in range(1, topk + 1) for column in ('class', 'prob')])
    for position, classes, probabilities in rows:
        cells = [value for index, p in zip(classes, probabilities) for value in (trained.label(index), f'{p:.6f}')]
        writer.writerow([paths[position], *cells])
    try:
        utils.write_text_atomic(output, buffer.getvalue())
    except utils.SaveError as e:
        raise UserError(str(e)) from None


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('python predict.py', description=__doc__.split('\n\n')[0])
    parser.add_argument('paths', nargs='+', metavar='PATH', help='image files, folders (searched recursively) or globs')
    parser.add_argument('--resume', required=True, metavar='CHECKPOINT',
                        help='checkpoint file or https URL of a run, or a timm model name with pretrained weights '
                             '(e.g. deit_tiny_patch16_224.fb_in1k, ImageNet classes)')
    parser.add_argument('--model', default='', help='timm model name (default: the one the checkpoint records)')
    parser.add_argument('--ema', action='store_true', help="the checkpoint's EMA weights ('model_ema')")
    parser.add_argument('--topk', default=5, type=int, help='classes per image (default: 5)')
    parser.add_argument('--output', default='predictions.csv', help='CSV file to write (default: predictions.csv)')
    parser.add_argument('--batch-size', default=64, type=int, help='images per batch (default: 64)')
    parser.add_argument('--num_workers', default=min(4, default_num_workers()), type=int,
                        help='data-loader worker processes (default: 4, at most the CPU cores)')
    parser.add_argument('--device', default=utils.DEFAULT_DEVICE,
                        help='cuda, cuda:N or cpu (default: cuda, cpu if CUDA is absent)')
    parser.add_argument('--no-amp', action='store_false', dest='amp', default=None,
                        help='fp32 (default: the device\'s default precision, as main.py)')
    parser.add_argument('--amp-dtype', default=None, choices=('float16', 'bfloat16'), help='autocast dtype')
    parser.add_argument('--no-fast-data', action='store_false', dest='fast_data',
                        help="timm's stock per-image transforms instead of the fast data path")
    parser.add_argument('--print-freq', default=10, type=int, help='batches between progress lines (default: 10)')
    return parser


def run(args) -> int:
    """Predict every image of ``args.paths``; returns how many files were skipped."""
    if args.topk <= 0 or args.batch_size <= 0 or args.num_workers < 0:
        raise UserError('--topk and --batch-size must be positive, --num_workers not negative')
    paths = expand_paths(args.paths)
    trained = inference.load_trained_model(args.resume, args.model, args.ema)
    topk = min(args.topk, len(trained.classes))
    device = utils.resolve_device(args.device)
    precision = resolve_precision(args.amp, args.amp_dtype, device)
    print(f'{trained.name}: {len(trained.classes)} classes, {trained.input_size} px; {len(paths)} files; '
          f'precision {precision.name} ({precision.reason})')
    model = trained.model.to(device)
    speedups.unfuse_cpu_bf16_attention(model, device, precision.dtype)
    loader = prediction_loader(paths, trained, args.batch_size, args.num_workers, device, args.fast_data)
    rows, skipped = predict(loader, model, device, precision.dtype, topk, args.print_freq)
    write_csv(args.output, paths, rows, trained, topk)
    print(f'wrote {len(rows)} predictions (top {topk}) to {args.output}'
          + (f'; {len(skipped)} unreadable files skipped' if skipped else ''))
    return len(skipped)


def cli(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(cli())
