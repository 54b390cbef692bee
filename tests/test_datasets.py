import json
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import AugmentOp, rand_augment_transform
from torchvision import transforms

import main
from datasets import (DataSettings, DigitsDataset, INatDataset, RobustSamples, build_dataset, build_pipeline,
                      build_transform, check_same_classes)
from imagefolder import make_imagefolder, make_imagenet_as_downloaded
from utils import UserError


def parse(*argv):
    return main.get_args_parser().parse_args([str(a) for a in argv])


def settings(*argv) -> DataSettings:
    return DataSettings.from_args(parse(*argv))


def build_split(is_train: bool, data: DataSettings):
    """(dataset, number of classes) of a split, with the pipeline main.py gives it."""
    return build_dataset(is_train, data, build_pipeline(is_train, data.transform))


def test_posterize_at_magnitude_10_gives_black_instead_of_crashing():
    # PosterizeIncreasing at magnitude 10 asks for 0 bits, which Pillow >= 11 rejects.
    op = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)
    img = Image.new('RGB', (20, 10), (200, 100, 50))
    out = op(img)
    assert out.size == img.size and out.getextrema() == ((0, 0), (0, 0), (0, 0))
    # a partial posterize still works as before
    assert AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=5)(img).getpixel((0, 0)) == (192, 64, 0)  # 2 bits kept


def test_deit_randaugment_policy_survives_many_images():
    ra = rand_augment_transform('rand-m9-mstd0.5-inc1', {'translate_const': 100, 'img_mean': (124, 116, 104)})
    random.seed(0)
    img = Image.new('RGB', (16, 16), (120, 80, 40))
    for _ in range(3000):  # the clipped mstd noise reaches magnitude 10 about once per thousand ops
        ra(img)


class Draws(torch.utils.data.Dataset):
    """Each item is one draw from each global generator (python, numpy, torch)."""

    def __len__(self):
        return 6

    def __getitem__(self, index):
        return (random.random(), float(np.random.rand()), float(torch.rand(1))), index


def test_robust_samples_seed_each_sample_and_restore_the_generators_once_per_batch():
    samples, keys = RobustSamples(Draws()), [(i, 100 + i) for i in range(6)]
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    one_by_one = [samples[key] for key in keys]
    loader = torch.utils.data.DataLoader(samples, sampler=keys, batch_size=3, collate_fn=lambda batch: batch,
                                         generator=torch.Generator())  # as main.py: no draw from the global one
    batched = [item for batch in loader for item in batch]  # the DataLoader's batched fetch: __getitems__
    assert batched == one_by_one and samples[(0, 100)] == one_by_one[0]  # each sample's draws are its seed's
    assert len({draws for draws, _, _ in batched}) == 6
    assert random.getstate() == state[0] and np.array_equal(np.random.get_state()[1], state[1])
    assert torch.equal(torch.get_rng_state(), state[2])  # the global streams are as they were


def test_train_transform_small_input_uses_padded_random_crop():
    t = build_transform(True, settings('--input-size', 32).transform)
    assert isinstance(t.transforms[0], transforms.RandomCrop) and t.transforms[0].padding == 4
    out = t(Image.new('RGB', (32, 32)))
    assert out.shape == (3, 32, 32)


def test_train_transform_large_input_is_timms_deit_pipeline():
    t = build_transform(True, settings('--input-size', 64).transform)
    names = [type(x).__name__ for x in t.transforms]
    assert names[0] == 'RandomResizedCropAndInterpolation' and 'RandAugment' in names
    assert 'RandomErasing' in names
    assert t(Image.new('RGB', (90, 70))).shape == (3, 64, 64)


def test_eval_transform_resizes_by_crop_ratio_then_center_crops():
    t = build_transform(False, settings('--input-size', 224, '--eval-crop-ratio', 0.875).transform)
    resize = t.transform.transforms[0]
    assert resize.size == 256 and resize.interpolation == transforms.InterpolationMode.BICUBIC
    assert t(Image.new('RGB', (500, 375))).shape == (3, 224, 224)


def test_imagefolder_class_count_comes_from_the_folders(tmp_path):
    root = make_imagefolder(tmp_path, num_classes=4, train_per_class=2, val_per_class=1)
    dataset, nb_classes = build_split(True, settings('--data-path', root, '--input-size', 32))
    assert nb_classes == 4 and len(dataset) == 8
    with pytest.raises(UserError, match='--nb-classes 5 disagrees with the 4 classes'):
        build_split(True, settings('--data-path', root, '--input-size', 32, '--nb-classes', 5))


