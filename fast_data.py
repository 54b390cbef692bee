"""A faster input pipeline with the augmentation distribution of timm's DeiT transforms (--fast-data).

Per image, in the data-loader workers:
- the RandomResizedCrop box (or the eval resize + center crop) is chosen on the image header, then
  the JPEG is decoded by OpenCV straight into an array, at a reduced DCT scale when the box still
  has at least the output's pixels at that scale (grey and CMYK JPEGs: by PIL, with ``draft``);
- the crop is resized by torch's antialiased uint8 kernel, PIL's filters within one grey level of
  PIL's output and faster than PIL's resampling;
- flip and RandAugment draw as timm's objects do and compute on the array (fast_augment.py);
- the result ships as a uint8 HWC tensor: no per-image float conversion, a quarter of the bytes.
Per batch, on the training device (``DeviceBatches`` running a ``BatchStage``): conversion to float
and normalisation in place (channels_last layout, which the NHWC batch already has), and random
erasing drawn from a generator seeded by (seed, rank, epoch, step), so that a resumed run erases
exactly the same. datasets.build_pipeline decides where this path stands for the reference.
"""
import io
import math
import random
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms

from data_files import open_regular_file
from fast_augment import array_step
from seeding import Stream, stream_generators

Box = Tuple[float, float, float, float]
# The filters of timm's crop that torch's antialiased uint8 resize implements as PIL does.
RESIZE_MODES = {transforms.InterpolationMode.BILINEAR: 'bilinear', transforms.InterpolationMode.BICUBIC: 'bicubic'}


class JpegFile(NamedTuple):
    """A colour JPEG file, read but not decoded: its bytes and the size its frame header gives."""
    data: bytes
    size: Tuple[int, int]  # (width, height), as PIL's Image.size


# Frame headers of the Huffman-coded JPEGs every decoder reads: baseline, extended, progressive.
HUFFMAN_FRAMES = (0xC0, 0xC1, 0xC2)
# OpenCV's flags for libjpeg-turbo's DCT scale 1/s, RGB, EXIF orientation ignored as PIL and timm do.
READ_FLAGS = {s: reduced | cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION for s, reduced in
              ((1, 0), (2, cv2.IMREAD_REDUCED_GRAYSCALE_2), (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
               (8, cv2.IMREAD_REDUCED_GRAYSCALE_8))}


def jpeg_frame(data: bytes) -> Optional[Tuple[int, int, int]]:
    """(width, height, components) from a JPEG's frame header; None where there is none of HUFFMAN_FRAMES.

    Read here because PIL's JPEG opener parses every marker segment in Python.
    """
    if not data.startswith(b'\xff\xd8'):
        return None
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker in HUFFMAN_FRAMES:
            if pos + 10 > len(data):
                return None
            width, height = int.from_bytes(data[pos + 7:pos + 9], 'big'), int.from_bytes(data[pos + 5:pos + 7], 'big')
            return width, height, data[pos + 9]
        if marker == 0xFF or 0xD0 <= marker <= 0xD8 or marker == 0x01:  # fill byte, markers without a segment
            pos += 1 if marker == 0xFF else 2
        elif (0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xDA:
            return None  # another frame type (lossless, arithmetic), or the scan without a frame
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], 'big')
    return None


def open_lazily(path: str) -> Union[JpegFile, Image.Image]:
    """An image file, not decoded yet: the transform decodes it, at the scale it needs.

    Colour JPEGs come as a JpegFile (OpenCV decodes them); other files (grey or CMYK JPEGs, PNG, ...)
    are opened lazily by PIL.
    """
    with open_regular_file(path) as f:  # a FIFO named like an image would block open() forever
        return from_bytes_lazily(f.read())


def from_bytes_lazily(data: bytes) -> Union[JpegFile, Image.Image]:
    """An image file's bytes (a shard's member), not decoded yet, as ``open_lazily`` gives a file."""
    frame = jpeg_frame(data)
    if frame is not None and frame[2] == 3 and min(frame[:2]) > 0:
        check_pixel_count(frame[:2])
        return JpegFile(data, frame[:2])
    return Image.open(io.BytesIO(data))  # PIL checks the size itself


