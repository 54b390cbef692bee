"""ImageNet-ReaL (Beyer et al. 2020, "Are we done with ImageNet?"): the reassessed labels of the validation
images, for --real-labels.

``real.json`` (google-research/reassessed-imagenet) is a list with one entry per validation image, in
the order of the file names ILSVRC2012_val_00000001.JPEG ...: the ImageNet class indices that raters
judged correct for that image, possibly none. As timm's ``RealLabelsImagenet``, an image counts as
correct when its top-1 prediction is one of its ReaL labels, and images with no ReaL label are left
out of the ReaL accuracy.

The labels travel with each sample: the validation target becomes a row ``[label, real_1 ... real_K]``
padded with -1 (``attach``), so that sharded evaluation and skipped unreadable images keep every
image's labels with its prediction; ``engine.evaluate`` splits the row again.
"""
import json
import os
import re
from typing import List

import torch

from utils import UserError

VAL_NAME = re.compile(r'^ILSVRC2012_val_(\d{8})\.JPEG$', re.IGNORECASE)
NO_LABEL = -1  # padding of a row of ReaL labels


def read_real_labels(path: str, nb_classes: int) -> List[List[int]]:
    """The lists of ``real.json``, checked: one list of class indices below ``nb_classes`` per image."""
    try:
        with open(path) as f:
            labels = json.load(f)
    except OSError as e:
        raise UserError(f'cannot read --real-labels {path}: {e.strerror or e}') from None
    except ValueError as e:
        raise UserError(f'--real-labels {path} is not JSON ({e}): download real.json of '
                        f'google-research/reassessed-imagenet again') from None
    if not isinstance(labels, list) or not all(isinstance(row, list) and all(isinstance(c, int) for c in row)
                                               for row in labels):
        raise UserError(f'--real-labels {path} is not a list of lists of class indices (the layout of real.json)')
    too_large = [c for row in labels for c in row if not 0 <= c < nb_classes]
    if too_large:
        raise UserError(f'--real-labels {path} names class {too_large[0]}, but the data has {nb_classes} '
                        f'classes: ReaL labels index the 1000 ImageNet classes')
    return labels


def real_label_rows(paths: List[str], labels: List[List[int]], source: str) -> List[List[int]]:
    """The ReaL labels of each image file in ``paths``, found by its ILSVRC2012_val_NNNNNNNN.JPEG name."""
    rows = []
    for path in paths:
        match = VAL_NAME.match(os.path.basename(path))
        number = int(match.group(1)) if match else 0
        if not 1 <= number <= len(labels):
            raise UserError(f'{path} has no entry in --real-labels {source} ({len(labels)} images, named '
                            f'ILSVRC2012_val_00000001.JPEG ...): ReaL labels exist for the ImageNet validation '
                            f'images only')
        rows.append(labels[number - 1])
    return rows


def attach(dataset, path: str, nb_classes: int) -> int:
    """Make each target of ``dataset`` (an ImageFolder of ImageNet's validation images) the row
    ``[label, ReaL labels..., -1 ...]``; returns how many of its images have a ReaL label."""
    labels = read_real_labels(path, nb_classes)
    samples = dataset.samples
    rows = real_label_rows([p for p, _ in samples], labels, path)
    width = max(1, max(len(row) for row in rows))
    dataset.samples = [(p, torch.tensor([target, *row] + [NO_LABEL] * (width - len(row))))
                       for (p, target), row in zip(samples, rows)]
    dataset.imgs = dataset.samples
    unused = len(labels) - len(samples)
    if unused > 0:
        print(f'note: --real-labels {path} lists {len(labels)} images, the validation set holds {len(samples)}')
    return sum(1 for row in rows if row)


def split_targets(target: torch.Tensor):
    """(labels, ReaL label rows or None) of a batch of targets (rows when --real-labels is set)."""
    if target.dim() == 2:
        return target[:, 0], target[:, 1:]
    return target, None


def real_correct(top1: torch.Tensor, real: torch.Tensor):
    """(images whose top-1 is one of their ReaL labels, images with any ReaL label), as device tensors."""
    labelled = (real != NO_LABEL).any(dim=1)
    correct = (real == top1[:, None]).any(dim=1) & labelled
    return correct.sum(), labelled.sum()
