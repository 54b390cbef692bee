"""DeiT III ("Revenge of the ViT") and the "Three things" ViTs under the names of the original's models_v2.py.

timm's ``VisionTransformer`` with LayerScale (as timm's ``deit3_*``) and, for the ``..x2`` models,
timm's ``ParallelThingsBlock`` (as timm's ``vit_*_18x2_224``), with the original's hyper-parameters:
position embedding on the patches only (timm's ``no_embed_class``), qkv bias, LayerNorm eps 1e-6,
LayerScale initialised at 1e-4 in the ``_LS`` models (none in the others), and the same drop-path
rate in every block. Checkpoints written by the original (``gamma_1``, ``attn1``, ``norm11`` ...)
load through ``utils.load_state_checked``, which renames their keys (``utils.timm_key_names``).
"""
from functools import partial

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, ParallelThingsBlock, VisionTransformer, checkpoint_filter_fn

_WEIGHTS = 'https://dl.fbaipublicfiles.com/deit/'


def _cfg(url: str = '', **kwargs) -> dict:
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head', **kwargs,
    }


# timm's register_model reads this module-level table for each entrypoint's pretrained config. The
# URLs are the original's ImageNet-1k weights at 224 px (its pretrained=True default).
default_cfgs = generate_default_cfgs({
    'deit_tiny_patch16_LS': _cfg(),
    'deit_small_patch16_LS': _cfg(_WEIGHTS + 'deit_3_small_224_1k.pth'),
    'deit_medium_patch16_LS': _cfg(_WEIGHTS + 'deit_3_medium_224_1k.pth'),
    'deit_base_patch16_LS': _cfg(_WEIGHTS + 'deit_3_base_224_1k.pth'),
    'deit_large_patch16_LS': _cfg(_WEIGHTS + 'deit_3_large_224_1k.pth'),
    'deit_huge_patch14_LS': _cfg(_WEIGHTS + 'deit_3_huge_224_1k_v1.pth'),
    'deit_huge_patch14_52_LS': _cfg(),
    'deit_huge_patch14_26x2_LS': _cfg(),
    'deit_Giant_48x2_patch14_LS': _cfg(),
    'deit_giant_40x2_patch14_LS': _cfg(),
    'deit_Giant_48_patch14_LS': _cfg(),
    'deit_giant_40_patch14_LS': _cfg(),
    'deit_small_patch16_36_LS': _cfg(),
    'deit_small_patch16_36': _cfg(),
    'deit_small_patch16_18x2_LS': _cfg(),
    'deit_small_patch16_18x2': _cfg(),
    'deit_base_patch16_18x2_LS': _cfg(),
    'deit_base_patch16_18x2': _cfg(),
    'deit_base_patch16_36x1_LS': _cfg(),
    'deit_base_patch16_36x1': _cfg(),
})

LAYER_SCALE_INIT = 1e-4  # the original's init_scale default; timm's deit3_* use 1e-6


def _same_drop_path_in_every_block(model: VisionTransformer, rate: float) -> None:
    """The original drops paths at the full rate in every block; timm ramps the rate up from 0 with depth
    and has no option for a constant rate, hence this replacement after construction."""
    for block in model.blocks:
        for parent in list(block.modules()):
            for name, _ in list(parent.named_children()):
                if name.startswith('drop_path'):
                    setattr(parent, name, DropPath(rate) if rate > 0 else torch.nn.Identity())


def _create(variant: str, pretrained: bool, kwargs: dict, *, patch_size: int, embed_dim: int, depth: int,
            num_heads: int, layer_scale: bool, parallel: bool = False) -> VisionTransformer:
    # build_model_with_cfg consumes the pretrained_cfg/cache_dir kwargs that create_model passes.
    # As timm's entrypoints do, keyword arguments override the architecture (e.g. depth=2 for a test).
    model_args = dict(
        patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4.0,
        qkv_bias=True, no_embed_class=True, init_values=LAYER_SCALE_INIT if layer_scale else None,
        block_fn=ParallelThingsBlock if parallel else Block)
    model_args.update(kwargs)
    drop_path_rate = model_args.pop('drop_path_rate', 0.0)
    model = build_model_with_cfg(
        VisionTransformer, variant, pretrained,
        pretrained_filter_fn=partial(checkpoint_filter_fn, adapt_layer_scale=True),  # timm's, for DeiT III
        **model_args)
    _same_drop_path_in_every_block(model, drop_path_rate)
    return model


# DeiT III: Revenge of the ViT (https://arxiv.org/abs/2204.07118)

