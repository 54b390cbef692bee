"""timm's flip and RandAugment on uint8 (H, W, 3) arrays, with OpenCV's kernels (--fast-data).

The draws stay timm's: a RandAugment here is timm's own ``RandAugment`` class holding copies of
timm's ``AugmentOp`` objects (probability, magnitude noise, level-to-argument functions), each with
its image function swapped for one below, so the same random streams pick the same ops with the same
arguments as timm's pipeline. Only the pixel work changes, to OpenCV's kernels, faster than PIL's
affine resampling (rotate, shear, translate) and Sharpness filter (benchmark.py --breakdown times
the stages).

Equal to PIL's output: the table ops (AutoContrast, Equalize, Invert, Posterize, Solarize,
SolarizeAdd). Within two grey levels: Brightness, Color, Contrast, Sharpness (OpenCV rounds where
PIL truncates, and has its own fixed-point grey weights). Geometric ops map every output pixel to
the same source point as PIL (the same matrix, the same fill colour) but interpolate with OpenCV's
bicubic kernel (a = -0.75; PIL's affine resampling uses a = -1, slightly sharper), and blend the fill
into the outermost source pixels where PIL cuts to it: a small mean difference, with the edges'
pixels further apart (tests/test_performance.py bounds both).
"""
import copy
import random
from typing import Callable, Dict, List, Sequence

import cv2
import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import AugmentOp, RandAugment
from torchvision import transforms

# Loader workers are the parallelism; OpenCV's own thread pool would oversubscribe their cores.
cv2.setNumThreads(1)

INTERPOLATION = {Image.Resampling.NEAREST: cv2.INTER_NEAREST, Image.Resampling.BILINEAR: cv2.INTER_LINEAR,
                 Image.Resampling.BICUBIC: cv2.INTER_CUBIC}
LEVELS = np.arange(256)


def apply_lut(img: np.ndarray, lut) -> np.ndarray:
    """``img`` through a 256-entry table, or one table per channel ((3, 256))."""
    lut = np.clip(np.asarray(lut), 0, 255).astype(np.uint8)
    return cv2.LUT(img, lut if lut.ndim == 1 else np.ascontiguousarray(lut.T).reshape(256, 1, 3))


def histograms(img: np.ndarray) -> List[np.ndarray]:
    return [cv2.calcHist([img], [c], None, [256], [0, 256]).ravel().astype(np.int64) for c in range(img.shape[2])]


def auto_contrast(img: np.ndarray, **__) -> np.ndarray:
    """PIL's ImageOps.autocontrast (no cutoff): each channel's range stretched to 0..255."""
    luts = []
    for hist in histograms(img):
        used = np.flatnonzero(hist)
        lo, hi = used[0], used[-1]
        if hi <= lo:
            luts.append(LEVELS)
        else:
            scale = 255.0 / (hi - lo)
            luts.append((LEVELS * scale - lo * scale).astype(np.int64))  # PIL's int(): toward zero
    return apply_lut(img, np.stack(luts))


