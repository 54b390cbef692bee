"""ONNX export: onnxruntime computes what the PyTorch model does (deit_tiny, a distilled DeiT, a ConViT, at
32 px and 2 blocks to keep the export fast), on a batch size other than the export's; a graph that
differs is not written."""
import io
import random
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import onnxruntime
import pytest
import timm
import torch
from imagefolder import make_image

import export
import inference
import onnx_export
from engine import head_logits
from utils import UserError


@pytest.mark.parametrize('name, kwargs', [
    ('deit_tiny_patch16_224', {}),
    ('convit_tiny', {'local_up_to_layer': 1}),
])
def test_onnx_graph_matches_the_model_on_a_dynamic_batch(tmp_path, name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=32, num_classes=5, depth=2, **kwargs).eval()
    difference = onnx_export.export_onnx(model, str(tmp_path / 'm.onnx'), 32, [torch.randn(4, 3, 32, 32)])
    assert difference <= onnx_export.TOLERANCE
    images = torch.randn(7, 3, 32, 32)
    got = onnxruntime.InferenceSession(str(tmp_path / 'm.onnx')).run(['logits'], {'images': images.numpy()})[0]
    with torch.inference_mode():
        assert np.abs(got - model(images).numpy()).max() <= onnx_export.TOLERANCE


def test_a_distilled_checkpoint_exports_its_averaged_heads_checked_on_real_images(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = timm.create_model('deit_tiny_distilled_patch16_224', img_size=32, num_classes=3, depth=2).eval()
    with torch.no_grad():  # heads far apart: the average is not either head
        model.head_dist.bias.add_(torch.tensor([3.0, 0.0, -3.0]))
    torch.save({'model': model.state_dict(), 'args': {'model': 'deit_tiny_distilled_patch16_224', 'input_size': 32}},
               tmp_path / 'distilled.pth')
    # the checkpoint names deit_tiny (12 blocks): export.py builds it with the test's 2 blocks
    original = inference.create_model
    monkeypatch.setattr(inference, 'create_model', lambda name, n, size, **kw: original(name, n, size, depth=2, **kw))
    images = tmp_path / 'images'
    images.mkdir()
    for i in range(3):
        make_image(i, random.Random(i), (40, 36)).save(images / f'{i}.jpg')
    (images / 'broken.jpg').write_text('not an image')
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        code = export.cli([str(tmp_path / 'distilled.pth'), '--onnx', str(tmp_path / 'd.onnx'),
                           '--check-images', str(images)])
    assert code == 0, out.getvalue()
    assert 'on 3 random and 3 real images: max abs difference' in out.getvalue()
    x = torch.randn(2, 3, 32, 32)
    got = onnxruntime.InferenceSession(str(tmp_path / 'd.onnx')).run(['logits'], {'images': x.numpy()})[0]
    with torch.inference_mode():
        heads = head_logits(model, x)
    assert np.abs(got - heads['both'].numpy()).max() <= onnx_export.TOLERANCE
    assert np.abs(got - heads['cls'].numpy()).max() > 1


def test_a_graph_that_differs_from_the_model_fails_with_the_difference_and_writes_nothing(tmp_path, monkeypatch):
    model = timm.create_model('test_vit', img_size=32, num_classes=3, depth=1).eval()
    write = onnx_export.write_onnx

    def write_then_change_the_model(m, path, size, opset):
        write(m, path, size, opset)
        with torch.no_grad():
            m.head.bias.add_(0.5)

    monkeypatch.setattr(onnx_export, 'write_onnx', write_then_change_the_model)
    with pytest.raises(UserError, match=r'differs from the PyTorch model by 0\.5'):
        onnx_export.export_onnx(model, str(tmp_path / 'm.onnx'), 32, [])
    assert list(tmp_path.iterdir()) == []
