import pytest
import timm
import torch

import main
import models  # noqa: F401
from weights import interpolate_pos_embed

OFFICIAL_KEYS = {'cls_token', 'dist_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias',
                 'blocks.0.attn.qkv.weight', 'blocks.11.mlp.fc2.bias', 'norm.weight', 'norm.bias',
                 'head.weight', 'head.bias', 'head_dist.weight', 'head_dist.bias'}


def args_for(model, distillation='none', input_size=224):
    return main.get_args_parser().parse_args(['--model', model, '--input-size', str(input_size),
                                              '--distillation-type', distillation, '--drop-path', '0.1'])


@pytest.mark.parametrize('name', ['deit_tiny_patch4_32', 'deit_tiny_distilled_patch4_32'])
def test_small_variants_are_in_timms_registry(name):
    assert name in timm.list_models('deit_tiny*')
    model = timm.create_model(name, num_classes=7)  # pitfall: create_model passes pretrained_cfg etc.
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_distilled_model_returns_both_heads_in_training_and_their_mean_in_eval():
    model = main.build_model(args_for('deit_tiny_distilled_patch4_32', 'hard', 32), nb_classes=5)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    cls, dist = model(x)
    assert cls.shape == dist.shape == (2, 5)
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        expected = (model.head(feats[:, 0]) + model.head_dist(feats[:, 1])) / 2
        assert torch.allclose(model(x), expected, atol=1e-6)


def test_distillation_with_a_single_head_model_names_the_distilled_variant():
    with pytest.raises(main.UserError, match='distilled'):
        main.check_distillation_head('deit_tiny_patch4_32')
    main.check_distillation_head('deit_base_distilled_patch16_384')  # built on meta: instant
    main.check_distillation_head('deit_tiny_patch4_32', through_token=False)  # classic distillation
    with pytest.raises(main.UserError, match='plain variant'):
        main.check_distillation_head('deit_tiny_distilled_patch4_32', through_token=False)


def test_our_distilled_deit_state_dict_roundtrips_with_timm_strictly():
    ours = main.build_model(args_for('deit_tiny_distilled_patch16_224', 'hard'), nb_classes=1000)
    state = ours.state_dict()
    assert OFFICIAL_KEYS <= set(state)
    theirs = timm.create_model('deit_tiny_distilled_patch16_224', pretrained=False)
    theirs.load_state_dict(state, strict=True)
    back = main.build_model(args_for('deit_tiny_distilled_patch16_224', 'hard'), nb_classes=1000)
    back.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_model_is_built_for_input_size_and_a_convnet_ignores_it():
    vit = main.build_model(args_for('deit_tiny_patch16_224', input_size=96), nb_classes=10)
    assert vit.pos_embed.shape[1] == 1 + 6 * 6
    cnn = main.build_model(args_for('regnety_002', input_size=48), nb_classes=10)
    assert cnn(torch.randn(1, 3, 48, 48)).shape == (1, 10)


def test_pos_embed_interpolation_shape_and_extra_tokens_untouched():
    src = timm.create_model('deit_tiny_distilled_patch4_32', img_size=32, num_classes=3)
    dst = timm.create_model('deit_tiny_distilled_patch4_32', img_size=48, num_classes=3)
    state = {k: v.clone() for k, v in src.state_dict().items()}
    interpolate_pos_embed(state, dst)
    assert state['pos_embed'].shape == dst.pos_embed.shape == (1, 2 + 12 * 12, 192)
    assert torch.equal(state['pos_embed'][:, :2], src.pos_embed[:, :2])
    # grid corners of a bicubic resize (align_corners=False) stay close to the source corners, not equal
    assert not torch.equal(state['pos_embed'][:, 2:66], src.pos_embed[:, 2:66])
    dst.load_state_dict(state, strict=True)


def test_pos_embed_interpolation_is_identity_at_equal_size():
    model = timm.create_model('deit_tiny_patch4_32', num_classes=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    interpolate_pos_embed(state, model)
    assert torch.equal(state['pos_embed'], model.pos_embed)


def test_pos_embed_interpolation_224_to_384():
    src = timm.create_model('deit_tiny_distilled_patch16_224')  # DeiT-B's 14x14 -> 24x24 grid, at the tiny width
    dst = timm.create_model('deit_tiny_distilled_patch16_224', img_size=384)
    state = src.state_dict()
    interpolate_pos_embed(state, dst)
    assert state['pos_embed'].shape == (1, 2 + 24 * 24, 192)
    dst.load_state_dict(state, strict=True)


def test_progress_is_a_live_line_on_a_terminal_and_plain_lines_in_logs(monkeypatch, capsys):
    import sys
    from utils import MetricLogger
    batches = [(torch.zeros(4, 1), torch.zeros(4))] * 25
    for tty in (False, True):
        monkeypatch.setattr(sys.stdout, 'isatty', lambda: tty)
        logger = MetricLogger()
        for _ in logger.log_every(batches, print_freq=10, header='Epoch: [0]'):
            logger.update(loss=1.0)
        out = capsys.readouterr().out
        if tty:
            assert '\r' in out and out.count('\n') == 2  # one live line, then the total
        else:
            assert '\r' not in out and out.count('\n') == 4 + 1  # steps 0, 10, 20, 24, then the total
            assert 'eta:' in out and 'img/s' in out and 'loss: 1' in out
