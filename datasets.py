"""Datasets (ImageNet-style folders, CIFAR, iNaturalist, scikit-learn's digits), the DeiT train/eval
transforms, and the pipeline each split gets (the reference transforms, or --fast-data's)."""
import argparse
import csv
import io
import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data import auto_augment
from timm.data.random_erasing import RandomErasing
from torchvision import datasets, transforms
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate
from torchvision.datasets import imagenet
from torchvision.datasets.folder import IMG_EXTENSIONS, ImageFolder, find_classes

from data_files import ClassFolders, load_rgb
from fast_data import BatchStage, FastEvalTransform, FastTrainTransform, from_bytes_lazily, open_lazily
import shards
from seeding import preserved_cpu_generators, seed_cpu_generators
from utils import UserError

# `--data-set` names; CIFAR stays the original's alias of CIFAR-100.
# DIGITS-N: N labelled training images of DIGITS (the same validation split), the small-data regime
# of docs/distillation-study.md.
DIGITS_SUBSETS = {'DIGITS-100': 100, 'DIGITS-300': 300}
# WDS and HF: read from shards (shards.py), --shuffle blocks can order them.
SHARDED_DATA_SETS = ('WDS', 'HF')
DATA_SETS = ('IMNET', 'IMNETV2', 'CIFAR', 'CIFAR10', 'CIFAR100', 'INAT', 'INAT19', 'DIGITS', *DIGITS_SUBSETS,
             *SHARDED_DATA_SETS)
EVAL_ONLY_DATA_SETS = ('IMNETV2',)  # a test set without a training split
INAT_CATEGORIES = ('kingdom', 'phylum', 'class', 'order', 'supercategory', 'family', 'genus', 'name')


@dataclass(frozen=True)
class TransformSettings:
    """How images become model inputs: the augmentation flags of main.py and --fast-data."""
    input_size: int
    color_jitter: float
    auto_augment: Optional[str]  # timm's policy name (--aa); None: no automatic augmentation
    interpolation: str  # of the train crop (--train-interpolation)
    reprob: float
    remode: str
    recount: int
    hflip: float  # probability of a horizontal flip in training
    three_augment: bool
    simple_crop: bool  # --src, with three_augment
    eval_crop_ratio: float
    fast: bool  # --fast-data: the fast pipeline wherever it implements the reference
    mean: Tuple[float, float, float] = IMAGENET_DEFAULT_MEAN  # the normalisation (--mean, --std)
    std: Tuple[float, float, float] = IMAGENET_DEFAULT_STD

    @classmethod
    def for_eval(cls, input_size: int, eval_crop_ratio: float, fast: bool = True) -> 'TransformSettings':
        """Settings that only evaluation reads (build_pipeline(False, ...)); the augmentation ones are off."""
        return cls(input_size=input_size, color_jitter=0.0, auto_augment=None, interpolation='bicubic', reprob=0.0,
                   remode='pixel', recount=1, hflip=0.0, three_augment=False, simple_crop=False,
                   eval_crop_ratio=eval_crop_ratio, fast=fast)


@dataclass(frozen=True)
class DataSettings:
    """Which dataset (--data-set, --data-path, --inat-category), the class count it must have, its transforms."""
    data_set: str
    data_path: str
    inat_category: str
    nb_classes: Optional[int]  # --nb-classes; None: whatever the data holds
    transform: TransformSettings

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> 'DataSettings':
        """The settings main.py's flags give."""
        return cls(args.data_set, args.data_path, args.inat_category, args.nb_classes, TransformSettings(
            input_size=args.input_size, color_jitter=args.color_jitter,
            auto_augment=args.aa if args.aa and args.aa.lower() != 'none' else None,
            interpolation=args.train_interpolation, reprob=args.reprob, remode=args.remode, recount=args.recount,
            # handwritten digits are not mirror-symmetric
            hflip=0.0 if args.data_set.startswith('DIGITS') else 0.5,
            three_augment=args.ThreeAugment, simple_crop=args.src, eval_crop_ratio=args.eval_crop_ratio,
            fast=args.fast_data,  # --mean/--std as main.resolve_args settles them; unresolved: ImageNet's
            mean=tuple(args.mean or IMAGENET_DEFAULT_MEAN), std=tuple(args.std or IMAGENET_DEFAULT_STD)))


def pil_from_bytes(data: bytes) -> Image.Image:
    """An image file's bytes as an RGB PIL image, the pixels load_rgb gives for the file."""
    return Image.open(io.BytesIO(data)).convert('RGB')


