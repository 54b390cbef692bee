"""Train, evaluate, resume and fine-tune DeiT: the command line of the original DeiT scripts.

Reads like a table of contents of a run (train): parse the flags (get_args_parser), check them
(validate_args), resolve what they leave to this machine (resolve_args), then build the data, the models
and the optimisation, and loop over the epochs. Datasets live in datasets.py, students in models/,
criteria in losses.py, the training step in engine.py, checkpoints in checkpoint.py.
"""
import os
import signal
import sys

if __name__ == '__main__':  # a stop signal while torch and timm load (seconds): nothing written, say so
    def _stop_while_loading(signum, frame):
        print(f'stopped by {signal.Signals(signum).name} while starting; nothing to save yet', file=sys.stderr,
              flush=True)
        os._exit(128 + signum)  # not sys.exit: an exception inside an import would leave it half done

    for _signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(_signum, _stop_while_loading)

import argparse
import contextlib
import datetime
import difflib
import re
import time
from pathlib import Path
from typing import List, Optional, Tuple

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, resolve_data_config
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, SequentialSampler, Subset
from torch.utils.data.distributed import DistributedSampler

import checkpoint
import config
import fast_data
import inference
import models  # noqa: F401  (registers our students in timm's registry)
import seeding
import speedups
import utils
import wandb_log
import weights
import real_labels
from datasets import (DATA_SETS, EVAL_ONLY_DATA_SETS, INAT_CATEGORIES, SHARDED_DATA_SETS, DataSettings, RobustSamples,
                      build_dataset, build_pipeline, check_same_classes, class_names, collate_skipping,
                      imagenet_descriptions)
from engine import HeadLogits, LossScaler, TrainOptions, evaluate, is_distilled, train_one_epoch
from losses import DISTILLATION_TYPES, Criterion, build_criterion, check_loss_flags
from precision import Precision, dtype_flag, resolve_precision
from samplers import BlockSampler, RASampler, ResumableSampler
from teacher import InputSpec, TeacherInputs, prepare_teacher
from utils import UserError


def checkpoint_or_none(value: str) -> str:
    """A checkpoint flag's value; 'none' is unset (''), e.g. to drop the download URL a recipe gives."""
    return '' if value.strip().lower() == 'none' else value