def check_pixel_count(size: Tuple[int, int]) -> None:
    """PIL's decompression-bomb limit, checked on the header before OpenCV decodes (PIL's Image.open does
    the same for the files it opens): more than twice ``Image.MAX_IMAGE_PIXELS`` is refused."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and size[0] * size[1] > 2 * limit:
        raise Image.DecompressionBombError(f'image size ({size[0]}x{size[1]} pixels) exceeds the limit of {2 * limit} '
                                           f'pixels: a decompression bomb?')


def decode(img: Union[JpegFile, Image.Image], region: Box, out_size: Tuple[int, int]) -> Tuple[torch.Tensor, int]:
    """``img`` as a (1, 3, H, W) uint8 tensor (channels_last memory) and the factor s it was reduced by.

    JPEGs are decoded at DCT scale 1/s (s in 2, 4, 8) when ``region`` (left, top, right, bottom) still
    spans at least ``out_size`` (w, h) pixels at that scale: no resolution is lost for the output.
    Colour JPEGs are decoded by OpenCV straight into an array: PIL's pixels (the same libjpeg-turbo
    decoder and settings, also at reduced scale) without PIL's copy out of its own image memory
    (torchvision's decoder is deprecated).
    """
    shrink = min((region[2] - region[0]) / out_size[0], (region[3] - region[1]) / out_size[1])
    if isinstance(img, JpegFile):
        factor = next((s for s in (8, 4, 2) if s <= shrink), 1)
        pixels = cv2.imdecode(np.frombuffer(img.data, dtype=np.uint8), READ_FLAGS[factor])
        if pixels is None:  # OpenCV's answer to a broken file; PIL's (and RobustSamples') error is OSError
            raise OSError('cannot decode JPEG: the file is truncated or corrupt')
        return to_nchw(torch.from_numpy(pixels)), factor
    factor, width = 1, img.width
    # PIL picks the largest s in (8, 4, 2, 1) whose reduced size covers the request: s <= shrink
    if img.format == 'JPEG' and shrink >= 2 and img.draft('RGB', (math.ceil(img.width / shrink),
                                                                  math.ceil(img.height / shrink))):
        factor = 2 ** round(math.log2(width / img.width))  # sizes are rounded up: round the ratio
    if img.mode != 'RGB':
        img = img.convert('RGB')
    return to_nchw(torch.from_numpy(np.array(img, dtype=np.uint8))), factor


def to_nchw(pixels: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) -> (1, 3, H, W) channels_last, a view: the layout torch's fast uint8 resize keeps."""
    return pixels.unsqueeze(0).permute(0, 3, 1, 2)


def resize(pixels: torch.Tensor, size: Tuple[int, int], mode: str = 'bicubic') -> torch.Tensor:
    """PIL's antialiased resize on uint8 NCHW images, to ``size`` (h, w).

    torch's uint8 kernel implements PIL's filters (outputs within a grey level or two of PIL's) and
    is faster than PIL's resampling on large crops.
    """
    return F.interpolate(pixels, size=size, mode=mode, antialias=True)


def to_hwc(pixels: torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W) channels_last -> (H, W, 3), a view."""
    return pixels[0].permute(1, 2, 0)


class FastTrainTransform:
    """timm's DeiT train transform up to the uint8 image: timm's ``crop`` followed by its PIL
    ``pil_steps`` (flip, RandAugment, jitter), with the same draws.

    The crop box is drawn by timm's own ``get_params`` on the full-size image, so box and scale
    statistics are those of the reference by construction; flip and RandAugment make timm's draws
    (fast_augment.py). Decoding, resizing and the augmentations' pixel work change.
    """

    def __init__(self, crop: RandomResizedCropAndInterpolation, pil_steps: Sequence):
        self.crop = crop
        self.steps = [array_step(step) for step in pil_steps]
        self.out_size = (crop.size[1], crop.size[0])  # PIL (w, h)

    @staticmethod
    def implements(crop: Callable) -> bool:
        """Whether this transform can stand for ``crop``: timm's RandomResizedCrop, with filters torch's resize has."""
        if not isinstance(crop, RandomResizedCropAndInterpolation):
            return False
        modes = crop.interpolation if isinstance(crop.interpolation, (tuple, list)) else [crop.interpolation]
        return all(mode in RESIZE_MODES for mode in modes)

    def crop_box(self, size: Tuple[int, int]) -> Tuple[Tuple[int, int, int, int], str]:
        """The RandomResizedCrop box (left, top, right, bottom) for an image of ``size`` (w, h), and the filter."""
        # timm's get_params reads only the image's size: an empty (0, H, W) tensor has it, without pixels
        top, left, height, width = self.crop.get_params(torch.empty(0, size[1], size[0]), self.crop.scale,
                                                        self.crop.ratio)
        mode = self.crop.interpolation
        if isinstance(mode, (tuple, list)):
            mode = random.choice(mode)
        return (left, top, left + width, top + height), RESIZE_MODES[mode]

    def __call__(self, img: Union[JpegFile, Image.Image]) -> torch.Tensor:
        box, mode = self.crop_box(img.size)
        pixels, factor = decode(img, box, self.out_size)
        left, top, right, bottom = (round(c / factor) for c in box)
        crop = np.ascontiguousarray(to_hwc(resize(pixels[..., top:bottom, left:right], self.crop.size, mode)))
        for step in self.steps:
            crop = step(crop)
        return torch.from_numpy(crop)  # collated into an NHWC batch


class FastEvalTransform:
    """Resize the shorter side to ``input_size / crop_ratio`` (bicubic) and center crop ``input_size``:
    datasets.EvalTransform up to the uint8 image."""

    def __init__(self, input_size: int, crop_ratio: float = 0.875):
        self.size = input_size
        self.resize_to = int(input_size / crop_ratio)

    def geometry(self, width: int, height: int) -> Tuple[Tuple[int, int], Box]:
        """torchvision's Resize + CenterCrop: the resized (h, w) and the crop box in resized pixels."""
        short, long = min(width, height), max(width, height)
        new_short, new_long = self.resize_to, int(self.resize_to * long / short)  # torchvision's rounding
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        top, left = int(round((new_h - self.size) / 2.0)), int(round((new_w - self.size) / 2.0))
        return (new_h, new_w), (left, top, left + self.size, top + self.size)

    def __call__(self, img: Union[JpegFile, Image.Image]) -> torch.Tensor:
        (new_h, new_w), (left, top, right, bottom) = self.geometry(*img.size)
        sx, sy = img.size[0] / new_w, img.size[1] / new_h
        pixels, _ = decode(img, (left * sx, top * sy, right * sx, bottom * sy), (self.size, self.size))
        return to_hwc(resize(pixels, (new_h, new_w))[..., top:bottom, left:right])


@dataclass(frozen=True)
class BatchStage:
    """What the fast path leaves to each batch, on the training device: normalisation by ``mean`` and
    ``std`` (--mean, --std: timm's ImageNet constants by default, as the reference transforms), then
    ``erasing`` (training)."""
    mean: Tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: Tuple[float, float, float] = IMAGENET_DEFAULT_STD
    erasing: Optional[RandomErasing] = None


def erase_(images: torch.Tensor, erasing: RandomErasing, rng: random.Random,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """timm's RandomErasing on a normalised NCHW batch, with its draws from ``rng`` / ``generator``.

    The same per-image decisions as timm's ``_erase`` (probability, count, area, aspect, position,
    noise per pixel / per block / zero), from explicit generators instead of the global streams.
    """
    _, chan, img_h, img_w = images.shape
    for img in images:
        if rng.random() > erasing.probability:
            continue
        count = erasing.min_count if erasing.min_count == erasing.max_count else \
            rng.randint(erasing.min_count, erasing.max_count)
        for _ in range(count):
            for _attempt in range(10):
                target_area = rng.uniform(erasing.min_area, erasing.max_area) * img_h * img_w / count
                aspect_ratio = math.exp(rng.uniform(*erasing.log_aspect_ratio))
                h = int(round(math.sqrt(target_area * aspect_ratio)))
                w = int(round(math.sqrt(target_area / aspect_ratio)))
                if w < img_w and h < img_h:
                    top, left = rng.randint(0, img_h - h), rng.randint(0, img_w - w)
                    img[:, top:top + h, left:left + w] = _erasing_pixels(erasing, (chan, h, w), images, generator)
                    break
    return images


def _erasing_pixels(erasing: RandomErasing, shape, like: torch.Tensor, generator) -> torch.Tensor:
    if erasing.per_pixel:
        return torch.empty(shape, dtype=like.dtype, device=like.device).normal_(generator=generator)
    if erasing.rand_color:
        return torch.empty((shape[0], 1, 1), dtype=like.dtype, device=like.device).normal_(generator=generator)
    return torch.zeros((shape[0], 1, 1), dtype=like.dtype, device=like.device)


class DeviceBatches:
    """A DataLoader of uint8 NHWC batches seen as normalised float NCHW batches on ``device``: ``stage`` run per batch.

    Normalisation is one multiply and one add per element; the result keeps the NHWC memory layout
    (``channels_last``), which convolutions prefer. Random erasing (training) draws from generators
    seeded by (seed, rank, epoch, step), the step being counted from the sampler's resume position:
    the batches do not depend on the global random streams, and a resumed run sees the same ones.
    Exposes ``sampler`` and ``len()`` like the wrapped loader.
    """

    def __init__(self, loader, stage: BatchStage, device: torch.device, seed: int = 0, rank: int = 0):
        self.loader = loader
        self.device = device
        mean, std = torch.tensor(stage.mean), torch.tensor(stage.std)  # float32, as torchvision's Normalize
        self.scale = (1.0 / (255.0 * std)).to(device)
        self.shift = (-mean / std).to(device)
        self.erasing = stage.erasing
        self.seed, self.rank = seed, rank

    @property
    def sampler(self):
        return self.loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> float NCHW (channels_last memory), x / (255 std) - mean / std."""
        images = images.to(self.device, non_blocking=True)
        n, h, w, c = images.shape
        # The per-channel constants repeated along a row: broadcasting over an inner dimension of
        # w * 3 elements instead of 3 lets the CPU kernels vectorise.
        rows = images.reshape(n, h, w * c).float().mul_(self.scale.repeat(w)).add_(self.shift.repeat(w))
        return rows.view(n, h, w, c).permute(0, 3, 1, 2)

    def erase(self, images: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        rng, generator = stream_generators(self.seed, self.rank, epoch, step, Stream.ERASE, images.device)
        return erase_(images, self.erasing, rng, generator)

    def __iter__(self):
        sampler = self.loader.sampler
        epoch = getattr(sampler, 'epoch', 0)
        first_step = getattr(sampler, 'start', 0) // max(self.loader.batch_size or 1, 1)
        for step, (images, targets, unreadable) in enumerate(self.loader, start=first_step):
            if images.ndim == 4:  # an evaluation batch of unreadable images only is empty
                images = self.normalise(images)
                if self.erasing is not None and self.erasing.probability > 0:
                    images = self.erase(images, epoch, step)
            yield images, targets, unreadable
