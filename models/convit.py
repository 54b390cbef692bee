"""ConViT students with a DeiT distillation token (timm has only the class-token ConViT).

``ConVitDistilled`` is timm's ``ConVit`` plus a ``dist_token`` inserted next to the class token
(after the local GPSA blocks, where ConViT inserts its class token) and a ``head_dist``, with
timm's ``VisionTransformerDistilled`` conventions: ``set_distilled_training(True)`` makes the
training forward return ``(cls_logits, dist_logits)``; otherwise the two heads are averaged.
"""
from typing import List, Optional, Set, Tuple, Union

import torch
from torch import nn
from timm.layers import get_device_dtype, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
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
        # as timm's VisionTransformerDistilled: '' (no pooling, asked by prune_intermediate_layers) keeps the head
        assert global_pool in (None, '', 'token'), 'The distilled head reads the class and distillation tokens.'
        super().reset_classifier(num_classes)
        self.head_dist = self._new_head(num_classes)
        self.head_dist.train(self.training)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.use_pos_embed:
            x = x + self.pos_embed
        return self.pos_drop(x)

    def _with_prefix_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Class and distillation tokens before the patches, after the GPSA blocks (which see patches only)."""
        tokens = torch.cat((self.cls_token, self.dist_token), dim=1)
        return torch.cat((tokens.expand(x.shape[0], -1, -1), x), dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        for i, block in enumerate(self.blocks):
            if i == self.local_up_to_layer:
                x = self._with_prefix_tokens(x)
            x = block(x)
        return self.norm(x)

    def forward_intermediates(
            self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None, norm: bool = False,
            stop_early: bool = False, output_fmt: str = 'NCHW', intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's ConVit.forward_intermediates with both prefix tokens: the patch tokens of the outputs of the
        blocks selected by ``indices`` (the last n if an int, all if None), then ``forward_features``' output."""
        assert output_fmt in ('NCHW', 'NLC'), 'Output format must be one of NCHW or NLC.'
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        intermediates = []
        batch, _, height, width = x.shape
        x = self._embed(x)
        if torch.jit.is_scripting() or not stop_early:  # TorchScript cannot slice a ModuleList by a variable
            blocks = self.blocks
        else:
            blocks = self.blocks[:max_index + 1]
        for i, block in enumerate(blocks):
            if i == self.local_up_to_layer:
                x = self._with_prefix_tokens(x)
            x = block(x)
            if i in take_indices:
                y = self.norm(x) if norm else x
                intermediates.append(y[:, self.num_prefix_tokens:] if i >= self.local_up_to_layer else y)
        if output_fmt == 'NCHW':
            grid_h, grid_w = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous()
                             for y in intermediates]
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

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
    # build_model_with_cfg consumes the pretrained_cfg/cache_dir kwargs that create_model passes;
    # features_only reads forward_intermediates ('getter'), the last 3 blocks by default, as timm's convit_*.
    feature_cfg = dict(out_indices=kwargs.pop('out_indices', 3), feature_cls='getter')
    return build_model_with_cfg(ConVitDistilled, variant, pretrained, feature_cfg=feature_cfg,
                                **dict(model_args, **kwargs))


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