def test_train_and_val_with_different_classes_is_an_error(tmp_path):
    root = make_imagefolder(tmp_path, num_classes=3, train_per_class=2, val_per_class=1)
    (root / 'val' / 'class_2').rename(root / 'val' / 'class_x')
    data = settings('--data-path', root, '--input-size', 32)
    with pytest.raises(UserError, match='different class folders'):
        check_same_classes(build_split(True, data)[0], build_split(False, data)[0])


def test_inat_json_layout(tmp_path):
    categories = [{'id': i, 'name': f'species{i}', 'genus': f'genus{i // 2}'} for i in range(4)]
    (tmp_path / 'categories.json').write_text(json.dumps(categories))
    for split, ids in (('train', [0, 1, 2, 3, 3]), ('val', [1, 2])):
        images, annotations = [], []
        for n, cid in enumerate(ids):
            name = f'{split}/{cid}/{n}.jpg'
            (tmp_path / split / str(cid)).mkdir(parents=True, exist_ok=True)
            Image.new('RGB', (8, 8)).save(tmp_path / name)
            images.append({'id': n, 'file_name': name})
            annotations.append({'id': n, 'image_id': n, 'category_id': cid})
        (tmp_path / f'{split}2019.json').write_text(json.dumps({'images': images, 'annotations': annotations}))

    data = settings('--data-path', tmp_path, '--data-set', 'INAT19', '--input-size', 32, '--inat-category', 'genus')
    train, nb_classes = build_split(True, data)
    val, _ = build_split(False, data)
    assert nb_classes == 2 and len(train) == 5 and len(val) == 2
    assert [t for _, t in val.samples] == [0, 1]  # species 1 -> genus0, species 2 -> genus1
    image, target = train[4]
    assert image.shape == (3, 32, 32) and target == 1
    species = INatDataset(str(tmp_path), train=True, year=2019, category='name')
    assert species.nb_classes == 4


def test_cifar_alias_is_cifar100(tmp_path, monkeypatch):
    import torchvision.datasets as tvd
    seen = {}

    def fake(cls_name):
        def init(self, root, train, transform, download):
            seen[cls_name] = (root, train, download)
        return init

    monkeypatch.setattr(tvd.CIFAR100, '__init__', fake('CIFAR100'))
    monkeypatch.setattr(tvd.CIFAR10, '__init__', fake('CIFAR10'))
    assert build_split(True, settings('--data-set', 'CIFAR', '--data-path', tmp_path, '--input-size', 32))[1] == 100
    assert 'CIFAR100' in seen
    assert build_split(False, settings('--data-set', 'CIFAR10', '--data-path', tmp_path, '--input-size', 32))[1] == 10
    assert seen['CIFAR10'] == (str(tmp_path), False, True)


@pytest.mark.parametrize('src', [False, True])
def test_three_augment_pipeline(src):
    argv = ['--input-size', 48, '--ThreeAugment'] + (['--src'] if src else [])
    t = build_transform(True, settings(*argv).transform)
    names = [type(x).__name__ for x in t.transform.transforms]
    assert names[0] == ('Resize' if src else 'RandomResizedCrop') and 'RandomChoice' in names
    assert 'ColorJitter' in names
    random.seed(0)
    torch.manual_seed(0)
    outs = [t(Image.new('RGB', (64, 50), (200, 30, 90))) for _ in range(12)]
    assert all(o.shape == (3, 48, 48) for o in outs)
    # grayscale makes the three channels equal before normalisation: some outputs show it, not all
    gray = [bool(torch.allclose(o[0] * 0.229 + 0.485, o[1] * 0.224 + 0.456, atol=1e-5)) for o in outs]
    assert any(gray) and not all(gray)


def test_digits_is_embedded_with_a_fixed_stratified_split(tmp_path):
    data = settings('--data-set', 'DIGITS', '--input-size', 16, '--data-path', tmp_path / 'absent')
    (train, nb_classes), (val, _) = build_split(True, data), build_split(False, data)
    assert nb_classes == 10 and (len(train), len(val)) == (1437, 360)
    assert set(train.indices).isdisjoint(val.indices) and len(set(train.indices) | set(val.indices)) == 1797
    assert val.indices[:4] == [21, 24, 28, 34] and DigitsDataset(False).indices == val.indices  # the same everywhere
    assert sorted(Counter(val.targets).values()) == [35, 35] + [36] * 6 + [37, 37]  # stratified
    image, target = train[0]
    assert image.shape == (3, 16, 16) and 0 <= target < 10


