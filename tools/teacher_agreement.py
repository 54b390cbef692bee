"""How often the teacher's hard labels in mixed precision equal its fp32 ones on the validation split.

    python -m tools.teacher_agreement --data-path DATA --teacher-model regnety_160 --teacher-path T.pth \
        --amp-dtype bfloat16 --device cpu

The teacher is built as main.py builds it (BatchNorm folded, channels_last), once in fp32 and once
under autocast in --amp-dtype; both label every validation image (main.py's eval transform), and
the line printed is the share of images on which the two argmaxes agree, with each one's top-1.
"""
import argparse
import sys

import torch
from torch.utils.data import DataLoader

import main
import utils
from datasets import DataSettings, Pipeline, build_dataset, build_transform


@torch.inference_mode()
def hard_labels(teacher: torch.nn.Module, loader, device: torch.device) -> torch.Tensor:
    return torch.cat([teacher(images.to(device)).argmax(dim=1).cpu() for images, _ in loader])


def get_args_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser('python -m tools.teacher_agreement', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   parents=[main.get_args_parser()])


def cli(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    args.device = utils.resolve_device(args.device)
    if args.distillation_type == 'none':
        args.distillation_type = 'hard'  # only so that build_teacher builds one
    args.mean, args.std = main.student_normalisation(args.mean, args.std, resume='', finetune='')
    settings = DataSettings.from_args(args)
    dataset, nb_classes = build_dataset(False, settings, Pipeline(build_transform(False, settings.transform)))
    targets = torch.tensor([target for _, target in dataset.samples])
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers or 0)
    amp_dtype = args.amp_dtype or 'bfloat16'
    labels = {}
    teacher_checkpoint = main.load_teacher_checkpoint(args)
    for amp in (False, True):
        teacher = main.build_teacher(args, teacher_checkpoint, nb_classes, args.device,
                                     getattr(torch, amp_dtype) if amp else None)
        labels[amp] = hard_labels(teacher, loader, args.device)
    agree = labels[True].eq(labels[False]).float().mean().item()
    top1 = {amp: 100 * labels[amp].eq(targets).float().mean().item() for amp in labels}
    print(f'{args.teacher_model}: {amp_dtype} hard labels equal the fp32 ones on {100 * agree:.2f}% of '
          f'{len(targets)} validation images (top-1: fp32 {top1[False]:.2f}%, {amp_dtype} {top1[True]:.2f}%)')
    return 0


if __name__ == '__main__':
    try:
        sys.exit(cli())
    except utils.UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