@dataclass(frozen=True)
class Pipeline:
    """How a split's images become model inputs.

    ``open_image`` reads an image file (for the datasets made of files), ``open_bytes`` an image file's
    bytes (for the datasets read from shards), ``transform`` makes a sample
    of it in a data-loader worker, and ``batch``, when set, finishes each collated batch on the
    training device (fast_data.DeviceBatches); without it the samples leave ``transform`` finished.
    """
    transform: Callable[[Any], Any]
    open_image: Callable[[str], Any] = load_rgb
    open_bytes: Callable[[bytes], Any] = pil_from_bytes
    batch: Optional[BatchStage] = None


def posterize(img: Image.Image, bits_to_keep: int, **__) -> Image.Image:
    """timm's posterize op, safe at 0 bits.

    RandAugment's PosterizeIncreasing maps magnitude 10 (reached by the clipped mstd noise of
    `rand-m9-mstd0.5`, ~0.1% of images) to 0 bits; Pillow >= 11 rejects that and the data-loader
    worker dies. 0 bits keep no level but black: the image older Pillow gives.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


# AugmentOp looks its function up in this table when a policy is built, so patch it at import.
for _name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
    auto_augment.NAME_TO_OP[_name] = posterize


class INatDataset(ImageFolder):
    """iNaturalist 2018/2019 in the original JSON layout: ``{train,val}{year}.json`` and
    ``categories.json`` under ``root``; ``category`` picks the taxonomy level used as label."""

    def __init__(self, root: str, train: bool = True, year: int = 2018, transform=None,
                 target_transform=None, category: str = 'name', loader=load_rgb):
        self.root = root
        self.transform = transform
        self.target_transform = target_transform
        self.loader = loader
        split = 'train' if train else 'val'
        with open(os.path.join(root, f'{split}{year}.json')) as f:
            data = json.load(f)
        with open(os.path.join(root, 'categories.json')) as f:
            categories = json.load(f)
        with open(os.path.join(root, f'train{year}.json')) as f:
            train_data = json.load(f)

        # The label set is taken from the train split so that train and val agree.
        level_of = {c['id']: c[category] for c in categories}
        names = sorted({level_of[a['category_id']] for a in train_data['annotations']})
        self.classes = names
        self.class_to_idx = {name: i for i, name in enumerate(names)}
        self.nb_classes = len(names)

        self.samples = []
        for image, annotation in zip(data['images'], data['annotations']):
            target = self.class_to_idx[level_of[annotation['category_id']]]
            self.samples.append((os.path.join(root, image['file_name']), target))
        self.targets = [s[1] for s in self.samples]
        self.imgs = self.samples


class DigitsDataset(Dataset):
    """scikit-learn's handwritten digits: 1,797 grey 8x8 images of 0-9, shipped inside its package.

    A fixed stratified split (20% for val, seed 0; the same on every machine and run) gives 1,437
    train and 360 val images; ``train_images`` keeps a fixed stratified subset of the train split.
    The images are PIL RGB, upscaled bicubically to ``size`` so that the usual transforms (crops,
    RandAugment, erasing) act at the model's input size.
    """
    VAL_FRACTION = 0.2
    SPLIT_SEED = 0

    def __init__(self, train: bool = True, size: int = 8, transform=None, train_images: Optional[int] = None):
        from sklearn.datasets import load_digits  # imported here: only DIGITS needs scikit-learn
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        train_idx, val_idx = train_test_split(np.arange(len(digits.target)), test_size=self.VAL_FRACTION,
                                              stratify=digits.target, random_state=self.SPLIT_SEED)
        if train_images is not None:
            train_idx, _ = train_test_split(train_idx, train_size=train_images, stratify=digits.target[train_idx],
                                            random_state=self.SPLIT_SEED)
        indices = np.sort(train_idx if train else val_idx)
        grey = np.rint(digits.images[indices] * (255 / 16)).astype(np.uint8)  # 0-16 -> 0-255
        self.images = [self._to_rgb(pixels, size) for pixels in grey]
        self.targets: List[int] = digits.target[indices].tolist()
        self.indices: List[int] = indices.tolist()  # rows of load_digits(), for reproducibility checks
        self.classes = [str(d) for d in range(10)]
        self.transform = transform

    @staticmethod
    def _to_rgb(pixels: np.ndarray, size: int) -> Image.Image:
        image = Image.fromarray(pixels)  # uint8 2-D: mode L
        if size != image.width:
            image = image.resize((size, size), Image.BICUBIC)
        return image.convert('RGB')

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.images[index]
        return (self.transform(image) if self.transform else image), self.targets[index]


def image_folder(root: str, split: str, transform, loader) -> ImageFolder:
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise UserError(f'{path} not found: --data-path must hold train/ and val/ class folders')
    try:
        return ClassFolders(path, transform=transform, loader=loader)
    except FileNotFoundError as e:  # torchvision's words for no class folder, or a class folder without images
        if not any(entry.is_dir() for entry in os.scandir(path)):
            raise UserError(f'{path} has no class folders: put the images of each class in a folder of their own '
                            f'under {path}') from None
        raise UserError(f'{path}: {str(e).split(". ")[0]}: remove the empty class folders or add images') from None
    except PermissionError as e:
        raise UserError(f'cannot read {path}: {e}') from None


class FlatValFolder(ImageFolder):
    """ImageNet's validation images as downloaded (one flat folder), labelled with the classes of train/.

    ``wnid_of`` maps each file name to its WordNet id (a train/ class folder); samples, classes and
    loading are ImageFolder's.
    """

    def __init__(self, root: str, wnid_of: Dict[str, str], classes: List[str], transform=None, loader=load_rgb):
        self.wnid_of, self.train_classes = wnid_of, classes
        super().__init__(root, transform=transform, loader=loader)

    def find_classes(self, directory: str) -> Tuple[List[str], Dict[str, int]]:
        return self.train_classes, {wnid: i for i, wnid in enumerate(self.train_classes)}

    def make_dataset(self, directory: str, class_to_idx: Dict[str, int], *args, **kwargs) -> List[Tuple[str, int]]:
        return [(os.path.join(directory, name), class_to_idx[wnid]) for name, wnid in sorted(self.wnid_of.items())]


def flat_images(folder: str) -> List[str]:
    """The image files directly in ``folder``, sorted; empty when it holds class folders."""
    entries = list(os.scandir(folder))
    if any(e.is_dir() for e in entries):
        return []
    return sorted(e.name for e in entries if e.name.lower().endswith(IMG_EXTENSIONS))


# Where the labels of a flat val/ come from, looked up in --data-path in this order: torchvision's
# parsed devkit, the devkit archive itself, and Kaggle's CSV (also one to three folders up, since
# Kaggle's --data-path is ILSVRC/Data/CLS-LOC).
META_BIN, DEVKIT, KAGGLE_CSV = imagenet.META_FILE, imagenet.ARCHIVE_META['devkit'][0], 'LOC_val_solution.csv'


def val_ground_truth(data_path: str, images: List[str]) -> Tuple[Dict[str, str], str]:
    """File name -> WordNet id for the flat val/ ``images``, and the file it was read from."""
    if os.path.isfile(os.path.join(data_path, META_BIN)):
        source = os.path.join(data_path, META_BIN)
        return by_position(images, imagenet.load_meta_file(data_path)[1], source), source
    if os.path.isfile(os.path.join(data_path, DEVKIT)):
        source = os.path.join(data_path, DEVKIT)
        with tempfile.TemporaryDirectory() as parsed:
            try:  # md5-checked, then parsed with scipy as torchvision.datasets.ImageNet does
                imagenet.parse_devkit_archive(parsed, file=os.path.abspath(source))
            except RuntimeError as e:
                raise UserError(f'{source}: {e}: download the devkit again') from None
            return by_position(images, imagenet.load_meta_file(parsed)[1], source), source
    for folder in [Path(data_path), *Path(data_path).resolve().parents[:3]]:
        if (folder / KAGGLE_CSV).is_file():
            source = str(folder / KAGGLE_CSV)
            return by_image_id(images, read_kaggle_solution(source), source), source
    raise UserError(f'{os.path.join(data_path, "val")} holds images, not class folders, and no ground truth was '
                    f'found: put {DEVKIT} (ImageNet\'s devkit) or torchvision\'s {META_BIN} in --data-path, '
                    f'or Kaggle\'s {KAGGLE_CSV} next to it, or arrange val/ into class folders')


def by_position(images: List[str], wnids: List[str], source: str) -> Dict[str, str]:
    """The devkit lists one label per validation image, in the order of their file names."""
    if len(images) != len(wnids):
        raise UserError(f'val/ has {len(images)} images but {source} labels {len(wnids)}: '
                        f'val/ must hold exactly the {len(wnids)} ILSVRC2012_val_*.JPEG images')
    return dict(zip(images, wnids))


def read_kaggle_solution(path: str) -> Dict[str, str]:
    """ImageId -> WordNet id: the first word of each row's PredictionString (its first box's class)."""
    try:
        with open(path, newline='') as f:
            return {row['ImageId']: row['PredictionString'].split()[0] for row in csv.DictReader(f)}
    except (KeyError, IndexError, AttributeError, csv.Error):
        raise UserError(f'{path} is not a Kaggle solution file (columns ImageId,PredictionString): '
                        f'download it again') from None


def by_image_id(images: List[str], wnid_of_id: Dict[str, str], source: str) -> Dict[str, str]:
    unlabelled = [name for name in images if os.path.splitext(name)[0] not in wnid_of_id]
    if unlabelled:
        raise UserError(f'{len(unlabelled)} images of val/ are not in {source} (e.g. {unlabelled[0]}): '
                        f'remove them or use the solution file of this validation set')
    missing = len(wnid_of_id) - len(images)
    if missing > 0:
        raise UserError(f'{source} labels {len(wnid_of_id)} images but val/ has {len(images)}: '
                        f'{missing} validation images are missing, restore them')
    return {name: wnid_of_id[os.path.splitext(name)[0]] for name in images}


def imagenet_val_as_downloaded(data_path: str, images: List[str], transform, loader) -> FlatValFolder:
    """The flat val/ ``images`` labelled by the devkit or Kaggle's CSV, with the class indices of train/."""
    try:
        train_classes = find_classes(os.path.join(data_path, 'train'))[0]
    except FileNotFoundError:
        raise UserError(f'{os.path.join(data_path, "train")} has no class folders: --data-path must hold '
                        f'train/ class folders next to val/') from None
    wnid_of, source = val_ground_truth(data_path, images)
    unknown = sorted(set(wnid_of.values()) - set(train_classes))
    if unknown:
        raise UserError(f'{source} labels val/ images with {len(unknown)} classes that have no train/ folder '
                        f'(e.g. {unknown[0]}): train/ must hold the class folders named by WordNet id (n01440764 ...)')
    return FlatValFolder(os.path.join(data_path, 'val'), wnid_of, train_classes, transform=transform, loader=loader)


