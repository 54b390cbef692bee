"""The lightweight students: ConViT (plain and distilled), MobileViT, Mobile-Former, small DeiT."""
import json

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import models  # noqa: F401  (registers the students)
from conftest import FAST, run_cli
from models.mobile_former import CONFIGS

STUDENTS = ['convit_tiny', 'convit_tiny_distilled', 'mobilevit_xxs', 'mobile_former_52m', 'mobile_former_151m',
            'mobile_former_294m', 'deit_tiny_distilled_patch4_32']
# (name, img_size): ConViT at 48 px keeps this test cheap, the heads are the same at any size
DISTILLED = [('convit_tiny_distilled', 48), ('deit_tiny_distilled_patch4_32', 32)]


def native_input(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *model.pretrained_cfg['input_size'])


@pytest.mark.parametrize('name', STUDENTS)
def test_student_trains_at_its_native_input_size(name):
    model = timm.create_model(name, num_classes=5, drop_path_rate=0.1).train()
    logits = model(native_input(model))
    assert logits.shape == (2, 5)
    logits.logsumexp(dim=1).sum().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, unused


@pytest.mark.parametrize('name,img_size', DISTILLED)
def test_distilled_student_returns_both_heads_in_training_and_their_mean_in_eval(name, img_size):
    model = timm.create_model(name, num_classes=5, img_size=img_size)
    model.set_distilled_training(True)
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():  # no dropout or drop path: training and eval compute the same two heads
        cls, dist = model.train()(x)
        averaged = model.eval()(x)
    assert cls.shape == dist.shape == (2, 5) and not torch.allclose(cls, dist)
    assert torch.allclose(averaged, (cls + dist) / 2, atol=1e-6)


def test_distilled_convit_resets_both_heads_and_keeps_its_tokens_out_of_weight_decay():
    model = timm.create_model('convit_tiny_distilled', img_size=48)
    assert {'cls_token', 'dist_token', 'pos_embed'} <= model.no_weight_decay()
    model.reset_classifier(7)
    assert [head.out_features for head in model.get_classifier()] == [7, 7]
    model.set_distilled_training(True)
    cls, dist = model(torch.randn(2, 3, 48, 48))
    assert cls.shape == dist.shape == (2, 7)


@pytest.mark.parametrize('name', list(CONFIGS))
def test_mobile_former_params_and_madds_are_within_10_percent_of_the_paper(name):
    model = timm.create_model(name).eval()
    params = sum(p.numel() for p in model.parameters())
    # no torch.no_grad(): FlopCounterMode's module tracker fails on views of parameters made under it
    with FlopCounterMode(display=False) as counter:
        model(native_input(model, batch=1))
    madds = counter.get_total_flops() / 2  # the counter counts a multiply-add as 2 FLOPs
    paper = CONFIGS[name]
    assert params == pytest.approx(paper.paper_params, rel=0.1)
    assert madds == pytest.approx(paper.paper_madds, rel=0.1)


def test_mobile_former_refuses_img_size_so_that_main_falls_back():
    with pytest.raises(TypeError, match='img_size'):
        timm.create_model('mobile_former_52m', img_size=224)


def test_main_trains_a_distilled_convit_with_a_teacher_at_the_runs_input_size(imagefolder, teacher_checkpoint,
                                                                                tmp_path):
    # timm's ConViT takes img_size, so main.py builds it for 32 px: 2x2 patches of 16, seconds on a CPU
    run_cli('--data-path', imagefolder, '--model', 'convit_tiny_distilled', '--epochs', '1',
            '--distillation-type', 'hard', '--teacher-model', 'regnety_002', '--teacher-path', teacher_checkpoint,
            '--no-model-ema', '--output_dir', tmp_path, *FAST)
    log = [json.loads(line) for line in (tmp_path / 'log.txt').read_text().splitlines()]
    assert len(log) == 1 and log[0]['train_loss'] > 0
    state = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)['model']
    assert state['dist_token'].shape == (1, 1, 192) and state['head_dist.weight'].shape == (3, 192)
    assert state['pos_embed'].shape == (1, 4, 192)  # built for --input-size 32
