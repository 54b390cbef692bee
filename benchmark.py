"""Throughput of this machine for DeiT training: data pipeline, training step, distillation, evaluation.

Every figure is the median of --repeats timed runs, and each is measured next to a baseline in the
same run (baseline and ours alternate within each repeat, so that a load change hits both):

  data   timm's stock create_transform pipeline with PIL decoding (as datasets.build_transform) vs
         --fast-data (fast_data.py); in this process on one thread, collate and the per-batch
         normalisation / erasing included: images/s per core.
  train  a plain eager forward / backward / AdamW step vs engine.train_one_epoch as main.py runs it
         (fused AdamW, --compile when given).
  distill the same with a hard-distillation teacher: plain eager teacher (no_grad) vs teacher.py.
         With --teacher-input-size, also what feeding the teacher its own inputs costs: our distillation
         step with the teacher's batches made beforehand (as a second data pipeline would) vs the same
         step converting the student's batch on the device (teacher.py's TeacherInputs: mean = std = 0.5
         and the teacher's size, from the student's ImageNet-normalised batch).
  eval   eager no_grad forward vs engine.evaluate (inference teacher-style, --compile when given).
  teacher the teacher's forward alone.

Model figures are also shown as a fraction of this machine's matmul rate in the precision each runs in
(the baseline fp32, ours as main.py picks or --amp-dtype says), measured in the same run, with FLOPs counted by torch.utils.flop_counter.FlopCounterMode (plus torch's attention formulas
for the CPU attention kernel, which it lacks).

  memory  the activation memory of one forward + backward, without and with --grad-checkpointing
         (timm's activation checkpointing): the peak resident memory it adds to a fresh process
         (not in the default sections: two model steps in subprocesses).
  shards  an image folder vs the WebDataset shards packed from it (tools/pack_shards.py, --data-set WDS):
         opens and stats on the data at start-up and in an epoch (strace), the start-up of a folder scan vs
         an info file of 1.28M samples (warm caches, and cold with --cold), what a data worker's memory grows
         by when it reads from 1,000 shards, and images/s per core of the train pipeline from the folder, the
         shards and shards packed with --max-side 320 (not in the default sections: minutes).

--breakdown also prints where the time goes, and the best ratio that leaves: the stages of both
train pipelines (ms per image) and the operator groups of our training step (eager, in its precision):
GEMMs, attention, elementwise, dtype casts, the optimizer, and the rest (Python, autograd).
"""
import argparse
import collections
import contextlib
import functools
import io
import json
import random
import re
import resource
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple
from unittest import mock

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils import flop_counter
from torchvision import transforms
from torchvision.datasets import ImageFolder

import fast_data
import main
import models  # noqa: F401  (registers our students in timm's registry)
import speedups
from datasets import (DataSettings, Pipeline, RobustSamples, TransformSettings, build_dataset, build_pipeline,
                      build_transform, collate_skipping)
from engine import LossScaler, TrainOptions, evaluate, train_one_epoch
from losses import DistillationLoss
from samplers import ResumableSampler
from precision import Precision, dtype_flag, resolve_precision
from teacher import InferenceTeacher, InputSpec, TeacherInputs, prepare_teacher
from tools import pack_shards

REPO = Path(__file__).resolve().parent


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('DeiT throughput benchmark', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='deit_tiny_patch16_224', help='student (any timm model)')
    parser.add_argument('--teacher-model', default='regnety_160', help='teacher for the distillation figures')
    parser.add_argument('--teacher-input-size', default=None, type=int, metavar='PIXELS',
                        help='(distill) a teacher trained at this size with mean = std = 0.5: adds the cost of '
                             'converting the student\'s batch to its inputs; unset: no such figure')
    parser.add_argument('--batch-size', default=32, type=int)
    parser.add_argument('--input-size', default=224, type=int)
    parser.add_argument('--images', default=192, type=int, help='generated JPEGs per data-pipeline pass')
    parser.add_argument('--image-size', default=(500, 375), type=int, nargs=2, metavar=('W', 'H'),
                        help='size of the generated JPEGs (ImageNet-like by default)')
    parser.add_argument('--steps', default=1, type=int, help='timed model steps per repeat')
    parser.add_argument('--repeats', default=3, type=int, help='timed runs per figure (the median is shown)')
    parser.add_argument('--sections', default=['data', 'train', 'distill', 'eval', 'teacher'], nargs='+',
                        choices=['data', 'train', 'distill', 'eval', 'teacher', 'memory', 'shards'])
    parser.add_argument('--scan-files', default=100_000, type=int,
                        help='shards: empty files in the folder whose scan is timed against the info file')
    parser.add_argument('--set-shards', default=1000, type=int, help='shards: shards of the set read at start-up')
    parser.add_argument('--set-samples', default=1281, type=int,
                        help='shards: samples per shard of that set (1,000 x 1,281: ImageNet-1k\'s train split)')
    parser.add_argument('--loader-workers', default=2, type=int,
                        help='shards: data-loader processes of the epoch whose opens and stats are counted')
    parser.add_argument('--cold', action='store_true',
                        help="shards: also time the start-up with the kernel's caches dropped before each run "
                             '(root; drops them for the whole machine)')
    parser.add_argument('--compile', action='store_true', help='torch.compile the student and the teacher (ours)')
    parser.add_argument('--amp-dtype', default='auto', choices=('auto', 'float32', 'bfloat16', 'float16'),
                        help="ours in this precision: 'auto' as main.py picks by default here (precision.py), "
                             'float32 as --no-amp, else as --amp-dtype (the baseline stays fp32)')
    parser.add_argument('--breakdown', action='store_true',
                        help='also time each stage of the train pipelines (with data) and profile the baseline '
                             'training step by operator group (with train), and print the best ratio each leaves')
    parser.add_argument('--json', default='', metavar='PATH', help='also write the figures as JSON here')
    parser.set_defaults(matmul_size=2048)  # of the matmul rate probes; --quick makes it small
    parser.add_argument('--quick', action='store_true',
                        help='tiny models, few small images, 2 repeats: seconds (for tests)')
    return parser


def apply_quick(args) -> None:
    """--quick: small enough that the whole benchmark takes seconds on 2 cores."""
    args.model, args.teacher_model = 'test_vit', 'test_byobnet'
    args.batch_size, args.input_size, args.images, args.image_size = 4, 64, 12, (96, 72)
    args.steps, args.repeats = 1, 2
    args.scan_files, args.set_shards, args.set_samples, args.loader_workers = 200, 6, 5, 1
    args.matmul_size = 256  # a 2048^2 bf16 matmul takes a minute on a CPU without native bf16


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------

