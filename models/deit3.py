"""DeiT III ("Revenge of the ViT") and the "Three things" ViTs under the names of the original's models_v2.py.

timm's ``VisionTransformer`` with LayerScale (as timm's ``deit3_*``) and, for the ``..x2`` models,
timm's ``ParallelThingsBlock`` (as timm's ``vit_*_18x2_224``), with the original's hyper-parameters:
position embedding on the patches only (timm's ``no_embed_class``), qkv bias, LayerNorm eps 1e-6,
LayerScale initialised at 1e-4 in the ``_LS`` models (none in the others), and the same drop-path
rate in every block. Checkpoints written by the original (``gamma_1``, ``attn1``, ``norm11`` ...)
load through ``weights.load_state_checked``, which renames their keys (``weights.timm_key_names``).
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


# name -> (patch, width, depth, heads, LayerScale, 2 parallel branches per block), as in models_v2.py:
# DeiT III: Revenge of the ViT (https://arxiv.org/abs/2204.07118), then the models of Three things
# everyone should know about Vision Transformers (https://arxiv.org/abs/2203.09795). The original's
# two ``..x2`` giants name a block class that models_v2.py never defines (they fail there); here they
# are what their names and their ``_26x2_LS`` sibling say: parallel blocks with LayerScale.
ARCHITECTURES = {
    'deit_tiny_patch16_LS': (16, 192, 12, 3, True, False),
    'deit_small_patch16_LS': (16, 384, 12, 6, True, False),
    'deit_medium_patch16_LS': (16, 512, 12, 8, True, False),
    'deit_base_patch16_LS': (16, 768, 12, 12, True, False),
    'deit_large_patch16_LS': (16, 1024, 24, 16, True, False),
    'deit_huge_patch14_LS': (14, 1280, 32, 16, True, False),
    'deit_huge_patch14_52_LS': (14, 1280, 52, 16, True, False),
    'deit_huge_patch14_26x2_LS': (14, 1280, 26, 16, True, True),
    'deit_Giant_48x2_patch14_LS': (14, 1664, 48, 16, True, True),
    'deit_giant_40x2_patch14_LS': (14, 1408, 40, 16, True, True),
    'deit_Giant_48_patch14_LS': (14, 1664, 48, 16, True, False),
    'deit_giant_40_patch14_LS': (14, 1408, 40, 16, True, False),
    'deit_small_patch16_36_LS': (16, 384, 36, 6, True, False),
    'deit_small_patch16_36': (16, 384, 36, 6, False, False),
    'deit_small_patch16_18x2_LS': (16, 384, 18, 6, True, True),
    'deit_small_patch16_18x2': (16, 384, 18, 6, False, True),
    'deit_base_patch16_18x2_LS': (16, 768, 18, 12, True, True),
    'deit_base_patch16_18x2': (16, 768, 18, 12, False, True),
    'deit_base_patch16_36x1_LS': (16, 768, 36, 12, True, False),
    'deit_base_patch16_36x1': (16, 768, 36, 12, False, False),
}

# The original's ImageNet-1k weights at 224 px (its pretrained=True default).
_OFFICIAL_WEIGHTS = {
    'deit_small_patch16_LS': 'deit_3_small_224_1k.pth',
    'deit_medium_patch16_LS': 'deit_3_medium_224_1k.pth',
    'deit_base_patch16_LS': 'deit_3_base_224_1k.pth',
    'deit_large_patch16_LS': 'deit_3_large_224_1k.pth',
    'deit_huge_patch14_LS': 'deit_3_huge_224_1k_v1.pth',
}

# timm's register_model reads this module-level table for each entrypoint's pretrained config.
default_cfgs = generate_default_cfgs({
    name: _cfg(_WEIGHTS + _OFFICIAL_WEIGHTS[name] if name in _OFFICIAL_WEIGHTS else '') for name in ARCHITECTURES})

LAYER_SCALE_INIT = 1e-4  # the original's init_scale default; timm's deit3_* use 1e-6


def _same_drop_path_in_every_block(model: torch.nn.Module, rate: float) -> None:
    """The original drops paths at the full rate in every block; timm ramps the rate up from 0 with depth
    and has no option for a constant rate, hence this replacement after construction (of the model or of
    its features_only wrapper)."""
    for parent in list(model.modules()):
        for name, _ in list(parent.named_children()):
            if name.startswith('drop_path'):
                setattr(parent, name, DropPath(rate) if rate > 0 else torch.nn.Identity())


def _create(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    patch_size, embed_dim, depth, num_heads, layer_scale, parallel = ARCHITECTURES[variant]
    # As timm's entrypoints do, keyword arguments override the architecture (e.g. depth=2 for a test);
    # build_model_with_cfg consumes the pretrained_cfg/cache_dir kwargs that create_model passes.
    model_args = dict(
        patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4.0,
        qkv_bias=True, no_embed_class=True, init_values=LAYER_SCALE_INIT if layer_scale else None,
        block_fn=ParallelThingsBlock if parallel else Block)
    model_args.update(kwargs)
    drop_path_rate = model_args.pop('drop_path_rate', 0.0)
    model = build_model_with_cfg(
        VisionTransformer, variant, pretrained,
        pretrained_filter_fn=partial(checkpoint_filter_fn, adapt_layer_scale=True),  # timm's, for DeiT III
        # features_only reads forward_intermediates ('getter'), the last 3 blocks by default, as timm's deit3_*
        feature_cfg=dict(out_indices=model_args.pop('out_indices', 3), feature_cls='getter'),
        **model_args)
    _same_drop_path_in_every_block(model, drop_path_rate)
    return model


def _entrypoint(name: str):
    """The timm model entrypoint of ``name`` (register_model reads the function's name)."""
    def entrypoint(pretrained: bool = False, **kwargs) -> VisionTransformer:
        return _create(name, pretrained, **kwargs)

    patch_size, embed_dim, depth, num_heads, layer_scale, parallel = ARCHITECTURES[name]
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = (f'ViT/{patch_size} of the original DeiT III code: {depth} blocks'
                          f'{" of 2 parallel branches" if parallel else ""}, width {embed_dim}, {num_heads} heads, '
                          f'{"LayerScale" if layer_scale else "no LayerScale"}.')
    return entrypoint


for _name in ARCHITECTURES:
    globals()[_name] = register_model(_entrypoint(_name))