def get_args_parser() -> argparse.ArgumentParser:
    """The original DeiT flags (same names, defaults and destinations), plus a few marked '(new)', in the
    groups of the README; `python main.py --help` shows each flag's default."""
    parser = config.CommandLineParser(add_help=False)

    data = parser.add_argument_group('data')
    data.add_argument('--data-path', default='/datasets01/imagenet_full_size/061417/', type=str, metavar='DIR',
                      help='dataset root (IMNET: a folder with train/ and val/ class folders)')
    data.add_argument('--data-set', default='IMNET', choices=DATA_SETS, type=str,
                      help='IMNET is any ImageFolder with train/ and val/; IMNETV2 (--eval only) ImageNet-V2\'s '
                           'class-index folders 0 ... 999 in --data-path; WDS, WebDataset shards in timm\'s layout '
                           '(a folder with _info.json, or a brace pattern of the train shards); HF, a Hugging Face '
                           'dataset on disk (save_to_disk, or Parquet files) with image and label columns')
    data.add_argument('--shuffle', default='global', choices=('global', 'blocks'),
                      help='(new) training order: global, a permutation of all samples (the folder order); '
                           'blocks, shards shuffled and samples shuffled within blocks of shards, so that each '
                           'worker reads a few shards at a time (WDS and HF only)')
    data.add_argument('--nb-classes', default=None, type=int, metavar='N',
                      help='(new) expected number of classes, checked against the data; unset: taken from the data')
    data.add_argument('--inat-category', default='name', choices=INAT_CATEGORIES, type=str,
                      help='iNaturalist label level (INAT, INAT19)')
    data.add_argument('--eval-crop-ratio', default=0.875, type=float, metavar='RATIO',
                      help='validation: resize to --input-size / RATIO, then centre-crop --input-size')
    data.add_argument('--strict-data', action='store_true',
                      help='(new) fail on an unreadable image instead of skipping and counting it')
    data.add_argument('--mean', type=float, nargs=3, default=None, metavar='M',
                      help="(new) the student's input normalisation mean; unset: that of the --resume checkpoint, "
                           "of the --finetune weights (a hub tag's pretrained config), else ImageNet's")
    data.add_argument('--std', type=float, nargs=3, default=None, metavar='S',
                      help='(new) the input normalisation std; unset: chosen as --mean')

    model = parser.add_argument_group('model')
    # no type=str (strings anyway): argparse would convert the default to a plain str, losing ParserDefault
    model.add_argument('--model', default=utils.ParserDefault('deit_base_patch16_224'), metavar='MODEL',
                       help='any timm model name, or one of models/; unset with --resume/--finetune: the model '
                            'the checkpoint records, if it records one')
    model.add_argument('--input-size', default=utils.ParserDefaultInt(224), type=int, metavar='PIXELS',
                       help='image size (square); unset with --resume/--finetune of a checkpoint trained with '
                            'this --model: the size it records')
    model.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate')
    model.add_argument('--drop-path', type=float, default=0.1, metavar='PCT', help='drop path (stochastic depth) rate')
    model.add_argument('--model-ema', action='store_true',
                       help='keep an exponential moving average of the weights, evaluated each epoch')
    model.add_argument('--no-model-ema', action='store_false', dest='model_ema', help='no EMA model')
    model.set_defaults(model_ema=True)
    model.add_argument('--model-ema-decay', type=float, default=0.99996, metavar='DECAY',
                       help='EMA decay per optimizer step')
    model.add_argument('--model-ema-force-cpu', action='store_true', help='keep the EMA model on the CPU')
    model.add_argument('--finetune', default='', type=checkpoint_or_none, metavar='FILE_OR_URL',
                       help="fine-tune from this checkpoint file or URL, or (new) timm's pretrained weights "
                            "NAME.tag (classifier and position embedding adapted); unset or 'none' (overrides a "
                            "--config's): no fine-tuning")
    model.add_argument('--finetune-partial', action='store_true',
                       help='(new) --finetune loads the weights that fit and leaves the others as initialised '
                            '(e.g. a backbone); without it, a checkpoint that leaves any weight besides the '
                            'classifier unset is refused')
    model.add_argument('--attn-only', action='store_true',
                       help='train only the attention layers, the position embedding and the classifier')

    distillation = parser.add_argument_group('distillation')
    distillation.add_argument('--teacher-model', default=utils.ParserDefault('regnety_160'), metavar='MODEL',
                              help='timm model name of the teacher; unset: the model the --teacher-path '
                                   'checkpoint records, if it records one')
    distillation.add_argument('--teacher-path', type=checkpoint_or_none, default='', metavar='FILE_OR_URL',
                              help="teacher checkpoint file or https URL (torch or safetensors); needed when "
                                   "distilling, unless --teacher-pretrained ('none': unset)")
    distillation.add_argument('--teacher-pretrained', action='store_true',
                              help="(new) the teacher is timm's pretrained --teacher-model NAME[.tag] (from the hub "
                                   'cache, downloaded once), fed its own normalisation and input size')
    distillation.add_argument('--distillation-type', default='none', choices=DISTILLATION_TYPES, type=str,
                              help='none: no teacher; soft: KL divergence to the teacher; hard: its predicted labels')
    distillation.add_argument('--distillation-alpha', default=0.5, type=float, metavar='ALPHA',
                              help='weight of the distillation loss (1 - ALPHA: the label loss)')
    distillation.add_argument('--distillation-tau', default=1.0, type=float, metavar='TAU',
                              help='temperature of soft distillation')
    distillation.add_argument('--distillation-token', action='store_true', default=True,
                              help='distil through the distillation token (needs a *_distilled_* model)')
    distillation.add_argument('--no-distillation-token', action='store_false', dest='distillation_token',
                              help='classic distillation on the class head of a model without distillation token')
    distillation.add_argument('--eval-head', default='both', choices=('cls', 'dist', 'both'),
                              help='classifier of a distilled model that test_acc1 reports; all three are logged')

    optimisation = parser.add_argument_group('optimisation')
    optimisation.add_argument('--batch-size', default=64, type=int, help='per-GPU (per-process) batch size')
    optimisation.add_argument('--grad-accum-steps', default=1, type=int, metavar='K',
                              help='(new) micro-batches of --batch-size per optimizer step: the effective batch '
                                   '(which --lr scales with) is batch-size x K x processes')
    optimisation.add_argument('--epochs', default=300, type=int, help='training epochs')
    optimisation.add_argument('--unscale-lr', action='store_true',
                              help='do not scale --lr by the effective batch / 512 (batch * accum * world / 512)')
    optimisation.add_argument('--bce-loss', action='store_true', help='binary cross-entropy on mixed targets')
    optimisation.add_argument('--cosub', action='store_true',
                              help='DeiT III co-training: the batch runs twice, each copy learns from the labels '
                                   'and from the other copy (BCE)')
    optimisation.add_argument('--opt', default='adamw', type=str, metavar='OPTIMIZER', help='timm optimizer name')
    optimisation.add_argument('--opt-eps', default=1e-8, type=float, metavar='EPSILON', help='optimizer epsilon')
    optimisation.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA',
                              help="optimizer betas; unset: the optimizer's own")
    optimisation.add_argument('--clip-grad', type=float, default=None, metavar='NORM',
                              help='clip the gradient norm to NORM; unset: no clipping')
    optimisation.add_argument('--momentum', type=float, default=0.9, metavar='M', help='SGD momentum')
    optimisation.add_argument('--weight-decay', type=float, default=0.05, help='weight decay')
    optimisation.add_argument('--layer-decay', type=float, default=None, metavar='RATE',
                              help="(new) layer-wise lr decay (BEiT/MAE fine-tuning): each layer's lr is scaled "
                                   "by RATE per layer above it (timm's parameter groups); unset: off")
    optimisation.add_argument('--sched', default='cosine', type=str, metavar='SCHEDULER',
                              help='timm learning-rate schedule')
    optimisation.add_argument('--lr', type=float, default=5e-4, metavar='LR',
                              help='learning rate for a total batch of 512 (scaled, see --unscale-lr)')
    optimisation.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct',
                              help='epoch fractions where lr noise starts (and ends); unset: no noise')
    optimisation.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT', help='lr noise limit')
    optimisation.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV', help='lr noise std-dev')
    optimisation.add_argument('--warmup-lr', type=float, default=1e-6, metavar='LR', help='lr at the start of warmup')
    optimisation.add_argument('--min-lr', type=float, default=1e-5, metavar='LR', help='lower bound of the schedule')
    optimisation.add_argument('--decay-epochs', type=float, default=30, metavar='N',
                              help='epochs between decays (step schedules)')
    optimisation.add_argument('--warmup-epochs', type=int, default=5, metavar='N', help='epochs of linear warmup')
    optimisation.add_argument('--cooldown-epochs', type=int, default=0, metavar='N',
                              help="epochs at --min-lr run after --epochs (the original's default of 10 was "
                                   "never run)")
    optimisation.add_argument('--patience-epochs', type=int, default=10, metavar='N',
                              help='epochs without improvement before a plateau schedule decays')
    optimisation.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE',
                              help='lr factor per decay (step schedules)')

    augmentation = parser.add_argument_group('augmentation')
    augmentation.add_argument('--color-jitter', type=float, default=0.3, metavar='PCT', help='colour jitter factor')
    augmentation.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1', metavar='NAME',
                              help='AutoAugment policy, "none" to disable')
    augmentation.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    augmentation.add_argument('--train-interpolation', type=str, default='bicubic',
                              help='random, bilinear or bicubic')
    augmentation.add_argument('--repeated-aug', action='store_true',
                              help='repeated augmentation: each image 3 times per epoch, differently augmented')
    augmentation.add_argument('--no-repeated-aug', action='store_false', dest='repeated_aug',
                              help='each image once per epoch')
    augmentation.set_defaults(repeated_aug=True)
    augmentation.add_argument('--ThreeAugment', action='store_true',
                              help='DeiT III: one of grayscale / solarize / blur per image, plus colour jitter')
    augmentation.add_argument('--src', action='store_true',
                              help='DeiT III: simple random crop instead of RRC')
    augmentation.add_argument('--train-mode', action='store_true',
                              help='the model in training mode (dropout, drop path) while it trains')
    augmentation.add_argument('--no-train-mode', action='store_false', dest='train_mode',
                              help='the model in eval mode while it trains')
    augmentation.set_defaults(train_mode=True)
    augmentation.add_argument('--reprob', type=float, default=0.25, metavar='PCT', help='random erasing probability')
    augmentation.add_argument('--remode', type=str, default='pixel', help='random erasing fill: const, rand or pixel')
    augmentation.add_argument('--recount', type=int, default=1, help='random erasing count')
    augmentation.add_argument('--resplit', action='store_true', default=False,
                              help="accepted as in the original, which does not use it")
    augmentation.add_argument('--mixup', type=float, default=0.8, help='mixup alpha, on if > 0')
    augmentation.add_argument('--cutmix', type=float, default=1.0, help='cutmix alpha, on if > 0')
    augmentation.add_argument('--cutmix-minmax', type=float, nargs='+', default=None, metavar='FRACTION',
                              help='cutmix box min/max fractions (overrides --cutmix alpha); unset: alpha')
    augmentation.add_argument('--mixup-prob', type=float, default=1.0,
                              help='probability of mixup or cutmix per batch')
    augmentation.add_argument('--mixup-switch-prob', type=float, default=0.5,
                              help='probability of cutmix instead of mixup when both are on')
    augmentation.add_argument('--mixup-mode', type=str, default='batch', help='batch, pair or elem')

    runs = parser.add_argument_group('runs and checkpoints')
    runs.add_argument('--config', default='', metavar='FILE.yaml',
                      help='(new) defaults for any flag from a YAML file (keys: flag names); flags win')
    runs.add_argument('--output_dir', default='', metavar='DIR',
                      help='where to save checkpoints, log.txt and args.yaml; unset: nothing is saved')
    runs.add_argument('--device', default=utils.DEFAULT_DEVICE,
                      help='cuda, cuda:N or cpu (the default falls back to cpu where CUDA is absent)')
    runs.add_argument('--seed', default=0, type=int, help='random seed: every random number of the run derives from it')
    runs.add_argument('--resume', default='', metavar='FILE_OR_URL',
                      help="resume from this checkpoint file or URL; 'auto': the checkpoint in --output_dir if "
                           "there is one, else start fresh; unset: start fresh")
    runs.add_argument('--start-over', action='store_true',
                      help='(new) start a new run in an --output_dir that holds another run\'s checkpoints: '
                           'its files are moved to DIR/previous-<time>/ first (without this flag such a run '
                           'is refused)')
    runs.add_argument('--start_epoch', default=0, type=int, metavar='N',
                      help='first epoch (a resumed checkpoint sets it)')
    runs.add_argument('--eval', action='store_true', help='only evaluate (with --resume)')
    runs.add_argument('--real-labels', default='', metavar='real.json',
                      help='(new) with --eval on ImageNet\'s validation images: also the ReaL top-1 (Beyer et al. '
                           '2020; real.json of google-research/reassessed-imagenet)')
    runs.add_argument('--print-freq', default=10, type=int, metavar='N', help='(new) steps between progress lines')
    runs.add_argument('--tensorboard', action='store_true', default=None,
                      help='(new) TensorBoard events in output_dir/tensorboard; default: on when the '
                           'tensorboard package is installed and --output_dir is set')
    runs.add_argument('--no-tensorboard', action='store_false', dest='tensorboard', help='(new) no TensorBoard events')
    runs.add_argument('--wandb', default='', metavar='PROJECT',
                      help='(new) also log the epoch records of log.txt and the resolved flags to this Weights & '
                           'Biases project (a resumed run continues its W&B run; WANDB_MODE=offline works)')
    runs.add_argument('--save-interval-steps', default=0, type=int, metavar='N',
                      help='(new) also write a step checkpoint every N optimizer steps (0: off)')
    runs.add_argument('--save-interval-minutes', default=0, type=float, metavar='M',
                      help='(new) also write a step checkpoint every M minutes (0: off)')
    runs.add_argument('--keep-last', default=2, type=int, metavar='K',
                      help='(new) step checkpoints to keep besides checkpoint.pth and best_checkpoint.pth')
    runs.add_argument('--deterministic', action='store_true',
                      help='(new) deterministic kernels: bit-identical results for the same command')

    distributed = parser.add_argument_group(
        'distributed', 'torchrun, torch.distributed.launch and submitit set the processes through the environment')
    distributed.add_argument('--dist-eval', action='store_true', default=True,
                             help='each process evaluates its shard of the validation set (exact: every image '
                                  'counted once)')
    distributed.add_argument('--no-dist-eval', action='store_false', dest='dist_eval',
                             help='(new) every process evaluates the whole validation set (the original default)')
    distributed.add_argument('--distributed', action='store_true', default=False,
                             help='accepted as in the original, which also ignores it: the environment decides')
    distributed.add_argument('--world_size', default=1, type=int, metavar='N',
                             help='accepted as in the original: the environment (WORLD_SIZE) decides')
    distributed.add_argument('--dist_url', default='env://', metavar='URL', help='process-group init method')
    distributed.add_argument('--local-rank', '--local_rank', default=0, type=int, metavar='RANK',
                             help='set by torch.distributed.launch without --use_env')

    performance = parser.add_argument_group('performance')
    performance.add_argument('--num_workers', default=None, type=int, metavar='N',
                             help='data-loader worker processes; unset: 10, at most the cores per process')
    performance.add_argument('--pin-mem', action='store_true', help='pin CPU memory in the DataLoader')
    performance.add_argument('--no-pin-mem', action='store_false', dest='pin_mem', help='no pinned memory')
    performance.set_defaults(pin_mem=True)
    performance.add_argument('--amp', action='store_true', default=None,
                             help='(new) mixed precision; unset: on where bf16 is native and faster (CUDA; a CPU '
                                  'where a start-up probe measures it), fp16 on a GPU without bf16')
    performance.add_argument('--no-amp', action='store_false', dest='amp', help='(new) fp32 throughout')
    performance.add_argument('--amp-dtype', default=None, choices=('float16', 'bfloat16'),
                             help='(new) autocast dtype (implies --amp); fp16 uses loss scaling, bf16 does not; '
                                  'unset: bf16 where native, else fp16')
    performance.add_argument('--fast-data', action='store_true', default=True,
                             help='(new) uint8 images from the workers, DCT-scaled JPEG decoding, normalisation and '
                                  'erasing per batch on the device (same augmentation distribution)')
    performance.add_argument('--no-fast-data', action='store_false', dest='fast_data',
                             help="(new) timm's stock per-image transforms (the reference pipeline)")
    performance.add_argument('--no-tf32', action='store_false', dest='tf32',
                             help='(new) full fp32 matmuls and convolutions on CUDA; by default they use TF32 '
                                  'tensor cores (Ampere and newer: --no-amp runs, the fp32 parts of an AMP run)')
    performance.add_argument('--compile', action='store_true',
                             help='(new) torch.compile the student and the teacher (eager if unavailable)')
    performance.add_argument('--grad-checkpointing', action='store_true',
                             help="(new) timm's activation checkpointing of the student: less memory, one more "
                                  "forward")
    return parser