def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def matmul_seconds(n: int, dtype: torch.dtype = torch.float32) -> float:
    """One n x n matmul in ``dtype`` (all of torch's threads), the operation a model step can at best run at."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    start = time.perf_counter()
    a @ b
    return time.perf_counter() - start


def time_pair(baseline: Callable[[], None], ours: Callable[[], None], repeats: int, matmul_size: int,
              ours_dtype: Optional[torch.dtype] = None) -> dict:
    """Median seconds of ``baseline`` and ``ours`` over ``repeats`` alternating runs after a warm-up
    round, and the rates (GFLOP/s) of a ``matmul_size`` square matmul measured between them, so that all
    see the same load:
    'gflops' by dtype name, fp32 and bf16 and the dtype ours autocasts to (``ours_dtype``).

    Ours runs with the allocator setting of main.py (speedups.keep_freed_memory), the baseline
    with glibc's default behaviour for large buffers.
    """
    runs = (('baseline', baseline, False), ('ours', ours, True))
    dtypes = {torch.float32, torch.bfloat16, ours_dtype or torch.float32}
    times = {'baseline': [], 'ours': [], **{dtype_name(d): [] for d in dtypes}}
    for repeat in range(repeats + 1):
        for name, fn, keep in runs:
            speedups.keep_freed_memory(keep)
            start = time.perf_counter()
            fn()
            if repeat:  # the first round warms up (and compiles)
                times[name].append(time.perf_counter() - start)
        for dtype in dtypes:
            times[dtype_name(dtype)].append(matmul_seconds(matmul_size, dtype))
    medians = {name: statistics.median(values) for name, values in times.items()}
    medians['gflops'] = {dtype_name(d): 2 * matmul_size ** 3 / medians.pop(dtype_name(d)) / 1e9 for d in dtypes}
    return medians


def dtype_name(dtype: Optional[torch.dtype]) -> str:
    return dtype_flag(dtype) or 'float32'


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


# FlopCounterMode counts the CUDA attention kernels but has no formula for the CPU flash kernel that
# scaled_dot_product_attention runs here: without these, a ViT's attention matmuls (14% of
# deit_tiny's FLOPs) would count as free. Same formulas as torch's for the CUDA kernels.
CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
                       torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
                           _cpu_attention_backward_flops}


def flops_by_operator(fn: Callable[[], None]) -> Dict[str, int]:
    """FLOPs that ``fn`` runs, by aten operator ('aten::mm': ...), the CPU attention kernels included."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    return {op._qualified_op_name: flops for op, flops in counter.get_flop_counts()['Global'].items()}


def count_flops(fn: Callable[[], None]) -> int:
    return sum(flops_by_operator(fn).values())


# ---------------------------------------------------------------------------------------------
# Data pipeline
# ---------------------------------------------------------------------------------------------

def make_photo_like_jpegs(root: Path, count: int, size, seed: int = 0) -> Path:
    """root/train/class_k/*.jpg and root/val/...: stripes plus pixel noise, quality 90.

    The noise gives the JPEGs the entropy of photographs (about 100 KB at 500x375, like ImageNet's
    average file), so decoding costs what it costs on real data; flat synthetic images decode faster.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent / 'tests'))
    from imagefolder import make_image
    rng, noise = random.Random(seed), np.random.default_rng(seed)
    for split in ('train', 'val'):
        for i in range(count):
            label = i % 2
            folder = root / split / f'class_{label}'
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.asarray(make_image(label, rng, size), dtype=np.int16)
            pixels = pixels + noise.integers(-40, 40, pixels.shape)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f'{i:04d}.jpg', quality=90)
    return root


def data_pass(dataset, batch_size: int, wrap: Optional[Callable] = None) -> Callable[[], None]:
    """One pass over ``dataset`` as the trainer reads it (seeded samples, collate), in this process."""
    sampler = ResumableSampler(SequentialSampler(dataset))
    loader = DataLoader(RobustSamples(dataset), sampler=sampler, batch_size=batch_size, collate_fn=collate_skipping)
    batches = wrap(loader) if wrap else loader

    def run():
        for _ in batches:
            pass
    return run


@contextlib.contextmanager
def one_thread():
    """Run the block on one thread: data figures are per core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def transform_settings(args) -> TransformSettings:
    """main.py's default transforms at --input-size."""
    return DataSettings.from_args(main.get_args_parser().parse_args(['--input-size', str(args.input_size)])).transform


def pipeline_folder(folder: Path, pipeline: Pipeline) -> ImageFolder:
    return ImageFolder(str(folder), transform=pipeline.transform, loader=pipeline.open_image)


def bench_data(args, root: Path) -> List[dict]:
    """Images/s per core of the train and eval pipelines, stock timm vs --fast-data."""
    settings = transform_settings(args)
    rows = []
    with one_thread():
        for is_train, name in ((True, 'data: train transform'), (False, 'data: eval transform')):
            folder = root / ('train' if is_train else 'val')
            baseline = ImageFolder(str(folder), transform=build_transform(is_train, settings))
            pipeline = build_pipeline(is_train, settings)
            ours = pipeline_folder(folder, pipeline)
            wrap = functools.partial(fast_data.DeviceBatches, stage=pipeline.batch, device=torch.device('cpu'))
            seconds = time_pair(data_pass(baseline, args.batch_size), data_pass(ours, args.batch_size, wrap),
                                args.repeats, args.matmul_size)
            rows.append(row(name, len(baseline), seconds, unit='img/s/core'))
    return rows


class StageTimer:
    """Seconds spent in named calls, summed by wrapping the callables a pipeline calls."""

    def __init__(self):
        self.seconds: Dict[str, float] = collections.defaultdict(float)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
        return timed

    def ms_per_image(self, run: Callable[[], None], images: int, repeats: int) -> Dict[str, float]:
        """Each stage's ms per image over ``repeats`` runs after a warm-up one (in the order of first
        call), 'other' for the rest of the run and 'total'."""
        run()
        self.seconds.clear()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        per_image = 1e3 / repeats / images
        stages = {name: seconds * per_image for name, seconds in self.seconds.items()}
        total = (time.perf_counter() - start) * per_image
        return {**stages, 'other': total - sum(stages.values()), 'total': total}


