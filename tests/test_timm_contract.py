"""Every model of models/ honours timm's model interface, checked the way timm checks its own models.

The checks are adapted from timm's tests/test_models.py (huggingface/pytorch-image-models,
Apache-2.0): test_model_backward, test_model_default_cfgs(_non_std), test_model_forward_features,
test_model_forward_intermediates, test_model_forward_torchscript and test_model_forward_fx. They run
on one small variant per model family, at a tiny input size where the model allows it.
"""
import math
import re

import pytest
import timm
import timm.optim
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from timm.models._registry import _model_entrypoints
from torchvision.models.feature_extraction import NodePathTracer

import models  # noqa: F401  (registers our models)

# name -> (keyword arguments, input size): one of each model class and block type of models/
FAMILIES = {
    'mobile_former_52m': ({}, 64),
    'regnety_tiny_os8': ({}, 16),
    'deit_micro_patch4_16': ({}, 16),
    'deit_micro_distilled_patch4_16': ({}, 16),
    'convit_tiny_distilled': ({'img_size': 48}, 48),
    'deit_tiny_patch16_LS': ({'img_size': 32, 'depth': 3}, 32),
    'deit_small_patch16_18x2': ({'img_size': 32, 'depth': 3}, 32),  # parallel blocks, no LayerScale
}


def create(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **dict(FAMILIES[name][0], **kwargs))


def images(name: str, batch: int = 2) -> torch.Tensor:
    size = FAMILIES[name][1]
    return torch.randn(batch, 3, size, size)


def channels_axis(features: torch.Tensor) -> int:
    return 1 if features.ndim == 4 else -1  # convnets give NCHW, transformers (B, tokens, C)


def test_every_module_of_models_has_a_family_checked_here():
    ours = {fn.__module__ for fn in _model_entrypoints.values() if fn.__module__.startswith('models.')}
    checked = {_model_entrypoints[name].__module__ for name in FAMILIES}
    assert ours == checked


@pytest.mark.parametrize('name', FAMILIES)
def test_backward_reaches_every_parameter_with_the_requested_classes(name):
    model = create(name, num_classes=42).train()
    outputs = model(images(name))
    outputs = torch.cat(outputs) if isinstance(outputs, tuple) else outputs
    outputs.mean().backward()
    assert outputs.shape[-1] == 42 and not torch.isnan(outputs).any()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize('name', [name for name in FAMILIES if name != 'convit_tiny_distilled'])  # ConViT refuses
def test_grad_checkpointing_keeps_outputs_and_gradients(name):
    model, x = create(name).train(), images(name)
    reference = model(x)
    reference.sum().backward()
    gradients = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing()
    outputs = model(x)
    outputs.sum().backward()
    assert torch.allclose(outputs, reference, atol=1e-6)
    assert all(torch.allclose(p.grad, gradients[n], atol=1e-5) for n, p in model.named_parameters())


@pytest.mark.parametrize('name', FAMILIES)
def test_forward_is_forward_head_of_unpooled_forward_features(name):
    model = create(name).eval()
    cfg, state = model.pretrained_cfg, model.state_dict()
    classifiers = cfg['classifier'] if isinstance(cfg['classifier'], tuple) else (cfg['classifier'],)
    assert all(f'{layer}.weight' in state for layer in (*classifiers, cfg['first_conv']))
    x = images(name)
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert torch.equal(model.forward_head(features), model(x))
        assert features.shape[channels_axis(features)] == model.num_features
        assert pre_logits.shape == (2, model.head_hidden_size)
        if features.ndim == 4:  # unpooled: the feature map of the input, at the configured size too
            stride = cfg['input_size'][-1] // cfg['pool_size'][-1]
            assert features.shape[-2:] == (x.shape[-2] // stride, x.shape[-1] // stride)
            assert model.forward_features(torch.randn(1, *cfg['input_size'])).shape[-2:] == cfg['pool_size']
        model.reset_classifier(0)
        assert model.num_classes == 0 and torch.allclose(model(x), pre_logits, atol=1e-6)
        if features.ndim == 4:  # without pooling, a map of the same size (the head may run at every position)
            model.reset_classifier(0, '')
            unpooled = create(name, num_classes=0, global_pool='').eval()
            for out in model(x), unpooled(x):
                assert out.ndim == 4 and out.shape[-2:] == features.shape[-2:]


@pytest.mark.parametrize('name', FAMILIES)
def test_reset_classifier_replaces_every_head_of_a_model_created_with_other_classes(name):
    model = create(name, num_classes=5)
    model.reset_classifier(7)
    heads = model.get_classifier()
    assert [head.out_features for head in (heads if isinstance(heads, tuple) else (heads,))] in ([7], [7, 7])
    assert model.num_classes == 7 and model.eval()(images(name)).shape == (2, 7)


@pytest.mark.parametrize('name', FAMILIES)
def test_layer_decay_gives_each_block_one_learning_rate_rising_from_first_conv_to_classifier(name):
    model = create(name)
    groups = timm.optim.create_optimizer_v2(model, 'sgd', lr=1., layer_decay=0.5).param_groups
    scale = {id(p): group['lr_scale'] for group in groups for p in group['params']}
    params = dict(model.named_parameters())
    blocks = dict.fromkeys(m.group(0) for m in map(re.compile(r'blocks\.\d+\.|s\d\.b\d+\.').match, params) if m)
    block_scales = [{scale[id(p)] for n, p in params.items() if n.startswith(block)} for block in blocks]
    assert all(len(scales) == 1 for scales in block_scales)  # a block is one group
    rates = [min(scales) for scales in block_scales]
    assert len(rates) > 2 and rates == sorted(set(rates))  # deeper blocks learn faster, each at its own rate
    assert scale[id(params[model.pretrained_cfg['first_conv'] + '.weight'])] == min(scale.values())
    classifier = model.get_classifier()
    assert scale[id((classifier[0] if isinstance(classifier, tuple) else classifier).weight)] == 1.


@pytest.mark.parametrize('name', FAMILIES)
def test_features_only_gives_the_feature_info_levels_and_forward_intermediates_agrees(name):
    x = images(name, batch=1)
    extractor = create(name, features_only=True).eval()
    with torch.no_grad():
        feature_maps = extractor(x)
    info = extractor.feature_info
    assert len(feature_maps) == len(info.channels()) >= 3
    for fmap, chs, reduction in zip(feature_maps, info.channels(), info.reduction()):
        assert fmap.shape[:2] == (1, chs)
        assert all(size <= math.ceil(x.shape[-1] / reduction) + 1 for size in fmap.shape[-2:])
    model = create(name).eval()
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        assert torch.allclose(final, model.forward_features(x), atol=1e-6)
        last_two = model.forward_intermediates(x, indices=2, stop_early=True, intermediates_only=True)
    assert [tuple(t.shape[:2]) for t in intermediates] == [(1, info['num_chs']) for info in model.feature_info]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(last_two, intermediates[-2:]))


@pytest.mark.parametrize('name', FAMILIES)
def test_torchscript_forward_matches_eager(name):
    with timm.set_scriptable(True):
        model = create(name).eval()
    x = images(name, batch=1)
    with torch.no_grad():
        assert torch.allclose(torch.jit.script(model)(x), model(x), atol=1e-5)


@pytest.mark.parametrize('name', FAMILIES)
def test_fx_traced_forward_matches_eager(name):
    model = create(name).eval()
    # timm's _create_fx_model's tracer (through all but timm's declared leaf modules and functions), once
    tracer = NodePathTracer(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                            param_shapes_constant=True)
    traced = torch.fx.GraphModule(model, tracer.trace(model))
    x = images(name, batch=1)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))
