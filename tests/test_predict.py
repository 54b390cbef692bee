"""predict.py: the classes of new images, as --eval computes them; unreadable files skipped, never a traceback."""
import csv
import io
import os
import random
from contextlib import redirect_stderr, redirect_stdout

import pytest
import timm
import torch
from conftest import FAST, run_cli
from imagefolder import make_image, make_imagefolder

import predict
import utils
import weights


def run_predict(*args):
    """predict.cli in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = predict.cli(list(map(str, args)))
    return code, out.getvalue(), err.getvalue()


def read_rows(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def random_vit_checkpoint(path, classes, input_size=48):
    """An untrained test_vit that records its run as main.py does (model, input size, classes)."""
    torch.manual_seed(0)
    model = timm.create_model('test_vit', num_classes=len(classes), img_size=input_size)
    torch.save({'model': model.state_dict(), 'classes': classes,
                'args': {'model': 'test_vit', 'input_size': input_size, 'eval_crop_ratio': 0.875}}, path)
    return path


def test_predictions_agree_with_eval_on_the_same_labelled_images(imagefolder, tmp_path):
    classes = ['class_0', 'class_1', 'class_2']
    ckpt = random_vit_checkpoint(tmp_path / 'vit.pth', classes)  # 48 px: the fast data path's eval transform
    evaluated = run_cli('--data-path', imagefolder, '--model', 'test_vit', *FAST, '--input-size', 48,
                        '--eval', '--resume', ckpt)
    eval_acc1 = float(next(line for line in evaluated.stdout.splitlines() if line.startswith('* Acc@1')).split()[2])
    code, out, err = run_predict('--resume', ckpt, imagefolder / 'val', '--topk', 2, '--output', tmp_path / 'p.csv',
                                 '--device', 'cpu', '--no-amp', '--num_workers', 0, '--batch-size', 5)
    assert code == 0 and not err, err
    rows = read_rows(tmp_path / 'p.csv')
    assert len(rows) == 24 and list(rows[0]) == ['path', 'class_1', 'prob_1', 'class_2', 'prob_2']
    correct = sum(row['class_1'] == row['path'].split('/')[-2] for row in rows)
    assert 100 * correct / len(rows) == pytest.approx(eval_acc1, abs=1e-3)
    assert all(float(row['prob_1']) >= float(row['prob_2']) for row in rows)
    assert len({row['class_1'] for row in rows}) > 1  # not a constant answer: the comparison means something


def test_a_trained_checkpoint_records_its_classes_and_model_which_predict_reads(teacher_checkpoint, imagefolder,
                                                                                tmp_path):
    assert weights.load_checkpoint(str(teacher_checkpoint))['classes'] == ['class_0', 'class_1', 'class_2']
    code, _, err = run_predict('--resume', teacher_checkpoint, str(imagefolder / 'val' / 'class_1' / '*.jpg'),
                               '--output', tmp_path / 'p.csv', '--device', 'cpu', '--num_workers', 0)
    rows = read_rows(tmp_path / 'p.csv')
    assert code == 0 and len(rows) == 8 and {row['class_1'] for row in rows} <= {'class_0', 'class_1', 'class_2'}


def test_unreadable_files_are_skipped_with_one_line_each_and_the_rest_predicted(tmp_path):
    folder = tmp_path / 'photos'
    folder.mkdir()
    make_image(0, random.Random(0), (64, 48)).save(folder / 'good.jpg')
    (folder / 'corrupt.jpg').write_bytes((folder / 'good.jpg').read_bytes()[:200] + b'\x00' * 300)
    (folder / 'notes.txt').write_text('not an image')
    make_image(1, random.Random(1), (1, 1)).save(folder / 'tiny.png')
    ckpt = random_vit_checkpoint(tmp_path / 'vit.pth', ['a', 'b', 'c'])
    code, out, err = run_predict('--resume', ckpt, folder, '--output', tmp_path / 'p.csv', '--device', 'cpu',
                                 '--num_workers', 0)
    assert code == 0 and 'Traceback' not in err
    skipped = err.splitlines()
    assert len(skipped) == 2 and all(line.startswith('skipped ') for line in skipped), err
    assert {line.split()[1] for line in skipped} == {str(folder / 'corrupt.jpg'), str(folder / 'notes.txt')}
    assert [row['path'] for row in read_rows(tmp_path / 'p.csv')] == [str(folder / 'good.jpg'), str(folder / 'tiny.png')]
    assert '2 unreadable files skipped' in out


def test_a_path_that_names_nothing_is_one_clear_line(tmp_path):
    code, _, err = run_predict('--resume', tmp_path / 'none.pth', tmp_path / 'missing*.jpg')
    assert code == 2 and err.startswith('error: ') and 'no such file' in err and len(err.splitlines()) == 1


SYNSETS = {'n01440764': 'tench', 'n01443537': 'goldfish', 'n01484850': 'great white shark'}


def test_an_imagenet_run_records_synset_ids_and_their_names_which_predict_writes(tmp_path):
    data = make_imagefolder(tmp_path / 'data', num_classes=3, train_per_class=4, val_per_class=2)
    for label, synset in enumerate(SYNSETS):
        for split in ('train', 'val'):
            (data / split / f'class_{label}').rename(data / split / synset)
    run_cli('--data-path', data, '--model', 'test_vit', *FAST, '--epochs', 1, '--no-model-ema',
            '--output_dir', tmp_path / 'run')
    checkpoint = weights.load_checkpoint(str(tmp_path / 'run' / 'checkpoint.pth'))
    assert checkpoint['classes'] == list(SYNSETS)
    assert [d.split(',')[0] for d in checkpoint['class_descriptions']] == list(SYNSETS.values())
    code, _, err = run_predict('--resume', tmp_path / 'run' / 'checkpoint.pth', data / 'val', '--topk', 3,
                               '--output', tmp_path / 'p.csv', '--device', 'cpu', '--num_workers', 0)
    assert code == 0, err
    written = {row[f'class_{k}'].split(',')[0] for row in read_rows(tmp_path / 'p.csv') for k in (1, 2, 3)}
    assert written == set(SYNSETS.values())


@pytest.mark.parametrize('num_classes', [1000, 3])
def test_an_original_checkpoint_without_classes_predicts_imagenet_names_or_class_indices(tmp_path, num_classes):
    torch.save({'model': timm.create_model('test_vit', num_classes=num_classes).state_dict()}, tmp_path / 'orig.pth')
    make_image(0, random.Random(0), (64, 48)).save(tmp_path / 'a.jpg')
    code, _, err = run_predict('--resume', tmp_path / 'orig.pth', '--model', 'test_vit', tmp_path / 'a.jpg',
                               '--topk', 3, '--output', tmp_path / 'p.csv', '--device', 'cpu', '--num_workers', 0)
    assert code == 0, err
    row = read_rows(tmp_path / 'p.csv')[0]
    names = [row[f'class_{k}'] for k in (1, 2, 3)]
    if num_classes == 3:
        assert sorted(names) == ['0', '1', '2']
    else:
        from timm.data import ImageNetInfo
        assert set(names) <= set(ImageNetInfo('imagenet-1k').label_descriptions())



def test_the_defaults_warn_of_no_missing_gpu_and_start_no_more_workers_than_cores(capsys):
    args = predict.get_args_parser().parse_args(['--resume', 'run.pth', 'photos/'])
    assert 0 < args.num_workers <= len(os.sched_getaffinity(0))
    if not torch.cuda.is_available():  # a device not asked for falls back to the CPU silently, as main.py's
        assert utils.resolve_device(args.device) == torch.device('cpu') and capsys.readouterr().out == ''