def equalize(img: np.ndarray, **__) -> np.ndarray:
    """PIL's ImageOps.equalize: each channel's histogram equalised, with PIL's integer steps."""
    luts = []
    for hist in histograms(img):
        used = hist[hist > 0]
        step = (used.sum() - used[-1]) // 255 if len(used) > 1 else 0
        if not step:
            luts.append(LEVELS)
        else:
            before = np.concatenate([[0], np.cumsum(hist)[:-1]])  # pixels below each level
            luts.append((step // 2 + before) // step)
    return apply_lut(img, np.stack(luts))


def invert(img: np.ndarray, **__) -> np.ndarray:
    return cv2.bitwise_not(img)


def posterize(img: np.ndarray, bits_to_keep: int, **__) -> np.ndarray:
    """datasets.posterize's semantics: 8 bits or more keep the image, 0 bits give black."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return np.zeros_like(img)
    return apply_lut(img, LEVELS & ~(2 ** (8 - bits_to_keep) - 1))


def solarize(img: np.ndarray, thresh: int, **__) -> np.ndarray:
    return apply_lut(img, np.where(LEVELS < thresh, LEVELS, 255 - LEVELS))


def solarize_add(img: np.ndarray, add: int, thresh: int = 128, **__) -> np.ndarray:
    return apply_lut(img, np.where(LEVELS < thresh, np.minimum(255, LEVELS + add), LEVELS))


def blend(degenerate: np.ndarray, img: np.ndarray, factor: float) -> np.ndarray:
    """PIL's Image.blend(degenerate, img, factor), what ImageEnhance computes; clipped, rounded where PIL truncates."""
    return cv2.addWeighted(img, factor, degenerate, 1.0 - factor, 0.0)


def grey(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)


def contrast(img: np.ndarray, factor: float, **__) -> np.ndarray:
    """ImageEnhance.Contrast: blend with the mean grey level (rounded as PIL rounds it)."""
    mean = int(cv2.mean(grey(img))[0] + 0.5)
    return cv2.addWeighted(img, factor, img, 0.0, (1.0 - factor) * mean)


def color(img: np.ndarray, factor: float, **__) -> np.ndarray:
    """ImageEnhance.Color: blend with the grey image."""
    return blend(cv2.cvtColor(grey(img), cv2.COLOR_GRAY2RGB), img, factor)


def brightness(img: np.ndarray, factor: float, **__) -> np.ndarray:
    """ImageEnhance.Brightness: blend with black."""
    return cv2.addWeighted(img, factor, img, 0.0, 0.0)


SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13  # PIL's ImageFilter.SMOOTH


def sharpness(img: np.ndarray, factor: float, **__) -> np.ndarray:
    """ImageEnhance.Sharpness: blend with PIL's SMOOTH filter, which leaves the outermost pixels as they are."""
    smooth = cv2.filter2D(img, -1, SMOOTH, borderType=cv2.BORDER_REPLICATE)
    smooth[[0, -1]], smooth[:, [0, -1]] = img[[0, -1]], img[:, [0, -1]]
    return blend(smooth, img, factor)


def affine(img: np.ndarray, matrix: Sequence[float], fillcolor=None, resample=Image.Resampling.BICUBIC) -> np.ndarray:
    """PIL's ``img.transform(size, AFFINE, matrix, resample, fillcolor=...)``.

    PIL maps an output pixel's centre (x + 0.5, y + 0.5) through ``matrix`` to source coordinates in
    which pixel centres sit at + 0.5; OpenCV's centres sit at integers: the offsets absorb the halves.
    """
    if isinstance(resample, (list, tuple)):  # the draw timm's _interpolation makes
        resample = random.choice(resample)
    a, b, c, d, e, f = matrix
    warp = np.array([[a, b, c + 0.5 * (a + b) - 0.5], [d, e, f + 0.5 * (d + e) - 0.5]])
    fill = tuple(fillcolor) if isinstance(fillcolor, (tuple, list)) else (fillcolor or 0,) * 3
    return cv2.warpAffine(img, warp, (img.shape[1], img.shape[0]), flags=INTERPOLATION[resample] | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=fill)


def rotate(img: np.ndarray, degrees: float, **kwargs) -> np.ndarray:
    """PIL's Image.rotate(degrees) about the image centre, counter-clockwise."""
    height, width = img.shape[:2]
    angle = -np.radians(degrees % 360.0)
    cos, sin = round(float(np.cos(angle)), 15), round(float(np.sin(angle)), 15)
    cx, cy = width / 2.0, height / 2.0
    return affine(img, (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy), **kwargs)


def shear_x(img: np.ndarray, factor: float, **kwargs) -> np.ndarray:
    return affine(img, (1, factor, 0, 0, 1, 0), **kwargs)


def shear_y(img: np.ndarray, factor: float, **kwargs) -> np.ndarray:
    return affine(img, (1, 0, 0, factor, 1, 0), **kwargs)


def translate_x_abs(img: np.ndarray, pixels: float, **kwargs) -> np.ndarray:
    return affine(img, (1, 0, pixels, 0, 1, 0), **kwargs)


def translate_y_abs(img: np.ndarray, pixels: float, **kwargs) -> np.ndarray:
    return affine(img, (1, 0, 0, 0, 1, pixels), **kwargs)


def translate_x_rel(img: np.ndarray, pct: float, **kwargs) -> np.ndarray:
    return translate_x_abs(img, pct * img.shape[1], **kwargs)


def translate_y_rel(img: np.ndarray, pct: float, **kwargs) -> np.ndarray:
    return translate_y_abs(img, pct * img.shape[0], **kwargs)


# timm's op names (auto_augment.NAME_TO_OP) with an array version; others keep PIL (OnPIL).
ARRAY_OPS: Dict[str, Callable] = {
    'AutoContrast': auto_contrast, 'Equalize': equalize, 'Invert': invert, 'Rotate': rotate,
    'Posterize': posterize, 'PosterizeIncreasing': posterize, 'PosterizeOriginal': posterize,
    'Solarize': solarize, 'SolarizeIncreasing': solarize, 'SolarizeAdd': solarize_add,
    'Color': color, 'ColorIncreasing': color, 'Contrast': contrast, 'ContrastIncreasing': contrast,
    'Brightness': brightness, 'BrightnessIncreasing': brightness,
    'Sharpness': sharpness, 'SharpnessIncreasing': sharpness, 'ShearX': shear_x, 'ShearY': shear_y,
    'TranslateX': translate_x_abs, 'TranslateY': translate_y_abs,
    'TranslateXRel': translate_x_rel, 'TranslateYRel': translate_y_rel,
}


class HorizontalFlip:
    """torchvision's RandomHorizontalFlip on an array: the same draw (``torch.rand(1) < p``)."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img: np.ndarray) -> np.ndarray:
        return cv2.flip(img, 1) if torch.rand(1) < self.p else img


class OnPIL:
    """A PIL transform without an array version, run on a PIL copy of the array."""

    def __init__(self, step: Callable):
        self.step = step

    def __call__(self, img: np.ndarray) -> np.ndarray:
        return np.array(self.step(Image.fromarray(img)), dtype=np.uint8)


def on_arrays(op: AugmentOp) -> AugmentOp:
    """A copy of timm's op that draws as timm's does and computes on arrays."""
    op = copy.copy(op)
    op.aug_fn = ARRAY_OPS[op.name]
    return op


def array_step(step: Callable) -> Callable:
    """The array version of one PIL step of timm's pipeline (OnPIL where there is none)."""
    if type(step) is transforms.RandomHorizontalFlip:
        return HorizontalFlip(step.p)
    if type(step) is RandAugment and all(op.name in ARRAY_OPS for op in step.ops):
        return RandAugment([on_arrays(op) for op in step.ops], step.num_layers, step.choice_weights)
    return OnPIL(step)