# ---------------------------------------------------------------------------------------------
# Checks and resolution of the flags
# ---------------------------------------------------------------------------------------------

def validate_args(args) -> None:
    """Catch impossible settings before any data is read or any model is built (checks only: changes nothing)."""
    for name in ('batch_size', 'grad_accum_steps', 'epochs', 'input_size', 'print_freq', 'keep_last'):
        if getattr(args, name) <= 0:
            raise UserError(f'--{name.replace("_", "-")} must be positive, got {getattr(args, name)}')
    for name in ('num_workers', 'save_interval_steps', 'save_interval_minutes', 'start_epoch'):
        if getattr(args, name) is not None and getattr(args, name) < 0:  # --num_workers None: the default
            raise UserError(f'--{name.replace("_", "-")} must not be negative, got {getattr(args, name)}')
    for name in ('lr', 'min_lr', 'warmup_lr', 'weight_decay', 'drop', 'drop_path', 'smoothing', 'reprob'):
        if getattr(args, name) < 0:
            raise UserError(f'--{name.replace("_", "-")} must not be negative, got {getattr(args, name)}')
    if not timm.is_model(args.model):
        raise UserError(unknown_model(args.model, '--model'))
    if args.distillation_type != 'none':
        if not timm.is_model(args.teacher_model):
            raise UserError(unknown_model(args.teacher_model, '--teacher-model'))
        if args.teacher_pretrained and args.teacher_path:
            raise UserError('--teacher-pretrained and --teacher-path both give the teacher weights: keep one')
        if args.teacher_pretrained:
            weights.check_hub_weights(args.teacher_model, '--teacher-model')
        elif not args.teacher_path:
            raise UserError(f'--distillation-type {args.distillation_type} needs the teacher weights: --teacher-path '
                            "(a checkpoint file or https URL) or --teacher-pretrained (timm's weights of "
                            '--teacher-model NAME.tag)')
        elif not utils.is_url(args.teacher_path) and not os.path.isfile(args.teacher_path):
            raise UserError(f'--teacher-path {args.teacher_path} does not exist')
        check_distillation_head(args.model, args.distillation_token)
    if args.grad_checkpointing:
        with torch.device('meta'):
            enable_grad_checkpointing(timm.create_model(args.model, num_classes=2), args.model)
    if args.shuffle == 'blocks' and args.data_set not in SHARDED_DATA_SETS:
        raise UserError(f'--shuffle blocks orders the shards of --data-set {" or ".join(SHARDED_DATA_SETS)}; '
                        f'{args.data_set} has none: drop it')
    if args.src and not args.ThreeAugment:
        raise UserError('--src (simple random crop) is part of the DeiT III pipeline: add --ThreeAugment')
    check_loss_flags(args.bce_loss, args.cosub, mixup_active(args), args.distillation_type)
    if mixup_active(args) and args.batch_size % 2 and not args.eval:
        raise UserError(f'--batch-size {args.batch_size} must be even with mixup/cutmix (they pair the images of '
                        f'a batch): use an even --batch-size, or --mixup 0 --cutmix 0')
    check_input_size(args.model, args.input_size)
    if args.data_set in EVAL_ONLY_DATA_SETS and not args.eval:
        raise UserError(f'--data-set {args.data_set} is a test set without training images: use it with --eval')
    if args.wandb and not args.eval:
        wandb_log.check_available()
    if args.real_labels and not args.eval:
        raise UserError('--real-labels scores an evaluation: add --eval (and --resume CHECKPOINT)')
    if args.real_labels and not os.path.isfile(args.real_labels):
        raise UserError(f'--real-labels {args.real_labels} does not exist: download real.json of '
                        f'google-research/reassessed-imagenet')
    if args.eval and not (args.resume or args.finetune):
        print('warning: --eval without --resume evaluates a randomly initialised model')
    if args.resume == 'auto' and not args.output_dir:
        raise UserError('--resume auto looks in --output_dir: give --output_dir too')
    if args.resume and args.resume != 'auto' and not utils.is_url(args.resume) and not os.path.isfile(args.resume):
        raise UserError(f'--resume {args.resume} does not exist: check the path')
    if args.finetune and not utils.is_url(args.finetune) and not os.path.isfile(args.finetune):
        if '.' not in args.finetune or not timm.is_model(args.finetune):
            raise UserError(f"--finetune {args.finetune} does not exist: check the path, or name timm's "
                            'pretrained weights as NAME.tag (timm.list_pretrained())')
        weights.check_hub_weights(args.finetune, '--finetune')
    if (args.mean is None) != (args.std is None):
        raise UserError('--mean and --std go together: give both, or neither (the weights\' own, else ImageNet\'s)')
    if args.std is not None and min(args.std) <= 0:
        raise UserError(f'--std must be positive, got {args.std}')
    if args.layer_decay is not None and not 0 < args.layer_decay <= 1:
        raise UserError(f'--layer-decay must be in (0, 1] (e.g. 0.65-0.75 for ViT-S/B fine-tuning), got {args.layer_decay}')