def train_pipeline_stages(args, root: Path) -> Dict[str, Dict[str, float]]:
    """Where the train pipelines' time goes: ms per image of each stage, stock and fast, one thread.

    The stages are timed where the pipelines call them (wrapped, not copied); 'other' is file
    reading, the sampler and per-sample seeding, collate and the conversions between stages.
    """
    settings, folder = transform_settings(args), root / 'train'
    stock_timer, fast_timer = StageTimer(), StageTimer()
    stock = ImageFolder(str(folder), transform=build_transform(True, settings))
    stock.loader = stock_timer.wrap('decode (PIL)', stock.loader)
    stock.transform = transforms.Compose([stock_timer.wrap(type(t).__name__, t) for t in stock.transform.transforms])

    pipeline = build_pipeline(True, settings)
    fast = pipeline_folder(folder, pipeline)
    transform = pipeline.transform
    fast.loader = fast_timer.wrap('open (header)', fast.loader)
    transform.crop_box = fast_timer.wrap('crop box', transform.crop_box)
    transform.steps = [fast_timer.wrap(type(t).__name__, t) for t in transform.steps]

    def device_batches(loader):
        batches = fast_data.DeviceBatches(loader, pipeline.batch, torch.device('cpu'))
        batches.normalise = fast_timer.wrap('normalise (batch)', batches.normalise)
        batches.erase = fast_timer.wrap('erase (batch)', batches.erase)
        return batches
    # FastTrainTransform calls these module functions by name: timed while patched, restored after.
    timed_functions = {name: fast_timer.wrap(name, getattr(fast_data, name))
                       for name in ('decode', 'resize')}
    with one_thread(), mock.patch.multiple(fast_data, **timed_functions):
        return {'stock': stock_timer.ms_per_image(data_pass(stock, args.batch_size), len(stock), args.repeats),
                'fast': fast_timer.ms_per_image(data_pass(fast, args.batch_size, device_batches), len(fast),
                                                args.repeats)}


# ---------------------------------------------------------------------------------------------
# Model steps
# ---------------------------------------------------------------------------------------------

def synthetic_batches(args, steps: int, num_classes: int = 1000) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(args.batch_size, 3, args.input_size, args.input_size, generator=g),
             torch.randint(0, num_classes, (args.batch_size,), generator=g), []) for _ in range(steps)]


def create(name: str, args) -> torch.nn.Module:
    torch.manual_seed(0)
    try:
        return timm.create_model(name, num_classes=1000, img_size=args.input_size)
    except TypeError:
        return timm.create_model(name, num_classes=1000)


def engine_options(amp_dtype: Optional[torch.dtype]) -> TrainOptions:
    """train_one_epoch's steps as main.py runs them: autocast to ``amp_dtype`` (None: fp32), progress
    only at the ends."""
    return TrainOptions(amp_dtype=amp_dtype, print_freq=10 ** 6)


def plain_step(model, optimizer, batches, teacher=None) -> Callable[[], None]:
    """The baseline: eager forward, cross-entropy (plus hard distillation), backward, torch AdamW."""
    def run():
        model.train()
        for images, targets, _ in batches:
            optimizer.zero_grad()
            outputs = model(images)
            loss = F.cross_entropy(outputs, targets)
            if teacher is not None:
                with torch.no_grad():
                    teacher_labels = teacher(images).argmax(dim=1)
                loss = 0.5 * loss + 0.5 * F.cross_entropy(outputs, teacher_labels)
            loss.backward()
            optimizer.step()
    return run


def project_step(model, optimizer, batches, teacher=None,
                 amp_dtype: Optional[torch.dtype] = None) -> Callable[[], None]:
    """Ours: engine.train_one_epoch, the loop main.py runs (its progress lines silenced)."""
    criterion = DistillationLoss(torch.nn.CrossEntropyLoss(), teacher, 'hard' if teacher else 'none', 0.5, 1.0,
                                 distillation_token=False)
    scaler = LossScaler(enabled=amp_dtype == torch.float16, device_type='cpu')

    def run():
        with contextlib.redirect_stdout(io.StringIO()):
            train_one_epoch(model, criterion, batches, optimizer, torch.device('cpu'), 0, scaler,
                            engine_options(amp_dtype))
    return run


def train_flops(model, batches) -> float:
    """FLOPs per image of forward + backward (the optimizer's elementwise work is not counted)."""
    images, targets, _ = batches[0]

    def step():
        F.cross_entropy(model(images), targets).backward()
    flops = count_flops(step)
    model.zero_grad(set_to_none=True)
    return flops / len(images)


def our_eager_student(args):
    """Our student and its optimizer as main.py builds them (before --compile): fused AdamW, and the
    attention path of its precision."""
    model = create(args.model, args)
    speedups.unfuse_cpu_bf16_attention(model, torch.device('cpu'), args.ours_dtype)
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-4, weight_decay=0.05,
                                    **speedups.optimizer_kwargs(torch.device('cpu')))
    return model, optimizer


def students(args):
    """(baseline model + optimizer, our model + optimizer), same initial weights."""
    base_model = create(args.model, args)
    base_opt = torch.optim.AdamW(base_model.parameters(), lr=1e-4, weight_decay=0.05)
    our_model, our_opt = our_eager_student(args)
    if args.compile:
        our_model = speedups.compile_or_eager(our_model, 'student')
    return (base_model, base_opt), (our_model, our_opt)


def teachers(args):
    base = create(args.teacher_model, args).eval().requires_grad_(False)
    cpu = torch.device('cpu')
    ours = prepare_teacher(create(args.teacher_model, args), cpu, compile=args.compile,
                           amp_dtype=args.ours_dtype)  # the student's precision, as main.py's build_teacher
    return base, ours


class PremadeInputs(torch.nn.Module):
    """A teacher given batches made beforehand, one per call in turn, whatever it is passed: the cost of
    its inputs left out of the step."""

    def __init__(self, teacher: torch.nn.Module, premade: List[torch.Tensor]):
        super().__init__()
        self.teacher, self.premade, self.calls = teacher, premade, 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch = self.premade[self.calls % len(self.premade)]
        self.calls += 1
        return self.teacher(batch)