class ImageNetV2Folder(ImageFolder):
    """ImageNet-V2 (Recht et al. 2019) as its archives unpack: one folder per class named by its ImageNet
    class index, ``0`` ... ``999``. ImageFolder would sort the names as text ('0', '1', '10', '100' ...);
    here folder ``k`` is class ``k``, ImageNet's order."""

    def find_classes(self, directory: str) -> Tuple[List[str], Dict[str, int]]:
        names = [e.name for e in os.scandir(directory) if e.is_dir()]
        if not names or not all(name.isdigit() for name in names):
            raise UserError(f'{directory} must hold the ImageNet-V2 class folders 0 ... 999 (named by class index), '
                            f'found {sorted(names)[:5]}: point --data-path at the unpacked V2 folder')
        indices = sorted(int(name) for name in names)
        if indices != list(range(len(indices))):
            missing = sorted(set(range(indices[-1] + 1)) - set(indices))
            raise UserError(f'{directory} lacks the class folders {missing[:5]} of ImageNet-V2 (0 ... {indices[-1]}): '
                            f'unpack the whole archive')
        classes = [str(i) for i in indices]
        return classes, {name: int(name) for name in classes}


def imagenet_split(data_path: str, is_train: bool, transform=None, loader=load_rgb) -> ImageFolder:
    """train/ or val/ of ``data_path`` as class folders, or val/ as downloaded (flat, with its ground truth)."""
    val_dir = os.path.join(data_path, 'val')
    val_images = flat_images(val_dir) if not is_train and os.path.isdir(val_dir) else []
    if val_images:  # ImageNet as downloaded
        return imagenet_val_as_downloaded(data_path, val_images, transform, loader)
    return image_folder(data_path, 'train' if is_train else 'val', transform, loader)