def unknown_model(name: str, flag: str) -> str:
    """The error for a model name timm does not know: a size variant of a known model as that model at
    another --input-size (deit_tiny_patch16_384 -> --model deit_tiny_patch16_224 --input-size 384), else
    the closest known names (difflib's similarity ratio)."""
    sized = re.fullmatch(r'(.+_)(\d+)', name)
    if sized and flag == '--model':
        variants = [m for m in timm.list_models(f'{sized[1]}*') if re.fullmatch(re.escape(sized[1]) + r'\d+', m)]
        if variants:
            base = f'{sized[1]}224' if f'{sized[1]}224' in variants else variants[0]
            return f'unknown {flag} {name}: use --model {base} --input-size {sized[2]}'
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    return f'unknown {flag} {name}' + (f': did you mean {" or ".join(close)}?' if close else ': use a timm model '
                                       'name (python -c "import timm; print(timm.list_models())")')


def adopt_recorded_models(args) -> None:
    """--model and --teacher-model left unset take the model their checkpoint records (its args.model, as
    the original scripts' checkpoints record it too): --resume / --finetune for the student, with the
    --input-size it records, --teacher-path for the teacher. One line says so; a model or size given on
    the command line or in a --config is kept."""
    student_checkpoint = args.resume if args.resume != 'auto' else ''
    student_checkpoint = student_checkpoint or args.finetune
    if student_checkpoint:
        source = '--resume' if args.resume == student_checkpoint else '--finetune'
        args.model, args.input_size = checkpoint_model(student_checkpoint, source, args.model, args.input_size)
    if args.distillation_type != 'none' and args.teacher_path:
        args.teacher_model, _ = checkpoint_model(args.teacher_path, '--teacher-path', args.teacher_model,
                                                 flag='--teacher-model')


def checkpoint_model(path: str, source: str, model: str, input_size: Optional[int] = None,
                     flag: str = '--model') -> Tuple[str, Optional[int]]:
    """The model and input size the checkpoint at ``path`` records (said in one line) where ``model`` and
    ``input_size`` are parser defaults: the size only with the model it was trained with. A missing file
    is left to validate_args, which names it."""
    if not utils.is_parser_default(model) and not utils.is_parser_default(input_size) or \
            not utils.is_url(path) and not os.path.isfile(path):
        return model, input_size
    recorded = weights.recorded_args(path)
    recorded_model = weights.recorded_model({'args': recorded})
    if not recorded_model:
        return model, input_size
    taken = []
    if utils.is_parser_default(model) and recorded_model != model:
        model = recorded_model
        taken.append(f'{flag} {model}')
    recorded_size = recorded.get('input_size')
    if utils.is_parser_default(input_size) and model == recorded_model and isinstance(recorded_size, int) \
            and recorded_size != input_size:
        input_size = recorded_size
        taken.append(f'--input-size {input_size}')
    if taken:
        print(f'{" ".join(taken)}: the model {source} {path} records (give {flag} to choose another)')
    return model, input_size


def resolve_args(args) -> Optional[torch.dtype]:
    """Settle, once and before anything is built, what the flags leave to this machine and launch:
    --num_workers, --device, the processes (torchrun, Slurm: rank, world_size, gpu), --amp / --amp-dtype,
    --tensorboard, --resume (auto, or the newest checkpoint after a torchrun restart) and --lr (scaled to
    the effective batch unless --unscale-lr).

    The resolved values stay in ``args`` (one record: what the settings summary, args.yaml and every
    checkpoint show is what the run used); the autocast dtype is also returned as the torch.dtype the code takes
    (None: fp32). Only --nb-classes (from the data) and --start_epoch (from the resumed checkpoint) are
    filled later, where they become known.
    """
    if args.num_workers is None:
        args.num_workers = default_num_workers()
    args.device = utils.resolve_device(args.device)
    utils.init_distributed_mode(args)
    precision = choose_precision(args.amp, args.amp_dtype, args.device, args.distributed)
    args.amp, args.amp_dtype = precision.dtype is not None, dtype_flag(precision.dtype)  # repeatable from args.yaml
    print(f'precision: student {precision.name} ({precision.reason})')
    if precision.warning:
        print(f'warning: {precision.warning}')
    if args.distillation_type != 'none':
        print(f'precision: teacher {precision.name} (the student\'s)')
    if args.tensorboard is None:
        args.tensorboard = bool(args.output_dir) and utils.tensorboard_available()
    args.resume = checkpoint.resume_source(args.resume, args.output_dir)
    args.mean, args.std = student_normalisation(args.mean, args.std, args.resume, args.finetune)
    if not args.unscale_lr:
        args.lr = args.lr * samples_per_step(args) * utils.get_world_size() / 512.0
    return precision.dtype


def student_normalisation(mean: Optional[list], std: Optional[list], resume: str, finetune: str
                          ) -> Tuple[list, list]:
    """The student's input mean and std: --mean/--std, else those the weights it starts from were trained
    with (the --resume checkpoint's, the --finetune source's: a hub tag's pretrained config or a checkpoint's
    recorded args), else ImageNet's. Settled in args, so that checkpoints record it for --eval and export."""
    if mean is not None:
        return list(mean), list(std)
    for flag, source in (('--resume', resume), ('--finetune', finetune)):
        found = weights.normalisation_of(source) if source else None
        if found is not None:
            if found != (list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)):
                print(f'normalisation: mean {found[0]} std {found[1]}, as the weights of {flag} {source}')
            return found
    return list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)


def settings_summary(args) -> str:
    """The resolved settings that say what this run does, in a few lines (every setting: args.yaml)."""
    world = utils.get_world_size()
    task = 'evaluate' if args.eval else f'train {args.epochs} epoch{"s" if args.epochs != 1 else ""}'
    lines = [f'{task}: --model {args.model} at {args.input_size} px on {args.data_set} {args.data_path}']
    if not args.eval:
        lines.append(f'  batch {args.batch_size} x {args.grad_accum_steps} accumulation x {world} processes, '
                     f'{args.opt} lr {args.lr:.3g}{"" if args.unscale_lr else " (scaled to the batch)"}'
                     f'{f" x {args.layer_decay}^depth (--layer-decay)" if args.layer_decay else ""}, '
                     f'{args.sched} schedule, {args.warmup_epochs} warmup epochs, '
                     f'EMA {"on" if args.model_ema else "off"}')
    if args.distillation_type != 'none':
        weights_from = "timm's pretrained weights" if args.teacher_pretrained else args.teacher_path
        lines.append(f'  {args.distillation_type} distillation from {args.teacher_model} ({weights_from})')
    starts = [f'--{name} {getattr(args, name)}' for name in ('resume', 'finetune') if getattr(args, name)]
    if starts:
        lines.append(f'  from {", ".join(starts)}')
    precision = args.amp_dtype if args.amp else 'fp32'
    if args.eval:
        saved = 'nothing saved (--eval)'
    else:
        saved = f'output in {args.output_dir} (every setting: args.yaml)' if args.output_dir else \
            'nothing saved (no --output_dir)'
    lines.append(f'  device {args.device}, {precision}, {args.num_workers} data workers, seed {args.seed}; {saved}')
    return '\n'.join(lines)


def choose_precision(amp: Optional[bool], amp_dtype: Optional[str], device: torch.device,
                     distributed: bool) -> Precision:
    """The precision of --amp / --amp-dtype (precision.py: explicit flags, else what this device runs
    fastest). Under DDP every rank takes rank 0's choice: a CPU probe could differ."""
    chosen = resolve_precision(amp, amp_dtype, device)
    if distributed:
        shared = [chosen]
        torch.distributed.broadcast_object_list(shared, src=0)
        chosen = shared[0]
    return chosen


