"""Generated JPEG ImageFolders whose classes are learnable from colour and layout."""
import os
import random
from pathlib import Path
from typing import Sequence

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
