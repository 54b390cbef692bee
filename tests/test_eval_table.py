"""tools.eval_table: the paper's row on generated sets whose answers are known (a model that predicts one
class for every image, as in test_eval_sets), and the throughput's batch search."""
import io
import json
from contextlib import redirect_stdout

import pytest
import timm
import torch
from conftest import FAST
from imagefolder import make_imagenet_as_downloaded
from test_eval_sets import constant_checkpoint, make_v2_folder

from tools import eval_table


def table(*argv) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        code = eval_table.cli(list(map(str, argv)))
    assert code == 0, out.getvalue()[-3000:]
    return out.getvalue()


def test_the_row_holds_params_image_size_throughput_and_the_top1_of_imagenet_real_and_v2(tmp_path):
    truth = make_imagenet_as_downloaded(tmp_path / 'imagenet', 'meta.bin', num_classes=3, val_per_class=3)
    ckpt = constant_checkpoint(tmp_path / 'two.pth', 3, predicted=2)
    # class 2 for each image: ReaL 3 of the 6 labelled images; V2 1 of 4 (folder 2 holds one image)
    (tmp_path / 'real.json').write_text(json.dumps([[2], [0, 2], [0], [], [1], [2, 1], [], [0, 1], []]))
    v2 = make_v2_folder(tmp_path / 'v2', [2, 1, 1])
    out = table('--model', 'test_vit', '--resume', ckpt, '--imagenet', tmp_path / 'imagenet', '--real-labels',
                tmp_path / 'real.json', '--imagenet-v2', v2, '--markdown', '--throughput-batch', 4, '--passes', 2,
                *FAST)
    lines = out.splitlines()
    header = lines.index('| network | params | image size | throughput (im/s) | ImNet top-1 | ReaL top-1 | V2 top-1 |')
    cells = [cell.strip() for cell in lines[header + 2].strip('|').split('|')]
    params = sum(p.numel() for p in timm.create_model('test_vit', num_classes=3, img_size=32).parameters())
    imnet = 100 * sum(1 for wnid in truth.values() if wnid == 'n01440766') / 9
    assert cells[:3] == ['test_vit', f'{params / 1e6:.1f}M', '32']
    assert float(cells[3]) > 0
    assert cells[4:] == [f'{imnet:.1f}', '50.0', '25.0']
    assert 'throughput: inference in fp32 on CPU, torch threads: ' in out and 'batch 4 (--throughput-batch), median of 2 passes' in out
    assert 'note:' not in out


def test_a_set_not_given_is_left_out_of_the_row_with_a_note(tmp_path):
    ckpt = constant_checkpoint(tmp_path / 'two.pth', 3, predicted=2)
    out = table('--model', 'test_vit', '--resume', ckpt, '--imagenet-v2', make_v2_folder(tmp_path / 'v2', [1, 1, 2]),
                '--throughput-batch', 2, '--passes', 1, *FAST)
    header, row = out.split('\n\n')[0].splitlines()[-2:]
    assert header.split() == ['network', 'params', 'image', 'size', 'throughput', '(im/s)', 'V2', 'top-1']
    assert row.split()[-1] == '50.0'
    assert 'note: no --imagenet: ImNet and ReaL top-1 left out' in out


def test_gpu_throughput_takes_the_largest_power_of_two_batch_that_fits(monkeypatch):
    tried = []

    def passes_fitting_up_to_300(model, batch, input_size, device, amp_dtype, passes):
        tried.append(batch)
        if batch > 300:
            raise torch.cuda.OutOfMemoryError('CUDA out of memory')
        return [2.0, 1.0, 9.0][:passes]

    monkeypatch.setattr(eval_table, 'timed_passes', passes_fitting_up_to_300)
    images_per_s, batch = eval_table.throughput(None, 224, torch.device('cuda'), None, cpu_batch=64, passes=3)
    assert tried == [4096, 2048, 1024, 512, 256] and batch == 256
    assert images_per_s == pytest.approx(256 / 2.0)  # the median pass