def _cifar(cls, data_path: str, is_train: bool, transform):
    try:
        return cls(data_path, train=is_train, transform=transform, download=True)
    except Exception as e:  # no network, unwritable folder, corrupt archive
        raise UserError(f'{cls.__name__} not found under --data-path {data_path} and could not be '
                        f'downloaded ({e}): put the extracted python version there') from None


def build_dataset(is_train: bool, settings: DataSettings, pipeline: Pipeline) -> Tuple[Dataset, int]:
    """The ``settings.data_set`` split, read and transformed by ``pipeline``, and its number of classes."""
    data_set, data_path, transform = settings.data_set, settings.data_path, pipeline.transform
    if not os.path.isdir(data_path) and data_set in ('IMNET', 'IMNETV2', 'INAT', 'INAT19', 'HF'):
        raise UserError(f'--data-path {data_path} is not a directory: point it at the dataset root')

    if data_set in ('CIFAR', 'CIFAR100'):
        dataset, nb_classes = _cifar(datasets.CIFAR100, data_path, is_train, transform), 100
    elif data_set == 'CIFAR10':
        dataset, nb_classes = _cifar(datasets.CIFAR10, data_path, is_train, transform), 10
    elif data_set == 'IMNET':
        dataset = imagenet_split(data_path, is_train, transform, pipeline.open_image)
        nb_classes = len(dataset.classes)
    elif data_set == 'IMNETV2':  # evaluation only: main.py builds no training split for it
        try:
            dataset = ImageNetV2Folder(data_path, transform=transform, loader=pipeline.open_image)
        except FileNotFoundError as e:  # torchvision's words for a class folder without images
            raise UserError(f'{data_path}: {str(e).split(". ")[0]}: unpack the whole ImageNet-V2 archive') from None
        nb_classes = len(dataset.classes)
    elif data_set in ('INAT', 'INAT19'):
        year = 2018 if data_set == 'INAT' else 2019
        try:
            dataset = INatDataset(data_path, train=is_train, year=year, category=settings.inat_category,
                                  transform=transform, loader=pipeline.open_image)
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f'cannot read the iNaturalist {year} annotations under {data_path}: {e}') from None
        nb_classes = dataset.nb_classes
    elif data_set == 'WDS':
        dataset, nb_classes = shards.build_wds(data_path, is_train, transform, pipeline.open_bytes, settings.nb_classes)
    elif data_set == 'HF':
        dataset, nb_classes = shards.build_hf(data_path, is_train, transform, pipeline.open_bytes)
    elif data_set == 'DIGITS' or data_set in DIGITS_SUBSETS:  # embedded: --data-path is not read
        dataset = DigitsDataset(is_train, settings.transform.input_size, transform, DIGITS_SUBSETS.get(data_set))
        nb_classes = 10
    else:
        raise UserError(f'unknown --data-set {data_set}: choose one of {", ".join(DATA_SETS)}')

    if settings.nb_classes and settings.nb_classes != nb_classes:
        raise UserError(f'--nb-classes {settings.nb_classes} disagrees with the {nb_classes} classes found in '
                        f'{data_set} at {data_path}: fix or drop --nb-classes')
    return dataset, nb_classes