@register_model
def deit_tiny_patch16_LS(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DeiT III ViT-Ti/16: 12 blocks of width 192, 3 heads, LayerScale."""
    return _create('deit_tiny_patch16_LS', pretrained, kwargs, patch_size=16, embed_dim=192, depth=12,
                   num_heads=3, layer_scale=True)


@register_model
def deit_small_patch16_LS(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DeiT III ViT-S/16: 12 blocks of width 384, 6 heads, LayerScale."""
    return _create('deit_small_patch16_LS', pretrained, kwargs, patch_size=16, embed_dim=384, depth=12,
                   num_heads=6, layer_scale=True)


@register_model
def deit_medium_patch16_LS(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DeiT III ViT-M/16: 12 blocks of width 512, 8 heads, LayerScale."""
    return _create('deit_medium_patch16_LS', pretrained, kwargs, patch_size=16, embed_dim=512, depth=12,
                   num_heads=8, layer_scale=True)


@register_model
def deit_base_patch16_LS(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DeiT III ViT-B/16: 12 blocks of width 768, 12 heads, LayerScale."""
    return _create('deit_base_patch16_LS', pretrained, kwargs, patch_size=16, embed_dim=768, depth=12,
                   num_heads=12, layer_scale=True)


@register_model
def deit_large_patch16_LS(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DeiT III ViT-L/16: 24 blocks of width 1024, 16 heads, LayerScale."""
    return _create('deit_large_patch16_LS', pretrained, kwargs, patch_size=16, embed_dim=1024, depth=24,
                   num_heads=16, layer_scale=True)


@register_model
def deit_huge_patch14_LS(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DeiT III ViT-H/14: 32 blocks of width 1280, 16 heads, LayerScale."""
    return _create('deit_huge_patch14_LS', pretrained, kwargs, patch_size=14, embed_dim=1280, depth=32,
                   num_heads=16, layer_scale=True)


@register_model
def deit_huge_patch14_52_LS(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-H/14 with 52 blocks of width 1280, 16 heads, LayerScale."""
    return _create('deit_huge_patch14_52_LS', pretrained, kwargs, patch_size=14, embed_dim=1280, depth=52,
                   num_heads=16, layer_scale=True)


@register_model
def deit_huge_patch14_26x2_LS(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-H/14 with 26 blocks of 2 parallel branches, width 1280, 16 heads, LayerScale."""
    return _create('deit_huge_patch14_26x2_LS', pretrained, kwargs, patch_size=14, embed_dim=1280, depth=26,
                   num_heads=16, layer_scale=True, parallel=True)


# The original's two ``..x2`` giant entrypoints name a block class that models_v2.py never defines
# (they fail there); here they are what their names and their ``_26x2_LS`` sibling say: parallel
# blocks with LayerScale.

@register_model
def deit_Giant_48x2_patch14_LS(pretrained: bool = False, **kwargs) -> VisionTransformer:  # noqa: N802
    """ViT-G/14 with 48 blocks of 2 parallel branches, width 1664, 16 heads, LayerScale."""
    return _create('deit_Giant_48x2_patch14_LS', pretrained, kwargs, patch_size=14, embed_dim=1664, depth=48,
                   num_heads=16, layer_scale=True, parallel=True)


@register_model
def deit_giant_40x2_patch14_LS(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-g/14 with 40 blocks of 2 parallel branches, width 1408, 16 heads, LayerScale."""
    return _create('deit_giant_40x2_patch14_LS', pretrained, kwargs, patch_size=14, embed_dim=1408, depth=40,
                   num_heads=16, layer_scale=True, parallel=True)


@register_model
def deit_Giant_48_patch14_LS(pretrained: bool = False, **kwargs) -> VisionTransformer:  # noqa: N802
    """ViT-G/14 with 48 blocks of width 1664, 16 heads, LayerScale."""
    return _create('deit_Giant_48_patch14_LS', pretrained, kwargs, patch_size=14, embed_dim=1664, depth=48,
                   num_heads=16, layer_scale=True)


@register_model
def deit_giant_40_patch14_LS(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-g/14 with 40 blocks of width 1408, 16 heads, LayerScale."""
    return _create('deit_giant_40_patch14_LS', pretrained, kwargs, patch_size=14, embed_dim=1408, depth=40,
                   num_heads=16, layer_scale=True)


# Three things everyone should know about Vision Transformers (https://arxiv.org/abs/2203.09795)

@register_model
def deit_small_patch16_36_LS(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-S/16 with 36 blocks of width 384, 6 heads, LayerScale."""
    return _create('deit_small_patch16_36_LS', pretrained, kwargs, patch_size=16, embed_dim=384, depth=36,
                   num_heads=6, layer_scale=True)


@register_model
def deit_small_patch16_36(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-S/16 with 36 blocks of width 384, 6 heads, no LayerScale."""
    return _create('deit_small_patch16_36', pretrained, kwargs, patch_size=16, embed_dim=384, depth=36,
                   num_heads=6, layer_scale=False)


@register_model
def deit_small_patch16_18x2_LS(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-S/16 with 18 blocks of 2 parallel branches, width 384, 6 heads, LayerScale."""
    return _create('deit_small_patch16_18x2_LS', pretrained, kwargs, patch_size=16, embed_dim=384, depth=18,
                   num_heads=6, layer_scale=True, parallel=True)


@register_model
def deit_small_patch16_18x2(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-S/16 with 18 blocks of 2 parallel branches, width 384, 6 heads, no LayerScale."""
    return _create('deit_small_patch16_18x2', pretrained, kwargs, patch_size=16, embed_dim=384, depth=18,
                   num_heads=6, layer_scale=False, parallel=True)


@register_model
def deit_base_patch16_18x2_LS(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-B/16 with 18 blocks of 2 parallel branches, width 768, 12 heads, LayerScale."""
    return _create('deit_base_patch16_18x2_LS', pretrained, kwargs, patch_size=16, embed_dim=768, depth=18,
                   num_heads=12, layer_scale=True, parallel=True)


@register_model
def deit_base_patch16_18x2(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-B/16 with 18 blocks of 2 parallel branches, width 768, 12 heads, no LayerScale."""
    return _create('deit_base_patch16_18x2', pretrained, kwargs, patch_size=16, embed_dim=768, depth=18,
                   num_heads=12, layer_scale=False, parallel=True)


@register_model
def deit_base_patch16_36x1_LS(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-B/16 with 36 blocks of width 768, 12 heads, LayerScale."""
    return _create('deit_base_patch16_36x1_LS', pretrained, kwargs, patch_size=16, embed_dim=768, depth=36,
                   num_heads=12, layer_scale=True)


@register_model
def deit_base_patch16_36x1(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-B/16 with 36 blocks of width 768, 12 heads, no LayerScale."""
    return _create('deit_base_patch16_36x1', pretrained, kwargs, patch_size=16, embed_dim=768, depth=36,
                   num_heads=12, layer_scale=False)
