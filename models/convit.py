"""ConViT students with a DeiT distillation token (timm has only the class-token ConViT).

``ConVitDistilled`` is timm's ``ConVit`` plus a ``dist_token`` inserted next to the class token
(after the local GPSA blocks, where ConViT inserts its class token) and a ``head_dist``, with
timm's ``VisionTransformerDistilled`` conventions: ``set_distilled_training(True)`` makes the
training forward return ``(cls_logits, dist_logits)``; otherwise the two heads are averaged.
"""
from typing import Optional, Set, Tuple

import torch
from torch import nn
from timm.layers import get_device_dtype, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.convit import ConVit, _cfg


class ConVitDistilled(ConVit):
    """ConViT with class and distillation tokens, each read by its own head."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        assert self.global_pool == 'token', 'The distilled head reads the class and distillation tokens.'
        dd = {'device': kwargs.get('device'), 'dtype': kwargs.get('dtype')}
        self.num_prefix_tokens = 2
        self.dist_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim, **dd))
        trunc_normal_(self.dist_token, std=.02)
        self.head_dist = self._new_head(self.num_classes)
        self.distilled_training = False  # set_distilled_training(True) to train with the distillation token

    def _new_head(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        head = nn.Linear(self.embed_dim, num_classes, **get_device_dtype(self))
        self._init_weights(head)
        return head

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        self.distilled_training = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return super().no_weight_decay() | {'dist_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        matcher = super().group_matcher(coarse)
        return dict(matcher, stem=matcher['stem'] + '|dist_token')

    @torch.jit.ignore
    def get_classifier(self) -> Tuple[nn.Module, nn.Module]:
        return self.head, self.head_dist

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        assert global_pool in (None, 'token'), 'The distilled head reads the class and distillation tokens.'
        super().reset_classifier(num_classes)
        self.head_dist = self._new_head(num_classes)
        self.head_dist.train(self.training)

    def forward_intermediates(self, *args, **kwargs):
        # ConVit's version strips exactly one prefix token; use convit_* for feature extraction.
        raise NotImplementedError('intermediate features are not supported by the distilled ConViT')

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.use_pos_embed:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        for i, block in enumerate(self.blocks):
            if i == self.local_up_to_layer:  # GPSA blocks see patches only, as in ConViT
                tokens = torch.cat((self.cls_token, self.dist_token), dim=1)
                x = torch.cat((tokens.expand(x.shape[0], -1, -1), x), dim=1)
            x = block(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        x, x_dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
        if pre_logits:
            return (x + x_dist) / 2
        x, x_dist = self.head(x), self.head_dist(x_dist)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return x, x_dist
        return (x + x_dist) / 2


# timm's register_model reads this module-level table for each entrypoint's pretrained config.
default_cfgs = generate_default_cfgs({
    f'convit_{size}_distilled': _cfg(classifier=('head', 'head_dist'))
    for size in ('tiny', 'small', 'base')
})


def _create(variant: str, pretrained: bool, num_heads: int, **kwargs) -> ConVitDistilled:
    # timm's ConViT sizes: embed_dim is per head (48), local_up_to_layer GPSA blocks out of 12.
    model_args = dict(local_up_to_layer=10, locality_strength=1.0, embed_dim=48, num_heads=num_heads)
    # build_model_with_cfg consumes the pretrained_cfg/cache_dir kwargs that create_model passes.
    return build_model_with_cfg(ConVitDistilled, variant, pretrained, **dict(model_args, **kwargs))


@register_model
def convit_tiny_distilled(pretrained: bool = False, **kwargs) -> ConVitDistilled:
    """ConViT-Ti (4 heads, dim 192) with a distillation token."""
    return _create('convit_tiny_distilled', pretrained, num_heads=4, **kwargs)


@register_model
def convit_small_distilled(pretrained: bool = False, **kwargs) -> ConVitDistilled:
    """ConViT-S (9 heads, dim 432) with a distillation token."""
    return _create('convit_small_distilled', pretrained, num_heads=9, **kwargs)


@register_model
def convit_base_distilled(pretrained: bool = False, **kwargs) -> ConVitDistilled:
    """ConViT-B (16 heads, dim 768) with a distillation token."""
    return _create('convit_base_distilled', pretrained, num_heads=16, **kwargs)