def class_names(dataset) -> List[str]:
    """The names of the dataset's classes, in label order (class folders, CIFAR's names, iNat's level)."""
    return [str(name) for name in dataset.classes]


def imagenet_descriptions(classes: List[str]) -> Optional[List[str]]:
    """The human-readable names (timm's ImageNet metadata) of ``classes`` when they are ImageNet synset ids
    (n01440764 ...: ImageNet-1k, -22k or a subset); None for other data."""
    from timm.data import ImageNetInfo
    if not classes or not all(len(name) == 9 and name[0] == 'n' and name[1:].isdigit() for name in classes):
        return None
    for subset in ('imagenet-1k', 'imagenet-22k'):
        info = ImageNetInfo(subset)
        known = set(info.label_names())
        if all(name in known for name in classes):
            return [info.label_name_to_description(name) for name in classes]
    return None


def check_same_classes(dataset_train, dataset_val) -> None:
    """Train and val must label the same classes with the same indices."""
    train_classes = getattr(dataset_train, 'classes', None)
    val_classes = getattr(dataset_val, 'classes', None)
    if train_classes is not None and val_classes is not None and list(train_classes) != list(val_classes):
        only_train = sorted(set(train_classes) - set(val_classes))[:5]
        only_val = sorted(set(val_classes) - set(train_classes))[:5]
        raise UserError(f'train and val have different class folders (only in train: {only_train}, '
                        f'only in val: {only_val}): give both splits the same classes')