def prepare_output_dir(output_dir: str) -> None:
    """Create --output_dir (with its parents) and make sure this run can write there."""
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f'cannot create --output_dir {output_dir}: {e.strerror}') from None
    if not os.access(output_dir, os.W_OK):
        raise UserError(f'--output_dir {output_dir} is not writable: choose another directory')


def default_num_workers() -> int:
    """The original's 10 workers, but no more than the cores available to each process of this node.

    This process's CPU affinity is shared by the node's ranks when they inherited one mask (torchrun's
    children; an unbound launch, whose mask is the whole node or the whole Slurm allocation on it), and
    is this rank's own when the launcher bound each task to its CPUs (Slurm's task binding).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    node_cpus = int(os.environ.get('SLURM_CPUS_ON_NODE', os.cpu_count() or cores))
    bound_per_task = 'TORCHELASTIC_RUN_ID' not in os.environ and cores < node_cpus
    sharing = 1 if bound_per_task else int(os.environ.get('LOCAL_WORLD_SIZE', 1))
    return max(1, min(10, cores // sharing))


def mixup_active(args) -> bool:
    return args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None


def check_input_size(name: str, input_size: int) -> None:
    """The model must take --input-size images (a ViT's patch fits in them, a convnet's strides leave a pixel).

    A forward pass on the meta device: shapes only, no memory, a fraction of a second. If the model's
    own input size fails there too, the meta device is what fails, and nothing is concluded.
    """
    def forward(size: int) -> Optional[str]:
        with torch.device('meta'):
            try:
                try:
                    model = timm.create_model(name, num_classes=2, img_size=size)
                except TypeError:  # e.g. convnets: any input size
                    model = timm.create_model(name, num_classes=2)
                model.eval()(torch.empty(2, 3, size, size))
            except Exception as e:  # a size the architecture refuses, at creation or in the forward
                return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None

    problem = forward(input_size)
    if problem is None:
        return
    with torch.device('meta'):
        model = timm.create_model(name, num_classes=2)
    own_size = model.pretrained_cfg.get('input_size', (3, 224, 224))[-1]
    if own_size != input_size and forward(own_size) is None:
        patch = getattr(getattr(model, 'patch_embed', None), 'patch_size', None)
        raise UserError(f'--input-size {input_size} is too small for --model {name}'
                        + (f' (patch size {patch[0]})' if patch else '') + f': {problem}; use a larger --input-size')


def check_distillation_head(name: str, through_token: bool = True) -> None:
    """The model must have a distillation head exactly when distilling through the token.

    Built on the meta device: no memory, no time, before any data is read.
    """
    with torch.device('meta'):
        has_head = hasattr(timm.create_model(name, num_classes=2), 'set_distilled_training')
    if through_token and not has_head:
        raise UserError(f'--model {name} has no distillation head: use a *_distilled_* model '
                        f'(e.g. deit_tiny_distilled_patch16_224) with --distillation-token, or keep this '
                        f'model with --no-distillation-token (classic distillation on the class head)')
    if not through_token and has_head:
        raise UserError(f'--no-distillation-token distils into the class head of a model without '
                        f'distillation token, and --model {name} has one: use its plain variant')


def samples_per_step(args) -> int:
    """Samples one process feeds into one optimizer step."""
    return args.batch_size * args.grad_accum_steps


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def build_data(args) -> Tuple[Optional[DataLoader], DataLoader, int, List[str]]:
    """Train and val loaders with their samplers (repeated augmentation, sharded eval), the number of
    classes and their names. --eval builds no training split (its folder walk alone takes minutes on
    ImageNet): the validation split names the classes."""
    settings = DataSettings.from_args(args)
    pipeline_train, pipeline_val = build_pipeline(True, settings.transform), build_pipeline(False, settings.transform)
    dataset_val, nb_classes = build_dataset(False, settings, pipeline_val)
    if args.real_labels:
        labelled = real_labels.attach(dataset_val, args.real_labels, nb_classes)
        print(f'ReaL labels: {labelled} of {len(dataset_val)} validation images have any ({args.real_labels})')
    samples_val = RobustSamples(dataset_val, replace=False)
    samples_val.check_readable('validation')
    world, rank = utils.get_world_size(), utils.get_rank()
    if args.dist_eval and args.distributed:
        # Strided shards without padding: every image counted once, so the reduced metrics are exact.
        samples_val = RobustSamples(Subset(dataset_val, range(rank, len(dataset_val), world)), replace=False)
    loader_val = DataLoader(samples_val, sampler=SequentialSampler(samples_val),
                            batch_size=int(1.5 * args.batch_size), drop_last=False, **loader_options(args))
    if pipeline_val.batch:
        loader_val = fast_data.DeviceBatches(loader_val, pipeline_val.batch, args.device)
    if args.eval:
        return None, loader_val, nb_classes, class_names(dataset_val)

    dataset_train, nb_classes = build_dataset(True, settings, pipeline_train)
    check_same_classes(dataset_train, dataset_val)
    samples_train = RobustSamples(dataset_train, replace=True)
    samples_train.check_readable('training')

    # Every order depends only on (seed, epoch, world size): a resumed run sees the same order.
    shard_lengths = dataset_train.shard_lengths if args.shuffle == 'blocks' else None
    if args.repeated_aug:
        order = RASampler(dataset_train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                          shard_lengths=shard_lengths)
    elif shard_lengths:
        order = BlockSampler(dataset_train, shard_lengths, num_replicas=world, rank=rank, seed=args.seed)
    else:
        order = DistributedSampler(dataset_train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    # Whole optimizer steps only: a partial last step would average fewer samples than the others.
    sampler_train = ResumableSampler(order, seed=args.seed, rank=rank, group_size=samples_per_step(args))
    loader_train = DataLoader(samples_train, sampler=sampler_train,
                              batch_size=args.batch_size, drop_last=True, **loader_options(args))
    if pipeline_train.batch:
        loader_train = fast_data.DeviceBatches(loader_train, pipeline_train.batch, args.device, seed=args.seed,
                                               rank=rank)
    if len(loader_train) == 0:
        raise UserError(f'{len(order)} training samples per process are fewer than one optimizer step '
                        f'(--batch-size {args.batch_size} x --grad-accum-steps {args.grad_accum_steps}): '
                        f'lower --batch-size or --grad-accum-steps')
    return loader_train, loader_val, nb_classes, class_names(dataset_train)


def loader_options(args) -> dict:
    """DataLoader settings both splits share: workers, pinned memory, the collate that skips unreadable images."""
    pin = args.pin_mem and args.device.type == 'cuda'
    options = dict(num_workers=args.num_workers, pin_memory=pin, persistent_workers=args.num_workers > 0,
                   collate_fn=collate_skipping, worker_init_fn=init_data_worker,
                   # its own generator: creating an iterator must not consume the global RNG stream
                   generator=seeding.loader_generator(args.seed))
    if args.num_workers > 0:
        options['prefetch_factor'] = 4  # absorbs the spread of RandAugment's per-image cost; uint8 batches are small
    return options


def init_data_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: stop signals are the trainer's, and the trainer's kept memory is not
    the worker's (speedups.release_kept_memory)."""
    checkpoint.ignore_stop_signals(worker_id)
    speedups.release_kept_memory()


def build_mixup(args, nb_classes: int) -> Optional[Mixup]:
    if not mixup_active(args):
        return None
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=nb_classes)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def build_student(args, nb_classes: int, device: torch.device, amp_dtype: Optional[torch.dtype]
                  ) -> Tuple[torch.nn.Module, Optional[ModelEmaV3]]:
    """The student without wrappers (what checkpoints save: official key names) and its EMA (--model-ema);
    training_student wraps it. Rank-local work only: no collective."""
    print(f'Creating model: {args.model}')
    model = build_model(args, nb_classes)
    if args.finetune:
        load_finetune_weights(model, args.finetune, partial=args.finetune_partial)
    if args.attn_only:
        train_attention_only(model)
    model.to(device)
    unfused = speedups.unfuse_cpu_bf16_attention(model, device, amp_dtype)  # before the EMA copies the model
    if unfused:
        print(f'attention: {unfused} layers unfused (torch\'s fused CPU attention is slow in bf16)')
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay,
                               device=torch.device('cpu') if args.model_ema_force_cpu else None)
    return model, model_ema