def teacher_input_figure(args, our_model, our_opt, batches, images: int) -> dict:
    """Our distillation step with the teacher's inputs made beforehand vs converted from the student's batch
    on the device, for a teacher at --teacher-input-size trained with mean = std = 0.5."""
    student = InputSpec(args.input_size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    half = (0.5, 0.5, 0.5)
    convert = TeacherInputs(student, InputSpec(args.teacher_input_size, half, half))
    premade = [convert(x) for x, _, _ in batches]
    sized = prepare_teacher(create(args.teacher_model, Namespace(input_size=args.teacher_input_size)),
                            torch.device('cpu'), compile=args.compile, amp_dtype=args.ours_dtype).model
    converting = InferenceTeacher(sized, args.ours_dtype, convert)
    given = PremadeInputs(InferenceTeacher(sized, args.ours_dtype), premade)
    seconds = time_pair(project_step(our_model, our_opt, batches, given, args.ours_dtype),
                        project_step(our_model, our_opt, batches, converting, args.ours_dtype), args.repeats,
                        args.matmul_size, args.ours_dtype)
    return row(f'teacher @{args.teacher_input_size}: made -> converted', images, seconds, ours_dtype=args.ours_dtype)


def bench_models(args) -> List[dict]:
    rows = []
    batches = synthetic_batches(args, args.steps)
    images = args.batch_size * args.steps
    (base_model, base_opt), (our_model, our_opt) = students(args)
    step_flops = train_flops(base_model, batches)
    base_teacher = our_teacher = None
    if {'distill', 'teacher'} & set(args.sections):
        base_teacher, our_teacher = teachers(args)
        teacher_flops = count_flops(lambda: base_teacher(batches[0][0])) / args.batch_size

    if 'train' in args.sections:
        seconds = time_pair(plain_step(base_model, base_opt, batches),
                            project_step(our_model, our_opt, batches, amp_dtype=args.ours_dtype), args.repeats,
                            args.matmul_size, args.ours_dtype)
        rows.append(row(f'train step: {args.model}', images, seconds, step_flops, ours_dtype=args.ours_dtype))
    if 'distill' in args.sections:
        seconds = time_pair(plain_step(base_model, base_opt, batches, base_teacher),
                            project_step(our_model, our_opt, batches, our_teacher, args.ours_dtype), args.repeats,
                            args.matmul_size, args.ours_dtype)
        rows.append(row(f'distill step: <- {args.teacher_model}', images, seconds, step_flops + teacher_flops, ours_dtype=args.ours_dtype))
        if args.teacher_input_size:
            rows.append(teacher_input_figure(args, our_model, our_opt, batches, images))
    if 'eval' in args.sections:
        base_model.eval()
        eval_flops = count_flops(lambda: base_model(batches[0][0])) / args.batch_size
        eval_batches = [(x, y.remainder(1000), []) for x, y, _ in batches]

        def plain_eval():
            with torch.no_grad():
                for x, _, _ in eval_batches:
                    base_model(x)

        def project_eval():
            with contextlib.redirect_stdout(io.StringIO()):
                evaluate(eval_batches, our_model, torch.device('cpu'), args.ours_dtype)
        seconds = time_pair(plain_eval, project_eval, args.repeats, args.matmul_size, args.ours_dtype)
        rows.append(row(f'eval: {args.model}', images, seconds, eval_flops, ours_dtype=args.ours_dtype))
    if 'teacher' in args.sections:
        def plain_teacher():
            with torch.no_grad():
                for x, _, _ in batches:
                    base_teacher(x)

        def our_teacher_forward():
            for x, _, _ in batches:
                our_teacher(x)
        seconds = time_pair(plain_teacher, our_teacher_forward, args.repeats, args.matmul_size, args.ours_dtype)
        rows.append(row(f'teacher forward: {args.teacher_model}', images, seconds, teacher_flops, ours_dtype=args.ours_dtype))
    return rows


# The operators a compiler cannot remove from a ViT step: GEMMs (linear layers, the patch
# embedding's convolution) and the attention: a fused kernel, or unfused (speedups.py) its two
# batched matmuls and softmax, the only batched matmuls of a ViT.
GEMM_OPS = {'aten::mm', 'aten::addmm', 'aten::baddbmm', 'aten::_addmm_activation',
            'aten::convolution', 'aten::convolution_backward'}
UNFUSED_ATTENTION_OPS = {'aten::bmm', 'aten::_softmax', 'aten::_softmax_backward_data'}
# What autocast adds: copies of weights and activations into the autocast dtype and back.
CAST_OPS = {'aten::_to_copy', 'aten::to', 'aten::copy_'}
STEP_GROUPS = ('matmul', 'attention', 'elementwise', 'casts', 'optimizer')


def operator_group(name: str) -> str:
    if 'attention' in name or name in UNFUSED_ATTENTION_OPS:  # fused kernels: forward and backward, any device
        return 'attention'
    if name in GEMM_OPS:
        return 'matmul'
    return 'casts' if name in CAST_OPS else 'elementwise'


class OperatorTimer(TorchDispatchMode):
    """Seconds spent in each operator group, forward and backward, while active; every operator the
    optimizer's step runs counts as 'optimizer' (``in_optimizer`` set by the optimizer's step hooks).

    A dispatch mode rather than torch.profiler: it sees the same aten operators, and kineto prints
    its own start/stop (and GPU-probe) lines on machines without a GPU.
    """

    def __init__(self):
        super().__init__()
        self.seconds: Dict[str, float] = collections.defaultdict(float)
        self.in_optimizer = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        group = 'optimizer' if self.in_optimizer else operator_group(func.name())
        self.seconds[group] += time.perf_counter() - start
        return out

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.register_step_pre_hook(lambda *_: setattr(self, 'in_optimizer', True))
        optimizer.register_step_post_hook(lambda *_: setattr(self, 'in_optimizer', False))


def step_profile(args) -> Dict[str, Dict[str, float]]:
    """Where our training step's time goes (eager, in its precision): each operator group's share of the
    profiled step ('other' is the rest: Python, autograd, dispatch), the GFLOP/s that the matmul and
    attention groups run at within it, and the best speedup left if only they remained ('bound': the
    step timed without the timer / their seconds)."""
    model, optimizer = our_eager_student(args)
    step = project_step(model, optimizer, synthetic_batches(args, 1), amp_dtype=args.ours_dtype)
    step()  # warm-up
    walls = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        walls.append(time.perf_counter() - start)
    timer = OperatorTimer()
    timer.watch(optimizer)
    start = time.perf_counter()
    with timer:
        step()
    profiled = time.perf_counter() - start  # timing each operator adds its own overhead to the step
    flops = collections.Counter()
    for op, count in flops_by_operator(step).items():
        flops[operator_group(op)] += count
    shares = {group: timer.seconds[group] / profiled for group in STEP_GROUPS}
    seconds = {group: timer.seconds[group] for group in ('matmul', 'attention')}
    return {'share': {**shares, 'other': 1 - sum(shares.values())},
            'gflops': {group: flops[group] / seconds[group] / 1e9 if seconds[group] else 0.0 for group in seconds},
            'bound': statistics.median(walls) / sum(seconds.values()), 'dtype': dtype_name(args.ours_dtype)}


def step_memory_probe(name: str, batch_size: int, input_size: int, checkpointing: bool) -> float:
    """MiB that one forward + backward adds to this process's resident memory at its peak, the weights,
    their gradients and the batch being in memory already (run in a fresh process: see activation_memory)."""
    args = Namespace(input_size=input_size)
    model = create(name, args)
    if checkpointing:
        main.enable_grad_checkpointing(model, name)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, input_size, input_size, generator=g)
    targets = torch.randint(0, 1000, (batch_size,), generator=g)

    def step(n: int) -> None:
        F.cross_entropy(model(images[:n]), targets[:n]).backward()
    step(1)  # allocates the gradients and loads the kernels: what remains is the activations
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # resets the peak (VmHWM) to the current resident size
    before = proc_status_kib('VmRSS')
    step(batch_size)
    return (proc_status_kib('VmHWM') - before) / 1024


