"""--real-labels (ImageNet-ReaL top-1) and --data-set IMNETV2 on generated data whose answers are known:
a model that predicts one class for every image."""
import json
import random

import pytest
import timm
import torch
from conftest import FAST, assert_one_line_error, run_cli
from imagefolder import make_image, make_imagenet_as_downloaded

from datasets import ImageNetV2Folder


def constant_checkpoint(path, num_classes: int, predicted: int):
    """A test_vit checkpoint at 32 px whose top-1 is ``predicted`` for any image."""
    model = timm.create_model('test_vit', num_classes=num_classes, img_size=32)
    torch.nn.init.zeros_(model.head.weight)
    with torch.no_grad():
        model.head.bias.copy_(torch.arange(num_classes) == predicted)
    torch.save({'model': model.state_dict()}, path)
    return path


def accuracy_lines(proc) -> dict:
    """{'Acc@1': value, 'ReaL': value} from the summary lines of an evaluation."""
    found = {}
    for line in proc.stdout.splitlines():
        if line.startswith('* Acc@1'):
            found['Acc@1'] = float(line.split()[2])
        if line.startswith('* ReaL Acc@1'):
            found['ReaL'] = float(line.split()[3])
    return found


EVAL = ['--model', 'test_vit', *FAST, '--eval']


def test_real_top1_counts_an_image_when_its_top1_is_among_its_real_labels_and_leaves_out_unlabelled_ones(tmp_path):
    truth = make_imagenet_as_downloaded(tmp_path / 'imagenet', 'meta.bin', num_classes=3, val_per_class=3)
    ckpt = constant_checkpoint(tmp_path / 'two.pth', 3, predicted=2)
    # 9 images; the model says class 2 for each. ReaL: 3 correct ([2], [0, 2], [2, 1]), 3 wrong, 3 without labels.
    real = [[2], [0, 2], [0], [], [1], [2, 1], [], [0, 1], []]
    (tmp_path / 'real.json').write_text(json.dumps(real))
    proc = run_cli('--data-path', tmp_path / 'imagenet', *EVAL, '--resume', ckpt, '--real-labels', tmp_path / 'real.json')
    class2 = sum(1 for wnid in truth.values() if wnid == 'n01440766')
    assert accuracy_lines(proc) == {'Acc@1': pytest.approx(100 * class2 / 9, abs=1e-3), 'ReaL': 50.0}
    assert '6 images with ReaL labels, 3 without left out' in proc.stdout


def test_real_labels_that_do_not_fit_the_validation_images_are_one_clear_line(tmp_path):
    make_imagenet_as_downloaded(tmp_path / 'imagenet', 'meta.bin', num_classes=3, val_per_class=3)
    ckpt = constant_checkpoint(tmp_path / 'two.pth', 3, predicted=2)
    for content, fragment in ((json.dumps([[0]] * 4), 'has no entry in --real-labels'),
                              (json.dumps([[7]] * 9), 'names class 7'),
                              ('{"a": 1}', 'not a list of lists'), ('[[0', 'is not JSON')):
        (tmp_path / 'real.json').write_text(content)
        proc = run_cli('--data-path', tmp_path / 'imagenet', *EVAL, '--resume', ckpt,
                       '--real-labels', tmp_path / 'real.json', check=False)
        assert_one_line_error(proc, fragment)
    assert_one_line_error(run_cli('--data-path', tmp_path / 'imagenet', '--model', 'test_vit', *FAST,
                                  '--real-labels', tmp_path / 'real.json', check=False), 'add --eval')


def make_v2_folder(root, counts):
    """ImageNet-V2's layout: class folders named by index, ``counts[k]`` images in folder ``k``."""
    rng = random.Random(0)
    for label, count in enumerate(counts):
        (root / str(label)).mkdir(parents=True)
        for i in range(count):
            make_image(label, rng, (48, 40)).save(root / str(label) / f'{i}.jpeg')
    return root


def test_imagenet_v2_folders_are_mapped_by_class_index_not_by_name_order(tmp_path):
    root = make_v2_folder(tmp_path / 'v2', [1] * 10 + [2, 1])  # folders 0 ... 11, two images in '10'
    dataset = ImageNetV2Folder(str(root))
    assert sorted((label, p.split('/')[-2]) for p, label in dataset.samples) == \
        sorted([(k, str(k)) for k in range(12)] + [(10, '10')])
    # as text ('0', '1', '10', '11', '2' ...) index 10 would be folder '8', one image
    proc = run_cli('--data-path', root, '--data-set', 'IMNETV2', *EVAL,
                   '--resume', constant_checkpoint(tmp_path / 'ten.pth', 12, predicted=10))
    assert accuracy_lines(proc) == {'Acc@1': pytest.approx(100 * 2 / 13, abs=1e-3)}


def test_imagenet_v2_needs_eval_and_its_whole_set_of_class_folders(tmp_path):
    root = make_v2_folder(tmp_path / 'v2', [1, 1, 1])
    assert_one_line_error(run_cli('--data-path', root, '--data-set', 'IMNETV2', '--model', 'test_vit', *FAST,
                                  check=False), 'use it with --eval')
    (root / '1').rename(root / '5')
    assert_one_line_error(run_cli('--data-path', root, '--data-set', 'IMNETV2', *EVAL, check=False),
                          'lacks the class folders [1, 3, 4]')