def training_student(model: torch.nn.Module, args) -> torch.nn.Module:
    """The student as it trains: under DDP (whose construction broadcasts rank 0's weights, a collective)
    and compiled with --compile."""
    if args.distributed:
        model = distributed_model(model, args.device, args.gpu)
    if args.compile:
        model = speedups.compile_or_eager(model, 'student')
    return model


def student_for_evaluation(model: torch.nn.Module, model_without_ddp: torch.nn.Module, compile: bool,
                           device: torch.device) -> torch.nn.Module:
    """What evaluates the student: the module that trains (under DDP, compiled with --compile); for a
    distilled student, whose training module returns only the heads' average in eval mode,
    engine.HeadLogits around it, compiled too with --compile (outside DDP: evaluation has no gradients)."""
    if not is_distilled(model_without_ddp):
        return model
    heads = HeadLogits(model_without_ddp)
    return torch.compile(heads) if compile and not speedups.compiler_problem(device.type) else heads


def build_model(args, nb_classes: int) -> torch.nn.Module:
    """The student, for --input-size where the architecture takes an image size."""
    model = inference.create_model(args.model, nb_classes, args.input_size, pretrained=False, drop_rate=args.drop,
                                   drop_path_rate=args.drop_path)
    if args.distillation_type != 'none' and args.distillation_token:
        model.set_distilled_training(True)  # return (cls, dist) logits while training
    if args.grad_checkpointing:
        enable_grad_checkpointing(model, args.model)
    return model


def enable_grad_checkpointing(model: torch.nn.Module, name: str) -> None:
    """timm's activation checkpointing (set_grad_checkpointing), or a UserError for a model without it."""
    try:
        model.set_grad_checkpointing(True)
    except (AttributeError, AssertionError, NotImplementedError):  # timm's ways of saying 'not supported'
        raise UserError(f'--model {name} does not support --grad-checkpointing: drop the flag, or lower '
                        f'--batch-size and raise --grad-accum-steps to save memory') from None


def classifier_names(model: torch.nn.Module) -> set:
    """Module names of the model's classifiers, as the model reports them: its pretrained config's
    ``classifier`` (a name or a tuple of names), ``get_classifier()`` and a distillation head."""
    classifier = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier') or ()
    names = {classifier} if isinstance(classifier, str) else set(classifier)
    if hasattr(model, 'get_classifier'):
        heads = model.get_classifier()
        heads = heads if isinstance(heads, tuple) else (heads,)  # a distilled DeiT returns (head, head_dist)
        names.update(name for name, module in model.named_modules() if name and any(module is h for h in heads))
    if hasattr(model, 'head_dist'):
        names.add('head_dist')
    return names


def distributed_model(model: torch.nn.Module, device: torch.device,
                      gpu: int) -> torch.nn.parallel.DistributedDataParallel:
    """DDP around ``model``, its gradients kept in the all-reduce buckets (gradient_as_bucket_view: no
    copy into the buckets, one gradient-sized buffer less)."""
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[gpu] if device.type == 'cuda' else None, gradient_as_bucket_view=True)


def load_finetune_weights(model: torch.nn.Module, path: str, partial: bool = False) -> None:
    """Start from a checkpoint, or timm's pretrained weights NAME.tag: classifiers of another shape are
    dropped, pos_embed resized to the grid.

    Every other weight of the model must come from the checkpoint, unless ``partial`` (--finetune-partial:
    a backbone on purpose): a checkpoint of another architecture would otherwise leave a random model.
    """
    if weights.is_hub_weights(path):
        # timm's own loader (hub cache, its checkpoint filters), then the same fitting as a file's
        checkpoint_data = {'model': weights.create_pretrained(
            path, '--finetune', 'give a checkpoint file or URL to --finetune').state_dict()}
    else:
        checkpoint_data = weights.load_checkpoint(path)
    state = weights.model_state_from_checkpoint(checkpoint_data, path)
    own = model.state_dict()
    prefixes = tuple(f'{name}.' for name in classifier_names(model))
    for k in [k for k in state if k.startswith(prefixes) and k in own and state[k].shape != own[k].shape]:
        print(f'Removing key {k} from pretrained checkpoint (shape {tuple(state[k].shape)})')
        del state[k]
    weights.interpolate_pos_embed(state, model)
    result = weights.load_state_checked(model, state, f'--finetune {path}', strict=False)  # refuses other shapes
    unset = [k for k in result.missing_keys if not k.startswith(prefixes)]
    if unset and not partial:
        raise UserError(weights.describe_partial_fit(model, state, unset, checkpoint_data, f'--finetune {path}')
                        + ': fine-tune from a checkpoint of this --model, or add --finetune-partial to load '
                          'only the weights that fit')
    kept = result.missing_keys
    print(f'Fine-tuning from {path}: {len(own) - len(kept)} of the model\'s {len(own)} tensors loaded'
          + (f'; {len(kept)} keep their initialisation ({", ".join(kept[:4])}{" ..." if len(kept) > 4 else ""})'
             if kept else '')
          + (f'; {len(result.unexpected_keys)} checkpoint tensors unused' if result.unexpected_keys else ''))


def train_attention_only(model: torch.nn.Module) -> None:
    """--attn-only: freeze all but the attention layers ('.attn.' in the parameter name), the position
    embedding and the classifier, as the original does (its class token and patch embedding stay frozen)."""
    for name, param in model.named_parameters():
        param.requires_grad = '.attn.' in name
    classifier = model.get_classifier()
    for head in classifier if isinstance(classifier, tuple) else (classifier,):  # (head, head_dist) if distilled
        head.requires_grad_(True)
    if isinstance(getattr(model, 'pos_embed', None), torch.nn.Parameter):
        model.pos_embed.requires_grad = True


def student_inputs(args) -> InputSpec:
    """What the student's batches are (--input-size, --mean, --std; resized bicubically as DeiT's)."""
    return InputSpec(args.input_size, tuple(args.mean), tuple(args.std), 'bicubic')


def teacher_inputs(args, teacher_checkpoint: Optional[dict]) -> InputSpec:
    """What the teacher was trained on: timm's pretrained config of --teacher-model with --teacher-pretrained;
    the size and normalisation a --teacher-path checkpoint recorded (one of this trainer's, or of the
    original scripts'); that of an explicit tag, --teacher-model NAME.tag; else the student's inputs,
    as the original DeiT feeds its teacher."""
    recorded = weights.checkpoint_args(teacher_checkpoint)  # {} with --teacher-pretrained
    if recorded.get('input_size'):
        return InputSpec(int(recorded['input_size']), tuple(recorded.get('mean') or IMAGENET_DEFAULT_MEAN),
                         tuple(recorded.get('std') or IMAGENET_DEFAULT_STD), 'bicubic')
    tagged = args.teacher_pretrained or '.' in args.teacher_model
    cfg = weights.hub_pretrained_cfg(args.teacher_model) if tagged else None
    if cfg is not None:
        return InputSpec.from_data_config(resolve_data_config(pretrained_cfg=cfg.to_dict()))
    return student_inputs(args)


def load_teacher_checkpoint(args) -> Optional[dict]:
    """The --teacher-path checkpoint (read once, before the data: its args say what the teacher receives)."""
    if args.distillation_type == 'none' or args.teacher_pretrained:
        return None
    return weights.load_checkpoint(args.teacher_path)