def proc_status_kib(field: str) -> int:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ':'))


def activation_memory(args) -> dict:
    """step_memory_probe without and with checkpointing, each in a fresh process. glibc returns every
    allocation above 64 KiB to the system when it is freed (a fixed mmap threshold), so that the
    resident size follows the tensors alive."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536')
    probes = {}
    for name, checkpointing in (('plain', False), ('checkpointing', True)):  # side by side: one start-up time
        code = (f'import benchmark; print(benchmark.step_memory_probe({args.model!r}, {args.batch_size}, '
                f'{args.input_size}, {checkpointing}))')
        probes[name] = subprocess.Popen([sys.executable, '-c', code], cwd=REPO, env=env,
                                        stdout=subprocess.PIPE, text=True)
    mib = {}
    for name, proc in probes.items():
        out, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f'the {name} memory probe failed (exit {proc.returncode})')
        mib[name] = float(out.split()[-1])
    mib['saving'] = 1 - mib['checkpointing'] / mib['plain']
    print(f'memory: {mib["plain"]:.0f} -> {mib["checkpointing"]:.0f} MiB', file=sys.stderr, flush=True)
    return mib


# ---------------------------------------------------------------------------------------------
# Data at scale: an image folder vs WebDataset shards (tools/pack_shards.py, --data-set WDS)
# ---------------------------------------------------------------------------------------------

# The calls that reach a filesystem's metadata by path (a network filesystem's server round trips);
# fstat of an open file is answered by the open file (strace shows it as newfstatat(fd, "", ...)).
PATH_SYSCALLS = {'open': 'opens', 'openat': 'opens', 'openat2': 'opens', 'stat': 'stats', 'lstat': 'stats',
                 'newfstatat': 'stats', 'statx': 'stats', 'access': 'stats', 'faccessat': 'stats',
                 'faccessat2': 'stats'}
PATH_CALL = re.compile(r'^\d+\s+(\w+)\((?:AT_FDCWD, |-?\d+, )?"([^"]*)"')
PHASE_MARKER = '/deit-bench-epoch-starts'


def train_split(data_set: str, data_path: str, input_size: int) -> Tuple[Dataset, Pipeline]:
    """The train split and pipeline main.py builds from these flags (its defaults otherwise: --fast-data)."""
    settings = DataSettings.from_args(main.get_args_parser().parse_args(
        ['--data-set', data_set, '--data-path', data_path, '--input-size', str(input_size)]))
    pipeline = build_pipeline(True, settings.transform)
    return build_dataset(True, settings, pipeline)[0], pipeline


def shuffled_pass(dataset, pipeline: Pipeline, batch_size: int, workers: int = 0) -> Callable[[], None]:
    """One epoch in a seeded random order (as --shuffle global orders shards), read as the trainer reads it."""
    loader = DataLoader(RobustSamples(dataset), batch_size=batch_size, num_workers=workers,
                        sampler=RandomSampler(dataset, generator=torch.Generator().manual_seed(0)),
                        collate_fn=collate_skipping)
    batches = fast_data.DeviceBatches(loader, pipeline.batch, torch.device('cpu')) if pipeline.batch else loader

    def run():
        for _ in batches:
            pass
    return run


def syscall_probe(runs: List[Tuple[str, str, bool]], input_size: int, batch_size: int, workers: int) -> None:
    """Run by count_data_syscalls under strace: for each (data set, path, epoch) build the train split and, if
    ``epoch``, read one epoch; a stat of a marker path starts each phase."""
    for number, (data_set, data_path, epoch) in enumerate(runs):
        with contextlib.suppress(OSError):
            os.stat(f'{PHASE_MARKER}/{number}/start-up')
        dataset, pipeline = train_split(data_set, data_path, input_size)
        with contextlib.suppress(OSError):
            os.stat(f'{PHASE_MARKER}/{number}/epoch')
        if epoch:
            shuffled_pass(dataset, pipeline, batch_size, workers)()


def count_data_syscalls(runs: List[Tuple[str, Path, bool]], args) -> Optional[List[dict]]:
    """For each (data set, path, epoch): the opens and stat-like calls on paths under that path while the train
    split is built ('start-up') and while --loader-workers processes read one epoch ('epoch'), counted by
    strace in one fresh process; None without strace."""
    if not shutil.which('strace'):
        return None
    runs = [(data_set, os.path.realpath(path), epoch) for data_set, path, epoch in runs]
    code = (f'import benchmark; benchmark.syscall_probe({runs!r}, {args.input_size}, {args.batch_size}, '
            f'{args.loader_workers})')
    counts = [{'start-up': collections.Counter(), 'epoch': collections.Counter()} for _ in runs]
    with tempfile.NamedTemporaryFile(prefix='deit-bench-strace-') as trace:
        # --seccomp-bpf: only the traced calls stop the process, not every read of the data
        subprocess.run(['strace', '-f', '-qq', '--seccomp-bpf', '-o', trace.name, '-e',
                        'trace=' + ','.join(PATH_SYSCALLS), sys.executable, '-c', code],
                       cwd=REPO, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS='1'))
        number, phase = None, None
        for line in Path(trace.name).read_text().splitlines():
            call = PATH_CALL.match(line)
            if not call or call[1] not in PATH_SYSCALLS:
                continue
            path = call[2]
            if path.startswith(PHASE_MARKER + '/'):
                number, phase = int(path.split('/')[-2]), path.split('/')[-1]
            elif number is not None and (path + '/').startswith(runs[number][1] + '/'):
                counts[number][phase][PATH_SYSCALLS[call[1]]] += 1
    return [{phase: {kind: found[kind] for kind in ('opens', 'stats')} for phase, found in run.items()}
            for run in counts]


def drop_page_cache() -> bool:
    """Empty the kernel's page, dentry and inode caches, so that the next reads are cold (root only)."""
    try:
        os.sync()
        with open('/proc/sys/vm/drop_caches', 'w') as f:
            f.write('3')
        return True
    except OSError:
        return False


