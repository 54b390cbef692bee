"""Generated JPEG ImageFolders whose classes are learnable from colour and layout."""
import os
import random
from pathlib import Path
from typing import Dict, Sequence

from PIL import Image, ImageDraw

# One distinct colour and stripe orientation per class, so that a small model learns them fast.
_COLOURS = [(220, 40, 40), (40, 180, 60), (40, 70, 220), (230, 200, 40), (160, 50, 200), (40, 200, 210)]


def make_image(label: int, rng: random.Random, size: Sequence[int]) -> Image.Image:
    width, height = size
    base = _COLOURS[label % len(_COLOURS)]
    jitter = [max(0, min(255, c + rng.randint(-30, 30))) for c in base]
    img = Image.new('RGB', (width, height), tuple(jitter))
    draw = ImageDraw.Draw(img)
    step = max(4, min(width, height) // 6)
    for offset in range(0, max(width, height) * 2, step * 2):
        if label % 2:  # horizontal stripes
            draw.rectangle([0, offset, width, offset + step // 2], fill=(255, 255, 255))
        else:  # vertical stripes
            draw.rectangle([offset, 0, offset + step // 2, height], fill=(0, 0, 0))
    return img


def make_imagefolder(root: os.PathLike, num_classes: int = 3, train_per_class: int = 24,
                     val_per_class: int = 8, sizes=((64, 48), (80, 64), (48, 72), (120, 90)),
                     seed: int = 0) -> Path:
    """root/train/class_k/*.jpg and root/val/class_k/*.jpg: real JPEG files of varied sizes."""
    rng = random.Random(seed)
    root = Path(root)
    for split, count in (('train', train_per_class), ('val', val_per_class)):
        for label in range(num_classes):
            folder = root / split / f'class_{label}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = make_image(label, rng, sizes[rng.randrange(len(sizes))])
                img.save(folder / f'{i:04d}.jpg', quality=90)
    return root


def make_imagenet_as_downloaded(root: os.PathLike, ground_truth: str, num_classes: int = 3, train_per_class: int = 2,
                                val_per_class: int = 3, seed: int = 0) -> Dict[str, str]:
    """ImageNet's layout as downloaded, in miniature: train/<wnid>/ class folders and a flat val/ of
    ILSVRC2012_val_<8 digits>.JPEG in shuffled class order, labelled by ``ground_truth``: 'meta.bin'
    (torchvision's parsed devkit: (wnid -> class names, one wnid per val image in name order)) or
    'LOC_val_solution.csv' (Kaggle's). Returns the true file name -> wnid of val/."""
    import torch  # only for meta.bin, written as torchvision writes it

    root = Path(root)
    make_imagefolder(root, num_classes, train_per_class, val_per_class, seed=seed)
    wnids = [f'n{1440764 + k:08d}' for k in range(num_classes)]
    for label, wnid in enumerate(wnids):
        (root / 'train' / f'class_{label}').rename(root / 'train' / wnid)
    val_images = [(path, wnids[label]) for label in range(num_classes)
                  for path in sorted((root / 'val' / f'class_{label}').iterdir())]
    random.Random(seed).shuffle(val_images)
    truth = {}
    for number, (path, wnid) in enumerate(val_images, start=1):
        name = f'ILSVRC2012_val_{number:08d}.JPEG'
        path.rename(root / 'val' / name)
        truth[name] = wnid
    for label in range(num_classes):
        (root / 'val' / f'class_{label}').rmdir()
    if ground_truth == 'meta.bin':
        torch.save(({wnid: (f'class {wnid}',) for wnid in wnids}, [truth[name] for name in sorted(truth)]),
                   root / 'meta.bin')
    else:
        rows = [f'{Path(name).stem},{wnid} 10 12 40 44 {wnid} 1 2 3 4' for name, wnid in truth.items()]
        (root / ground_truth).write_text('ImageId,PredictionString\n' + '\n'.join(rows) + '\n')
    return truth