def describe_teacher_inputs(student: InputSpec, teacher: InputSpec) -> str:
    """The one line saying what the teacher receives."""
    if (teacher.size, teacher.mean, teacher.std) == (student.size, student.mean, student.std):
        return f"teacher receives: the student's batch as it is ({student.describe()})"
    return (f'teacher receives: {teacher.describe(interpolation=True)}, converted on the device from the '
            f"student's batch ({student.describe()})")


def teacher_classes_differ(teacher: str, classes: int, nb_classes: int, finetune_flags: str) -> str:
    """The error for a teacher that predicts other classes than the data's: fine-tune it first."""
    return (f'{teacher} predicts {classes} classes, the data has {nb_classes}: fine-tune the teacher to your classes '
            f'first ({finetune_flags}), then distil with --teacher-path OUTPUT/checkpoint.pth (README, "Distil on '
            'your own data")')


def checkpoint_classes(model: torch.nn.Module, state: dict) -> Optional[int]:
    """How many classes the classifier in ``state`` predicts, when the rest of ``state`` fits ``model``; None when
    it holds no classifier of ``model`` or other weights clash too (load_state_checked then names them all)."""
    prefixes = tuple(f'{name}.' for name in classifier_names(model))
    heads = [v for k, v in state.items() if k.startswith(prefixes) and k.endswith('.weight')]
    body = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    if not heads or weights.describe_state_mismatch(model, body, strict=False):
        return None
    return heads[0].shape[0]


def build_teacher(args, teacher_checkpoint: Optional[dict], nb_classes: int, device: torch.device,
                  amp_dtype: Optional[torch.dtype]) -> Optional[torch.nn.Module]:
    """The frozen teacher: timm's pretrained --teacher-model (--teacher-pretrained) or the model with the
    weights of --teacher-path, as an inference-only module (teacher.py: BatchNorm folded, channels_last) in
    the student's precision, fed the student's batch converted to its own inputs (teacher_inputs)."""
    if args.distillation_type == 'none':
        return None
    print(f'Creating teacher model: {args.teacher_model}')
    if args.teacher_pretrained:
        cfg = weights.hub_pretrained_cfg(args.teacher_model)
        if cfg.num_classes != nb_classes:
            # at the size its weights were trained at, which the fine-tuned checkpoint then records
            raise UserError(teacher_classes_differ(f'--teacher-model {args.teacher_model}', cfg.num_classes, nb_classes,
                                                   f'--model {args.teacher_model.split(".")[0]} --finetune '
                                                   f'{args.teacher_model} --input-size {cfg.input_size[-1]}'))
        teacher = weights.create_pretrained(args.teacher_model, '--teacher-model',
                                            'give the teacher weights as a file with --teacher-path')
    else:
        teacher = timm.create_model(args.teacher_model, pretrained=False, num_classes=nb_classes)
        state = weights.model_state_from_checkpoint(teacher_checkpoint, args.teacher_path)
        classes = checkpoint_classes(teacher, state)
        if classes not in (None, nb_classes):
            raise UserError(teacher_classes_differ(f'--teacher-path {args.teacher_path}', classes, nb_classes,
                                                   f'--model {args.teacher_model} --finetune {args.teacher_path}'))
        weights.load_state_checked(teacher, state, f'--teacher-path {args.teacher_path} '
                                                   f'(teacher {args.teacher_model}, {nb_classes} classes in the data)',
                                   checkpoint=teacher_checkpoint, flag='--teacher-model', name=args.teacher_model)
    inputs = TeacherInputs(student_inputs(args), teacher_inputs(args, teacher_checkpoint))
    return prepare_teacher(teacher, device, compile=args.compile, amp_dtype=amp_dtype, inputs=inputs)


# ---------------------------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------------------------

def optimizer_name(opt: str) -> str:
    """timm's optimizer for --opt: the original's 'fusedlamb' (apex's FusedLAMB, CUDA only) is timm's LAMB,
    timm's PyTorch port of that optimizer, which needs neither apex nor CUDA."""
    if opt.lower() in ('fusedlamb', 'lamb'):
        print(f"--opt {opt}: timm's LAMB (timm.optim.Lamb)")
        return 'lamb'
    return opt