def test_digits_100_keeps_ten_training_images_per_class_and_the_same_val_split(tmp_path):
    data = settings('--data-set', 'DIGITS-100', '--input-size', 16, '--data-path', tmp_path / 'absent')
    (train, nb_classes), (val, _) = build_split(True, data), build_split(False, data)
    assert nb_classes == 10 and Counter(train.targets) == {digit: 10 for digit in range(10)}
    assert set(train.indices) < set(DigitsDataset(True).indices) and val.indices == DigitsDataset(False).indices
    assert DigitsDataset(True, train_images=100).indices == train.indices  # fixed: the same on every run
    train_steps = build_transform(True, data.transform).transforms
    assert not any(isinstance(t, transforms.RandomHorizontalFlip) for t in train_steps)


def test_digits_images_are_the_scikit_learn_pixels_as_rgb():
    from sklearn.datasets import load_digits
    raw = DigitsDataset(True)  # size 8: no resampling
    image = raw[5][0]
    assert image.mode == 'RGB' and image.size == (8, 8)
    expected = load_digits().images[raw.indices[5]] * 255 / 16
    assert np.abs(np.asarray(image)[:, :, 0] - expected).max() <= 0.5
    assert DigitsDataset(True, size=16)[5][0].size == (16, 16)


def test_digits_are_not_flipped_and_small_inputs_pad_in_proportion():
    digits = build_transform(True, settings('--data-set', 'DIGITS', '--input-size', 16, '--aa', 'none').transform)
    assert not any(isinstance(t, transforms.RandomHorizontalFlip) for t in digits.transforms)
    assert digits.transforms[0].padding == 2


@pytest.mark.parametrize('ground_truth', ['meta.bin', 'LOC_val_solution.csv'])
def test_imagenet_as_downloaded_flat_val_is_labelled_by_its_ground_truth(tmp_path, ground_truth):
    truth = make_imagenet_as_downloaded(tmp_path, ground_truth)
    args = parse('--data-path', tmp_path, '--input-size', 32, '--batch-size', 2, '--num_workers', 0)
    args.device = torch.device('cpu')
    val, nb_classes = build_split(False, DataSettings.from_args(args))
    train, _ = build_split(True, DataSettings.from_args(args))
    check_same_classes(train, val)
    assert nb_classes == 3 and val.classes == train.classes == ['n01440764', 'n01440765', 'n01440766']
    assert [(p.split('/')[-1], val.classes[label]) for p, label in val.samples] == sorted(truth.items())
    image, label = val[0]
    assert image.shape == (3, 32, 32) and val.classes[label] == truth['ILSVRC2012_val_00000001.JPEG']
    _, loader_val, _, _ = main.build_data(args)
    assert sorted(torch.cat([targets for _, targets, _ in loader_val]).tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_imagenet_as_downloaded_missing_or_inconsistent_ground_truth_is_one_clear_line(tmp_path):
    data = settings('--data-path', tmp_path, '--input-size', 32)

    def error() -> str:
        with pytest.raises(UserError) as e:
            build_split(False, data)
        assert '\n' not in str(e.value)
        return str(e.value)

    truth = make_imagenet_as_downloaded(tmp_path, 'LOC_val_solution.csv')
    csv = tmp_path / 'LOC_val_solution.csv'
    lines = csv.read_text().splitlines()
    (tmp_path / 'val' / 'ILSVRC2012_val_00000004.JPEG').unlink()
    assert '1 validation images are missing' in error()
    csv.write_text('\n'.join(line for line in lines if not line.startswith('ILSVRC2012_val_00000003')) + '\n')
    assert 'ILSVRC2012_val_00000003.JPEG' in error() and 'not in' in error()
    csv.write_text('\n'.join(lines).replace(truth['ILSVRC2012_val_00000001.JPEG'], 'n09999999') + '\n')
    (tmp_path / 'val' / 'ILSVRC2012_val_00000004.JPEG').write_bytes(b'')  # back, as a file
    assert 'n09999999' in error() and 'no train/ folder' in error()
    csv.unlink()
    assert 'no ground truth was found' in error() and 'ILSVRC2012_devkit_t12.tar.gz' in error()
    torch.save(({}, ['n01440764'] * 5), tmp_path / 'meta.bin')
    assert 'val/ has 9 images but' in error() and 'labels 5' in error()
    (tmp_path / 'meta.bin').unlink()
    (tmp_path / 'ILSVRC2012_devkit_t12.tar.gz').write_bytes(b'not the devkit')
    assert 'download the devkit again' in error()