class EvalTransform:
    """Resize to ``size / crop_ratio`` (bicubic), center crop ``size``, normalisation (ImageNet's by default)."""

    def __init__(self, input_size: int, crop_ratio: float = 0.875, mean: Tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
                 std: Tuple[float, ...] = IMAGENET_DEFAULT_STD):
        steps = []
        if input_size > 32:  # small inputs (CIFAR-sized) are used as they are
            steps.append(transforms.Resize(int(input_size / crop_ratio),
                                           interpolation=transforms.InterpolationMode.BICUBIC))
        steps += [transforms.CenterCrop(input_size), transforms.ToTensor(), transforms.Normalize(mean, std)]
        self.transform = transforms.Compose(steps)

    def __call__(self, img):
        return self.transform(img)


class RandomGaussianBlur:
    """PIL Gaussian blur of a random radius in [0.1, 2] (torchvision's needs a fixed kernel size)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class ThreeAugment:
    """DeiT III's train pipeline (--ThreeAugment): crop and flip, then one of grayscale / solarize /
    blur, colour jitter, normalisation. ``simple_crop`` (--src) resizes and takes a padded random
    crop instead of RandomResizedCrop."""

    def __init__(self, input_size: int, color_jitter: float = 0.3, simple_crop: bool = False,
                 mean: Tuple[float, ...] = IMAGENET_DEFAULT_MEAN, std: Tuple[float, ...] = IMAGENET_DEFAULT_STD):
        bicubic = transforms.InterpolationMode.BICUBIC
        if simple_crop:
            crop = [transforms.Resize(input_size, interpolation=bicubic),
                    transforms.RandomCrop(input_size, padding=4, padding_mode='reflect')]
        else:
            crop = [transforms.RandomResizedCrop(input_size, scale=(0.08, 1.0), interpolation=bicubic)]
        steps = crop + [transforms.RandomHorizontalFlip(),
                        transforms.RandomChoice([transforms.Grayscale(num_output_channels=3),
                                                 transforms.RandomSolarize(threshold=128, p=1.0),
                                                 RandomGaussianBlur()])]
        if color_jitter:
            steps.append(transforms.ColorJitter(color_jitter, color_jitter, color_jitter))
        steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
        self.transform = transforms.Compose(steps)

    def __call__(self, img):
        return self.transform(img)


def timm_train_stages(settings: TransformSettings) -> Tuple[transforms.Compose, transforms.Compose, transforms.Compose]:
    """timm's DeiT train pipeline in timm's three stages: crop and flip; RandAugment and jitter;
    tensor, normalisation and random erasing.

    Inputs of 32 px or less replace RandomResizedCrop by a padded RandomCrop, as the original: 4
    pixels at 32 px (CIFAR), in proportion below (2 pixels at 16 px: a 4-pixel pad, a quarter of a
    16 px image, slows a convnet's learning on DIGITS).
    """
    geometry, pixels, tensor = create_transform(
        input_size=settings.input_size, is_training=True, color_jitter=settings.color_jitter,
        auto_augment=settings.auto_augment, interpolation=settings.interpolation, re_prob=settings.reprob,
        re_mode=settings.remode, re_count=settings.recount, hflip=settings.hflip, mean=settings.mean, std=settings.std,
        separate=True)
    if settings.input_size <= 32:
        padding = max(1, settings.input_size // 8)
        geometry.transforms[0] = transforms.RandomCrop(settings.input_size, padding=padding, pad_if_needed=True)
    return geometry, pixels, tensor


def build_transform(is_train: bool, settings: TransformSettings):
    """The reference train or eval transform (timm's and torchvision's): a PIL image in, a normalised tensor out."""
    if not is_train:
        return EvalTransform(settings.input_size, settings.eval_crop_ratio, settings.mean, settings.std)
    if settings.three_augment:
        return ThreeAugment(settings.input_size, settings.color_jitter, simple_crop=settings.simple_crop,
                            mean=settings.mean, std=settings.std)
    return transforms.Compose([step for stage in timm_train_stages(settings) for step in stage.transforms])


def build_pipeline(is_train: bool, settings: TransformSettings) -> Pipeline:
    """The split's pipeline: --fast-data's where it implements the reference transform, else the reference."""
    if not settings.fast:
        return Pipeline(build_transform(is_train, settings))
    if is_train:
        return fast_train_pipeline(settings)
    if settings.input_size <= 32:  # evaluated without resizing: nothing for the fast path to do
        return Pipeline(build_transform(False, settings))
    return Pipeline(FastEvalTransform(settings.input_size, settings.eval_crop_ratio), open_lazily, from_bytes_lazily,
                    BatchStage(settings.mean, settings.std))


def fast_train_pipeline(settings: TransformSettings) -> Pipeline:
    """timm's train stages with the crop and the PIL steps on the fast path (fast_data.py: the same
    draws, decoding only what the crop needs) and the tensor stage per batch, where the fast path
    implements timm's crop; the reference otherwise."""
    if settings.three_augment:
        return Pipeline(build_transform(True, settings))
    geometry, pixels, tensor = timm_train_stages(settings)
    crop = geometry.transforms[0]
    if not FastTrainTransform.implements(crop):  # the padded crop of small inputs, a filter torch's resize lacks
        return Pipeline(transforms.Compose(geometry.transforms + pixels.transforms + tensor.transforms))
    # the tensor stage's own RandomErasing (timm's, when --reprob > 0), applied per batch instead
    erasing = next((step for step in tensor.transforms if isinstance(step, RandomErasing)), None)
    return Pipeline(FastTrainTransform(crop, geometry.transforms[1:] + pixels.transforms), open_lazily,
                    from_bytes_lazily, BatchStage(settings.mean, settings.std, erasing))