def startup_seconds(build: Callable[[], object], repeats: int, cold: bool) -> Optional[float]:
    """Median seconds of ``build`` after a warm-up run, with warm caches, or each run after the caches were
    dropped (None where they cannot be)."""
    build()
    times = []
    for _ in range(repeats):
        if cold and not drop_page_cache():
            return None
        start = time.perf_counter()
        build()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_empty_image_folder(root: Path, files: int, classes: int = 100) -> Path:
    """root/train/ with ``files`` empty .jpg files in ``classes`` class folders: what a scan reads is names."""
    for i in range(files):
        folder = root / 'train' / f'n{i % classes:08d}'
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f'{i:08d}.jpg').touch()
    return root


def make_shard_set(root: Path, shards: int, samples: int) -> Path:
    """A train split of ``shards`` shards of ``samples`` small JPEGs each in pack_shards' layout, with its
    _info.json; one shard is written, the others are hard links to it."""
    root.mkdir(parents=True)
    image = pack_shards.Encoded(pack_shards.save(Image.new('RGB', (32, 24), (90, 140, 200)), 'JPEG'), 'jpg')
    names = [pack_shards.shard_name('set', 'train', k) for k in range(shards)]
    shard = pack_shards.ShardFile(str(root), names[0], 0)
    for i in range(samples):
        shard.add(i, i % 1000, f'{i:08d}.jpg', image)
    shard.finish(samples)
    for name in names[1:]:
        os.link(root / names[0], root / name)
    info = {'name': 'set', 'num_classes': 1000, 'classes': [f'n{k:08d}' for k in range(1000)],
            'splits': {'train': {'name': 'train', 'num_samples': shards * samples, 'filenames': names,
                                 'shard_lengths': [samples] * shards}}}
    (root / pack_shards.INFO).write_text(json.dumps(info))
    return root


def shard_memory_probe(data_path: str, input_size: int) -> str:
    """Run in a fresh process, as a data-loader worker: after a first sample (the pipeline warmed up), what
    reading one sample of each other shard adds to the resident size at its peak (MiB), the ms per shard (its
    first read indexes it), the files open after, and the process's peak resident size (MiB)."""
    dataset, _ = train_split('WDS', data_path, input_size)
    firsts = [int(i) for i in np.cumsum([0, *dataset.shard_lengths[:-1]])]
    dataset[firsts[0]]
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # resets the peak (VmHWM) to the current resident size
    before = proc_status_kib('VmRSS')
    start = time.perf_counter()
    for index in firsts[1:]:
        dataset[index]
    shards = max(1, len(firsts) - 1)
    return json.dumps({'mib': (proc_status_kib('VmHWM') - before) / 1024, 'shards': shards,
                       'ms_per_shard': (time.perf_counter() - start) * 1e3 / shards,
                       'open_files': len(os.listdir('/proc/self/fd')), 'peak_mib': proc_status_kib('VmHWM') / 1024})


def worker_memory(data_path: Path, input_size: int) -> dict:
    code = f'import benchmark; print(benchmark.shard_memory_probe({str(data_path)!r}, {input_size}))'
    out = subprocess.run([sys.executable, '-c', code], cwd=REPO, check=True, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS='1')).stdout
    return json.loads(out.splitlines()[-1])


def bench_shards(args, root: Path) -> dict:
    """Folder vs shards: opens and stats, start-up, a data worker's memory, train-pipeline throughput."""
    def step(text: str) -> None:
        print(f'shards: {text}', file=sys.stderr, flush=True)
    step(f'packing {args.images} generated JPEGs, as they are and with --max-side 320')
    photos = make_photo_like_jpegs(root / 'photos', args.images, tuple(args.image_size))
    # about eight shards of the generated images, whatever their size (a sample's three members: the image,
    # its .cls and .json, each with its tar header)
    sample_bytes = [pack_shards.member_bytes(p.stat().st_size) + 4 * pack_shards.TAR_BLOCK
                    for p in (photos / 'train').rglob('*.jpg')]
    shard_size = sum(sample_bytes) // 8 + 1
    for name, max_side in (('shards', 0), ('shards-320', 320)):
        pack_shards.pack_folder(str(photos), str(root / name), shard_size=shard_size, max_side=max_side,
                                log=lambda line: None)
    report = {'images': args.images, 'shards': len(list((root / 'shards').glob('*-train-*.tar'))),
              'loader_workers': args.loader_workers}

    # What a network filesystem pays for: opens and stats on the data, at start-up and during an epoch.
    step(f'a folder of {args.scan_files:,} files and a set of {args.set_shards:,} shards of {args.set_samples:,}')
    scan = make_empty_image_folder(root / 'scan', args.scan_files)
    shard_set = make_shard_set(root / 'set', args.set_shards, args.set_samples)
    step('counting opens and stats with strace')
    names = ('folder', 'shards', 'folder scan', 'shard set')
    counts = count_data_syscalls([('IMNET', photos, True), ('WDS', root / 'shards', True), ('IMNET', scan, False),
                                  ('WDS', shard_set, False)], args)
    report['syscalls'] = dict(zip(names, counts)) if counts else None

    # Start-up: scanning the folder vs reading the info file of the shard set.
    step('timing the start-up' + (' (warm and cold caches)' if args.cold else ''))
    builds = {'folder scan': lambda: train_split('IMNET', str(scan), args.input_size),
              'shard set': lambda: train_split('WDS', str(shard_set), args.input_size)}
    report['startup'] = {name: {'warm_s': startup_seconds(build, args.repeats, cold=False),
                                'cold_s': startup_seconds(build, args.repeats, cold=True) if args.cold else None}
                         for name, build in builds.items()}
    report['scan_files'], report['set_samples'] = args.scan_files, args.set_shards * args.set_samples
    report['set_shards'] = args.set_shards
    step(f'a data worker reading from {args.set_shards:,} shards')
    report['worker_memory'] = worker_memory(shard_set, args.input_size)
    step('timing the train pipeline from the folder and from the shards')

    # Throughput per core of the train pipeline: the folder vs its shards vs shards packed with --max-side 320.
    with one_thread():
        passes = {name: shuffled_pass(*train_split(data_set, str(path), args.input_size), args.batch_size)
                  for name, data_set, path in (('folder', 'IMNET', photos), ('shards', 'WDS', root / 'shards'),
                                               ('shards --max-side 320', 'WDS', root / 'shards-320'))}
        seconds = alternating_seconds(passes, args.repeats)
        report['images_per_s'] = {name: args.images / s for name, s in seconds.items()}
    return report