def build_optimizer(args, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """timm's optimizer for the flags (create_optimizer_v2): no weight decay on norms, biases and the
    model's no_weight_decay() parameters; with --layer-decay, timm's per-layer parameter groups, whose
    'lr_scale' timm's schedulers apply."""
    opt = optimizer_name(args.opt)
    return create_optimizer_v2(model, **{**optimizer_kwargs(cfg=args), 'opt': opt},
                               **speedups.optimizer_kwargs(device, opt))


def criterion_of(args, teacher: Optional[torch.nn.Module]) -> Criterion:
    """losses.build_criterion for the loss flags."""
    return build_criterion(args.cosub, args.bce_loss, mixup_active(args), args.smoothing, teacher,
                           args.distillation_type, args.distillation_alpha, args.distillation_tau,
                           args.distillation_token)


def train_options(args, amp_dtype: Optional[torch.dtype]) -> TrainOptions:
    """How engine.train_one_epoch runs each step, from the flags."""
    return TrainOptions(amp_dtype=amp_dtype, accum_steps=args.grad_accum_steps, clip_grad=args.clip_grad,
                        print_freq=args.print_freq, seed=args.seed, strict_data=args.strict_data,
                        set_training_mode=args.train_mode)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def on_device(module: torch.nn.Module, device: torch.device):
    """``module`` moved to ``device`` for the block, then back where it was.

    The batches are on the training device; an EMA kept on the CPU (--model-ema-force-cpu) is
    evaluated there too: one copy of its weights each way, where a CPU validation pass would take
    longer than a GPU epoch.
    """
    home = next(module.parameters()).device
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


def set_determinism(deterministic: bool, device: torch.device) -> None:
    """--deterministic: the same command gives bit-identical weights; otherwise favour speed."""
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')  # required by deterministic cuBLAS
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == 'cuda':
        torch.backends.cudnn.benchmark = True


def set_fp32_precision(device: torch.device, tf32: bool) -> None:
    """On CUDA, let fp32 matmuls and convolutions use TF32 tensor cores (10-bit mantissa inputs, fp32
    accumulation) unless --no-tf32; on the CPU nothing changes. TF32 kernels are deterministic."""
    if device.type != 'cuda':
        return
    # not the per-backend fp32_precision settings: inductor reads get_float32_matmul_precision(),
    # which raises once the two ways of setting the precision are mixed
    torch.set_float32_matmul_precision('high' if tf32 else 'highest')
    torch.backends.cudnn.allow_tf32 = tf32


def main(args) -> Optional[dict]:
    """Train, or with --eval evaluate (returning the evaluation's metrics, as engine.evaluate gives them)."""
    signals = checkpoint.StopSignals()
    signals.install()  # first: a stop signal while starting ends the run at once, with its line
    try:
        return train(args, signals)
    except checkpoint.TrainingInterrupted as stop:
        signals.hand_over(stop.signum)  # under submitit: requeue the job now that the checkpoint is written
        raise
    except utils.RunError:
        # Every rank is stopping: a launcher's SIGTERM, sent to the others once one of them has exited
        # (torchrun), must not turn their exit code into a signal's while they unwind.
        signals.ignore()
        raise
    finally:
        signals.disarm()


def train(args, signals: checkpoint.StopSignals) -> Optional[dict]:
    adopt_recorded_models(args)
    validate_args(args)
    if args.output_dir:  # before the processes join (a collective): every rank refuses alike, at once
        prepare_output_dir(args.output_dir)
    resume_requested = args.resume == 'auto'
    amp_dtype = resolve_args(args)
    with utils.failing_together():  # a teacher file that one node cannot read stops every rank
        teacher_checkpoint = load_teacher_checkpoint(args)
    if teacher_checkpoint is not None or args.teacher_pretrained and args.distillation_type != 'none':
        print(describe_teacher_inputs(student_inputs(args), teacher_inputs(args, teacher_checkpoint)))
    device = args.device
    # The same seed on every rank: the model, and its EMA copied before DDP broadcasts rank 0's weights,
    # start identical everywhere; the per-step and per-sample streams add the rank themselves.
    seeding.seed_everything(args.seed)
    set_determinism(args.deterministic, device)
    set_fp32_precision(device, args.tf32)
    speedups.keep_freed_memory_for(device)
    # One training run per output directory, owned until train() returns (evaluation writes nothing there).
    owner = checkpoint.claim_output_dir_of_the_job(args.output_dir) if args.output_dir and not args.eval else None
    try:
        # a run from epoch 0: another run's files are kept
        if args.output_dir and not args.eval and not args.resume:
            checkpoint.set_aside_previous_run(args.output_dir, args.start_over, resume_requested)
        print(settings_summary(args))

        # What fails on some ranks only while setting up (their data, their files, a resumed checkpoint that
        # another node cannot read) ends every rank here, before the first collective of training.
        with utils.failing_together():
            # Data
            loader_train, loader_val, nb_classes, classes = build_data(args)
            args.nb_classes = nb_classes  # recorded with the run: known once the data is read
            mixup_fn = build_mixup(args, nb_classes)

            # Models
            model_without_ddp, model_ema = build_student(args, nb_classes, device, amp_dtype)
            n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
            print(f'number of params: {n_parameters}')
            teacher = build_teacher(args, teacher_checkpoint, nb_classes, device, amp_dtype)
            del teacher_checkpoint  # its weights now live in the teacher

            # Optimisation
            optimizer = build_optimizer(args, model_without_ddp, device)
            loss_scaler = LossScaler(enabled=amp_dtype == torch.float16, device_type=device.type)
            lr_scheduler, num_epochs = create_scheduler(args, optimizer)  # num_epochs includes the cooldown
            criterion = criterion_of(args, teacher)
            options = train_options(args, amp_dtype)
            state = checkpoint.TrainingState(model_without_ddp, optimizer, lr_scheduler, loss_scaler, model_ema,
                                             config.plain_args(args), samples_per_step(args),
                                             start_epoch=args.start_epoch, classes=classes,
                                             class_descriptions=imagenet_descriptions(classes))
            if args.resume:
                state.resume(args.resume, weights_only=args.eval, opt=args.opt, layer_decay=args.layer_decay,
                             batch_size=args.batch_size, accum_steps=args.grad_accum_steps,
                             world_size=utils.get_world_size(), scaled_lr=args.lr)
            else:
                # applies each group's lr_scale (--layer-decay) from the first step
                lr_scheduler.step(state.start_epoch)
        model = training_student(model_without_ddp, args)
        evaluated = student_for_evaluation(model, model_without_ddp, args.compile, device)
        if args.eval:
            test_stats = evaluate(loader_val, evaluated, device, amp_dtype, args.print_freq, args.eval_head)
            print(f'Accuracy of the network on the test images: {test_stats["acc1"]:.1f}%')
            return test_stats
        if args.resume and state.start_epoch >= num_epochs:
            print(f'Nothing to train: {args.resume} ends epoch {state.start_epoch - 1}, the last of {num_epochs} '
                  f'(--epochs {args.epochs} + cooldown); raise --epochs to train further')
            return
        if args.resume:
            print(f'Continuing at epoch {state.start_epoch} step {state.start_step}')
        # Accepted: from here on the run writes to its output directory (rank 0; a failed write ends every rank).
        with utils.failing_together():
            config.save_args(args, get_args_parser())
            epoch_log = utils.EpochLog(args.output_dir, tensorboard=args.tensorboard,
                                       resume_epoch=state.start_epoch if args.resume else None)
            wandb_run = start_wandb(args, state) if args.wandb else None

        # Loop
        checkpointer = checkpoint.Checkpointer(
            args.output_dir, payload=state.payload,
            every_steps=args.save_interval_steps, every_minutes=args.save_interval_minutes,
            keep_last=args.keep_last, signals=signals, device=device)
        output_dir = Path(args.output_dir) if args.output_dir else None
        cooldown = f' ({args.epochs} + {num_epochs - args.epochs} cooldown)' if num_epochs > args.epochs else ''
        print(f'Start training for {num_epochs} epochs{cooldown}')
        start_time = time.time()
        signals.training()
        try:
            for epoch in range(state.start_epoch, num_epochs):
                resuming = epoch == state.start_epoch and state.start_step > 0
                start_step = state.start_step if resuming else 0
                loader_train.sampler.set_epoch(epoch)  # reshuffle per epoch, the same way on every rank
                loader_train.sampler.skip(start_step * samples_per_step(args))
                train_stats = train_one_epoch(
                    model, criterion, loader_train, optimizer, device, epoch, loss_scaler, options, model_ema, mixup_fn,
                    start_step=start_step, checkpointer=checkpointer,
                    metrics_state=state.metrics_state if resuming else None)
                lr_scheduler.step(epoch + 1)  # epoch e trains at the schedule's value of e (the original lags one)

                test_stats = evaluate(loader_val, evaluated, device, amp_dtype, args.print_freq, args.eval_head)
                is_best = test_stats['acc1'] > state.max_accuracy
                state.max_accuracy = max(state.max_accuracy, test_stats['acc1'])
                print(f'Accuracy of the network on the test images: {test_stats["acc1"]:.1f}%  '
                      f'(max {state.max_accuracy:.2f}%)')
                log_stats = {**{f'train_{k}': v for k, v in train_stats.items()},
                             **{f'test_{k}': v for k, v in test_stats.items()},
                             'epoch': epoch, 'n_parameters': n_parameters, 'max_accuracy': state.max_accuracy}
                if model_ema is not None:
                    with on_device(model_ema.module, device) as ema:  # a --model-ema-force-cpu EMA too
                        ema_stats = evaluate(loader_val, ema, device, amp_dtype, args.print_freq, args.eval_head,
                                             label='EMA model')
                    log_stats.update({f'test_ema_{k}': v for k, v in ema_stats.items()})

                with utils.failing_together():  # rank 0 writes; every rank learns whether it could
                    epoch_log.write(log_stats)  # before the checkpoint: see EpochLog.trim
                    if wandb_run:
                        wandb_run.log(log_stats)
                    if output_dir:
                        state.save(str(output_dir / 'checkpoint.pth'), epoch)
                        if is_best:
                            state.save(str(output_dir / 'best_checkpoint.pth'), epoch)
                checkpointer.after_epoch(epoch, str(output_dir / 'checkpoint.pth') if output_dir else None)
        except BaseException:
            if wandb_run:
                wandb_run.finish(exit_code=1)
            raise
        finally:
            epoch_log.close()
        if wandb_run:
            wandb_run.finish()

        total_time = datetime.timedelta(seconds=int(time.time() - start_time))
        print(f'Training time {total_time}')
    finally:  # released on every way out: a failed run too, whose files stay for --resume
        if owner:
            owner.close()


def start_wandb(args, state: checkpoint.TrainingState) -> wandb_log.WandbLog:
    """--wandb: the W&B run of this training run (the one it started, when resumed), its id recorded in the
    checkpoints' args."""
    run_id = wandb_log.run_id(args.output_dir, resuming=bool(args.resume)) if utils.is_main_process() else ''
    args.wandb_id = state.run_args['wandb_id'] = run_id
    return wandb_log.WandbLog(args.wandb, run_id, config.plain_args(args), args.output_dir)


def cli(argv=None) -> int:
    """Entry point: a failure becomes one 'error:' line (prefixed with the rank when there are several)
    and its exit code: 2 a user mistake, 3 a non-finite loss, 4 a failed write."""
    parser = config.CommandLineParser(description='DeiT training and evaluation script',
                                      parents=[get_args_parser()])
    args = config.parse_args(parser, argv)
    try:
        main(args)
    except utils.AgreedFailure as e:  # every rank stops; the failing rank and rank 0 have said why
        return e.exit_code
    except utils.RunError as e:
        utils.print_error(e)
        return e.exit_code
    except checkpoint.TrainingInterrupted as stop:
        print(f'{stop}', file=sys.stderr)
        return 128 + stop.signum
    finally:
        utils.leave_distributed()
    return 0


if __name__ == '__main__':
    sys.exit(cli())