# What a broken image file raises while PIL decodes it (truncated, corrupt, not an image at all), and
# what its header check raises for a decompression bomb (more pixels than twice Image.MAX_IMAGE_PIXELS).
UNREADABLE_IMAGE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


class RobustSamples(Dataset):
    """A dataset seen through the trainer: seeded augmentation per sample, unreadable images survived.

    Indexed with ``(index, seed)`` pairs from samplers.ResumableSampler (or a plain index). An image
    that cannot be decoded never kills a data-loader worker: in training it is replaced by the next
    readable sample (the batch keeps its size, which Mixup needs); in evaluation it is dropped.
    Items are ``(image, target, unreadable_paths)``; collate with ``collate_skipping``.
    """

    def __init__(self, dataset, replace: bool = True):
        self.dataset = dataset
        self.replace = replace

    def __len__(self) -> int:
        return len(self.dataset)

    def _path(self, index: int) -> str:
        if hasattr(self.dataset, 'sample_name'):  # datasets read from shards
            return self.dataset.sample_name(index)
        samples = getattr(self.dataset, 'samples', None)
        return samples[index][0] if samples else f'sample {index}'

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list) -> list:
        """A batch's samples (the DataLoader's batched fetch): the generators' state is saved and
        restored once per batch, not per sample (saving numpy's state is not free)."""
        with preserved_cpu_generators():
            return [self._sample(key) for key in keys]

    def check_readable(self, split: str, samples: int = 8) -> None:
        """Refuse a split of which none of ``samples`` images spread over it can be read: fail now, not
        after an epoch (or a whole data-loader worker) has gone by."""
        count = len(self.dataset)
        indices = sorted({i * (count - 1) // max(samples - 1, 1) for i in range(min(samples, count))})
        errors = []
        with preserved_cpu_generators():
            for index in indices:
                image, _, unreadable = self._sample(index, retry=False)
                if image is not None:
                    return
                errors += unreadable
        if errors:
            raise UserError(f'none of {len(errors)} {split} images sampled across the split can be read, e.g. '
                            f'{errors[0]}: check --data-path and the files')

    def _sample(self, key, retry: bool = True):
        """Item ``key`` with its augmentation seeded, or the next readable one; leaves the generators seeded."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is not None:
            seed_cpu_generators(seed)
        unreadable: List[str] = []
        for attempt in range(len(self.dataset)):
            i = (index + attempt) % len(self.dataset)
            try:
                image, target = self.dataset[i]
                return image, target, unreadable
            except UNREADABLE_IMAGE_ERRORS as e:
                unreadable.append(f'{self._path(i)} ({type(e).__name__}: {e})')
                if not (self.replace and retry):
                    return None, None, unreadable
        raise RuntimeError(f'no readable image in the whole dataset, first error: {unreadable[0]}')


def collate_skipping(batch):
    """Collate ``(image, target, unreadable)`` items: drop missing images, gather unreadable paths."""
    unreadable = [path for _, _, paths in batch for path in paths]
    kept = [(image, target) for image, target, _ in batch if image is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), unreadable
    images, targets = default_collate(kept)
    return images, targets, unreadable