def alternating_seconds(runs: Dict[str, Callable[[], None]], repeats: int) -> Dict[str, float]:
    """Median seconds of each run over ``repeats`` rounds after a warm-up one; the runs alternate within each
    round, so that a change of load hits them all."""
    times = {name: [] for name in runs}
    for repeat in range(repeats + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if repeat:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def format_shards(report: dict, args) -> str:
    """The data-at-scale figures (the throughput rows are in the table)."""
    rates = report['images_per_s']
    lines = ['data at scale: an image folder vs its WebDataset shards (tools/pack_shards.py, --data-set WDS)',
             f'  train pipeline, one thread, {report["images"]} JPEGs of {args.image_size[0]}x{args.image_size[1]} in '
             f'random order: ' + ', '.join(f'{name} {rate:.1f} img/s ({rate / rates["folder"]:.2f}x)'
                                           for name, rate in rates.items())]
    calls = report['syscalls']
    if calls is None:
        lines.append('  opens and stats: strace not found (apt-get install strace), not counted')
    else:
        lines.append(f'  opens / stats on the data ({report["images"]} images, {report["shards"]} shards, '
                     f'{report["loader_workers"]} loader workers, one epoch in random order):')
        for name in ('folder', 'shards'):
            c = calls[name]
            lines.append(f'    {name:<7} start-up {c["start-up"]["opens"]} / {c["start-up"]["stats"]}, '
                         f'epoch {c["epoch"]["opens"]} / {c["epoch"]["stats"]}')
        lines.append(f'    start-up at scale: folder scan of {report["scan_files"]:,} files '
                     f'{calls["folder scan"]["start-up"]["opens"]} / {calls["folder scan"]["start-up"]["stats"]}, '
                     f'info file of {report["set_samples"]:,} samples in {report["set_shards"]:,} shards '
                     f'{calls["shard set"]["start-up"]["opens"]} / {calls["shard set"]["start-up"]["stats"]}')
    startup = report['startup']

    def seconds(value: Optional[float]) -> str:
        return f'{value:.3f} s' if value is not None else 'not measured (--cold, as root)'
    lines.append(f'  start-up, warm cache: folder scan of {report["scan_files"]:,} files '
                 f'{seconds(startup["folder scan"]["warm_s"])}, info file of {report["set_samples"]:,} samples '
                 f'{seconds(startup["shard set"]["warm_s"])}')
    lines.append(f'  start-up, cold cache: folder scan {seconds(startup["folder scan"]["cold_s"])}, '
                 f'info file {seconds(startup["shard set"]["cold_s"])}')
    memory = report['worker_memory']
    lines.append(f'  a data worker reading one sample of each of {memory["shards"]:,} more shards of '
                 f'{args.set_samples:,} samples: +{memory["mib"]:.1f} MiB at its peak ({memory["peak_mib"]:.0f} MiB in '
                 f'all), {memory["ms_per_shard"]:.2f} ms per shard (its first read indexes it), '
                 f'{memory["open_files"]} files open after')
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def row(name: str, images: int, seconds: dict, flops_per_image: float = 0.0, unit: str = 'img/s',
        ours_dtype: Optional[torch.dtype] = None) -> dict:
    """One line of the table (from time_pair's medians); model lines also as a fraction of the matmul limit
    of the precision each side runs in (the baseline fp32, ours ``ours_dtype``)."""
    baseline, ours = images / seconds['baseline'], images / seconds['ours']
    rates = seconds['gflops']
    entry = {'name': name, 'unit': unit, 'baseline': baseline, 'ours': ours, 'ratio': ours / baseline,
             'matmul_gflops': rates['float32'], 'bf16_matmul_gflops': rates['bfloat16'],
             'ours_dtype': dtype_name(ours_dtype), 'peak_rss_mib': peak_rss_mib()}
    if flops_per_image:
        entry['gflop_per_image'] = flops_per_image / 1e9
        entry['baseline_of_limit'] = baseline * flops_per_image / 1e9 / rates['float32']
        entry['ours_of_limit'] = ours * flops_per_image / 1e9 / rates[dtype_name(ours_dtype)]
    print(f'{name}: {baseline:.1f} -> {ours:.1f} {unit} ({ours / baseline:.2f}x)', file=sys.stderr, flush=True)
    return entry


def format_table(rows: List[dict]) -> str:
    lines = [f'{"figure":<38} {"unit":>10} {"baseline":>8} {"ours":>8} {"ratio":>6} {"GFLOP/img":>9} '
             f'{"fp32 mm":>8} {"bf16 mm":>8} {"base %lim":>9} {"ours %lim":>9} {"peak RSS":>9}']
    for r in rows:
        limits = (f'{r["gflop_per_image"]:>9.2f} {r["matmul_gflops"]:>8.0f} {r["bf16_matmul_gflops"]:>8.0f} '
                  f'{100 * r["baseline_of_limit"]:>8.0f}% {100 * r["ours_of_limit"]:>8.0f}%'
                  if 'gflop_per_image' in r else f'{"":>9} {"":>8} {"":>8} {"":>9} {"":>9}')
        lines.append(f'{r["name"]:<38} {r["unit"]:>10} {r["baseline"]:>8.1f} {r["ours"]:>8.1f} '
                     f'{r["ratio"]:>5.2f}x {limits} {r["peak_rss_mib"]:>5.0f} MiB')
    return '\n'.join(lines)


def format_breakdown(breakdown: dict, rows: List[dict], args) -> str:
    """The breakdown's lines, each ending with the best ratio over the baseline it leaves."""
    lines = []
    if 'train pipeline' in breakdown:
        stages = breakdown['train pipeline']
        lines.append(f'where the train pipeline\'s time goes, ms per image (one thread, {args.images} JPEGs of '
                     f'{args.image_size[0]}x{args.image_size[1]}, mean of {args.repeats} passes):')
        for name, ms in stages.items():
            parts = ', '.join(f'{stage} {value:.2f}' for stage, value in ms.items() if stage != 'total')
            lines.append(f'  {name:<5} {ms["total"]:.2f} = {parts}')
        kept = stages['fast']['decode']
        lines.append(f'  the fast path\'s JPEG decoding (libjpeg-turbo, as PIL\'s) alone takes {kept:.2f} ms: at most '
                     f'{stages["stock"]["total"] / kept:.2f}x the stock pipeline if everything else took no time')
    if 'train step' in breakdown:
        profile = breakdown['train step']
        shares, rates, dtype = profile['share'], profile['gflops'], profile['dtype']
        # The best a step could do is to run its GEMMs and attention and nothing else ('bound'); and then
        # to run the attention's FLOPs at the GEMMs' rate.
        kept = shares['matmul'] + shares['attention']
        floor = (shares['matmul'] + shares['attention'] * rates['attention'] / rates['matmul']) / kept
        train = next((r for r in rows if r['name'].startswith('train step')), None)
        limit_rate = train and (train['bf16_matmul_gflops'] if dtype == 'bfloat16' else train['matmul_gflops'])
        limit = f' and {100 * train["ours_of_limit"] * profile["bound"]:.0f}% of the {dtype} matmul limit' if train else ''
        gemm_rate = f' ({100 * rates["matmul"] / limit_rate:.0f}% of the {dtype} matmul limit)' if train else ''
        lines.append(f'our training step (eager, {dtype}) by operator group (share of its time): matmul and '
                     f'convolution {100 * shares["matmul"]:.0f}% at {rates["matmul"]:.0f} GFLOP/s{gemm_rate}, '
                     f'attention {100 * shares["attention"]:.0f}% at {rates["attention"]:.0f} GFLOP/s, '
                     f'elementwise {100 * shares["elementwise"]:.0f}%, casts and copies {100 * shares["casts"]:.0f}%, '
                     f'optimizer {100 * shares["optimizer"]:.0f}%, other (Python, autograd) '
                     f'{100 * shares["other"]:.0f}%: removing all but the GEMMs and attention (what a compiler '
                     f'fuses) would give at most {profile["bound"]:.2f}x{limit}; running the attention at the '
                     f'GEMMs\' rate as well, at most {profile["bound"] / floor:.2f}x')
    return '\n'.join(lines)


def run(args) -> dict:
    if args.quick:
        apply_quick(args)
    chosen = ours_precision(args.amp_dtype)
    args.ours_dtype = chosen.dtype
    print(f'ours in {chosen.name} ({chosen.reason})', file=sys.stderr, flush=True)
    rows, breakdown = [], {}
    if 'data' in args.sections:
        with tempfile.TemporaryDirectory(prefix='deit-bench-') as tmp:
            root = make_photo_like_jpegs(Path(tmp), args.images, tuple(args.image_size))
            rows += bench_data(args, root)
            if args.breakdown:
                breakdown['train pipeline'] = train_pipeline_stages(args, root)
    if {'train', 'distill', 'eval', 'teacher'} & set(args.sections):
        rows += bench_models(args)
    if args.breakdown and 'train' in args.sections:
        breakdown['train step'] = step_profile(args)
    memory = activation_memory(args) if 'memory' in args.sections else None
    shards = None
    if 'shards' in args.sections:
        with tempfile.TemporaryDirectory(prefix='deit-bench-') as tmp:
            shards = bench_shards(args, Path(tmp))
    model_rows = [r for r in rows if 'gflop_per_image' in r]
    limits = {key: statistics.median(r[key] for r in model_rows) if model_rows else None
              for key in ('matmul_gflops', 'bf16_matmul_gflops')}
    settings = {k: v for k, v in vars(args).items() if k not in ('json', 'ours_dtype')}
    return {'memory': memory, 'shards': shards, **limits, 'threads': torch.get_num_threads(),
            'ours_dtype': dtype_name(chosen.dtype), 'rows': rows, 'breakdown': breakdown, 'settings': settings,
            'peak_rss_mib': peak_rss_mib()}


def ours_precision(amp_dtype: str) -> Precision:
    """--amp-dtype: 'auto' is what main.py picks by default on this machine, float32 is --no-amp."""
    cpu = torch.device('cpu')
    if amp_dtype == 'auto':
        return resolve_precision(None, None, cpu)
    return resolve_precision(amp_dtype != 'float32', None if amp_dtype == 'float32' else amp_dtype, cpu)


def cli(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    report = run(args)
    if report['rows']:
        print(format_table(report['rows']))
    if report['matmul_gflops']:
        print(f'matmul ({args.matmul_size}^2, {report["threads"]} threads): fp32 {report["matmul_gflops"]:.0f} GFLOP/s, bf16 '
              f'{report["bf16_matmul_gflops"]:.0f} GFLOP/s, measured between the timed runs of each model line; '
              f'%lim = achieved GFLOP/s / the rate of the precision it runs in (baseline fp32, ours '
              f'{report["ours_dtype"]})')
    print(f'settings: model {args.model}, teacher {args.teacher_model}, batch {args.batch_size}, '
          f'{args.input_size} px, {args.repeats} repeats x {args.steps} steps, compile {args.compile}, '
          f'ours in {report["ours_dtype"]}; '
          f'peak RSS {report["peak_rss_mib"]:.0f} MiB')
    if report['memory']:
        mib = report['memory']
        print(f'activation memory of one forward + backward (peak resident memory it adds; batch {args.batch_size}, '
              f'{args.input_size} px): {mib["plain"]:.0f} MiB, {mib["checkpointing"]:.0f} MiB with --grad-checkpointing '
              f'({100 * mib["saving"]:.0f}% less)')
    if report['shards']:
        print(format_shards(report['shards'], args))
    if report['breakdown']:
        print(format_breakdown(report['breakdown'], report['rows'], args))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(cli())
