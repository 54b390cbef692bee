"""Small-input DeiT variants for fast CPU work (timm has only the 224/384 px family).

They are timm's ``VisionTransformer`` / ``VisionTransformerDistilled`` with a smaller patch, so
their checkpoints use the official DeiT key names (``cls_token``, ``dist_token``, ``head_dist`` ...).
"""
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer


def _cfg(input_size: int, **kwargs) -> dict:
    return {
        'url': '', 'num_classes': 10, 'input_size': (3, input_size, input_size), 'pool_size': None,
        'crop_pct': 1.0, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head', **kwargs,
    }


# timm's register_model reads this module-level table for each entrypoint's pretrained config.
default_cfgs = generate_default_cfgs({
    'deit_tiny_patch4_32': _cfg(32),
    'deit_tiny_distilled_patch4_32': _cfg(32, classifier=('head', 'head_dist')),
    'deit_micro_patch4_16': _cfg(16),
    'deit_micro_distilled_patch4_16': _cfg(16, classifier=('head', 'head_dist')),
    'deit_micro_patch8_16': _cfg(16),
    'deit_micro_distilled_patch8_16': _cfg(16, classifier=('head', 'head_dist')),
})


def _create(variant: str, distilled: bool, pretrained: bool, **kwargs):
    # build_model_with_cfg consumes the pretrained_cfg/cache_dir kwargs that create_model passes;
    # features_only reads forward_intermediates ('getter'), the last 3 blocks by default, as timm's deit_*.
    model_cls = VisionTransformerDistilled if distilled else VisionTransformer
    feature_cfg = dict(out_indices=kwargs.pop('out_indices', 3), feature_cls='getter')
    return build_model_with_cfg(model_cls, variant, pretrained, feature_cfg=feature_cfg, **kwargs)


_TINY_PATCH4 = dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3)
# Half of DeiT-Ti's depth: an epoch costs half as much on a CPU, so that the DIGITS quickstart's
# students get 30 epochs within its time budget.
_MICRO_PATCH4 = dict(img_size=16, patch_size=4, embed_dim=192, depth=6, num_heads=3)
# The same with 8x8 patches: 4 tokens, each a quarter of the image, so less of the locality
# a convnet has is built in (the paper's case for a convnet teacher).
_MICRO_PATCH8 = dict(_MICRO_PATCH4, patch_size=8)


@register_model
def deit_tiny_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DeiT-Ti with 4x4 patches for 32x32 inputs (CIFAR-sized): 64 patches + class token."""
    return _create('deit_tiny_patch4_32', False, pretrained, **dict(_TINY_PATCH4, **kwargs))


@register_model
def deit_tiny_distilled_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformerDistilled:
    """Distilled DeiT-Ti with 4x4 patches for 32x32 inputs: class + distillation tokens."""
    return _create('deit_tiny_distilled_patch4_32', True, pretrained, **dict(_TINY_PATCH4, **kwargs))


@register_model
def deit_micro_patch4_16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DeiT-Ti with 6 blocks and 4x4 patches for 16x16 inputs: 16 patches + class token."""
    return _create('deit_micro_patch4_16', False, pretrained, **dict(_MICRO_PATCH4, **kwargs))


@register_model
def deit_micro_distilled_patch4_16(pretrained: bool = False, **kwargs) -> VisionTransformerDistilled:
    """Distilled DeiT-Ti with 6 blocks and 4x4 patches for 16x16 inputs: class + distillation tokens."""
    return _create('deit_micro_distilled_patch4_16', True, pretrained, **dict(_MICRO_PATCH4, **kwargs))


@register_model
def deit_micro_patch8_16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DeiT-Ti with 6 blocks and 8x8 patches for 16x16 inputs: 4 patches + class token."""
    return _create('deit_micro_patch8_16', False, pretrained, **dict(_MICRO_PATCH8, **kwargs))


@register_model
def deit_micro_distilled_patch8_16(pretrained: bool = False, **kwargs) -> VisionTransformerDistilled:
    """Distilled DeiT-Ti with 6 blocks and 8x8 patches for 16x16 inputs: class + distillation tokens."""
    return _create('deit_micro_distilled_patch8_16', True, pretrained, **dict(_MICRO_PATCH8, **kwargs))
