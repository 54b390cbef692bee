"""Mobile-Former (Chen et al. 2021, "Mobile-Former: Bridging MobileNet and Transformer", arXiv 2108.05895).

A MobileNet (local features) and a small transformer over a few learnable global tokens run in
parallel. Each Mobile-Former block:

1. Mobile->Former: the tokens attend to the block's input feature map (lightweight cross
   attention: the pixels are keys and values as they are, only the tokens are projected);
2. Former: one post-norm transformer layer over the tokens (FFN expansion 2);
3. Mobile: an inverted bottleneck whose ReLUs are dynamic, their slopes computed from the first
   global token;
4. Former->Mobile: the pixels attend to the tokens (the pixels are queries as they are, only the
   tokens are projected to keys and values), added to the Mobile output.

The classification head pools the local features and concatenates the first global token, then two
fully connected layers with h-swish in between. To honour timm's model interface (one unpooled
feature tensor from ``forward_features``), that token is carried as extra channels at every position
of the feature map: average pooling then gives exactly the concatenation the paper describes.

Layer configurations follow the paper's appendix table; where the paper is silent we take the
authors' published models' choice (noted where made).
"""
from typing import Dict, List, NamedTuple, Optional, Tuple, Type, Union

import torch
from torch import nn
from timm.layers import DropPath, Mlp, calculate_drop_path_rates, get_device_dtype, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


class MobileFormerConfig(NamedTuple):
    """One row of the paper's appendix table; each block is (expanded channels, out channels, stride)."""
    stem_chs: int
    lite_bneck: Tuple[int, int, int]
    blocks: Tuple[Tuple[int, int, int], ...]
    num_tokens: int
    token_dim: int
    head_chs: int  # 1x1 conv before pooling
    head_hidden: int  # first fully connected layer
    paper_params: float  # the paper's parameter count (1000 classes) ...
    paper_madds: float  # ... and multiply-adds at 224x224 ("FLOPs" in the paper)


CONFIGS: Dict[str, MobileFormerConfig] = {
    'mobile_former_294m': MobileFormerConfig(
        stem_chs=16, lite_bneck=(32, 16, 1),
        blocks=((96, 24, 2), (96, 24, 1),
                (144, 48, 2), (192, 48, 1),
                (288, 96, 2), (384, 96, 1), (576, 128, 1), (768, 128, 1),
                (768, 192, 2), (1152, 192, 1), (1152, 192, 1)),
        num_tokens=6, token_dim=192, head_chs=1152, head_hidden=1920,
        paper_params=11.4e6, paper_madds=294e6),
    'mobile_former_151m': MobileFormerConfig(
        stem_chs=12, lite_bneck=(24, 12, 1),
        blocks=((72, 16, 2), (48, 16, 1),
                (96, 32, 2), (96, 32, 1),
                (192, 64, 2), (256, 64, 1), (384, 88, 1), (528, 88, 1),
                (528, 128, 2), (768, 128, 1), (768, 128, 1)),
        num_tokens=6, token_dim=192, head_chs=768, head_hidden=1280,
        paper_params=7.6e6, paper_madds=151e6),
    'mobile_former_52m': MobileFormerConfig(
        stem_chs=8, lite_bneck=(24, 12, 2),
        blocks=((36, 12, 1),
                (72, 24, 2), (72, 24, 1),
                (144, 48, 2), (192, 48, 1), (288, 64, 1),
                (384, 96, 2), (576, 96, 1)),
        num_tokens=3, token_dim=128, head_chs=576, head_hidden=1024,
        paper_params=3.5e6, paper_madds=52e6),
}

BRIDGE_HEADS = 2  # head counts: the paper is silent, these are the published models'
FORMER_HEADS = 4


def conv_bn(in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1,
            act: Optional[Type[nn.Module]] = None) -> nn.Sequential:
    """Conv (same padding, no bias) + BatchNorm, then the activation if given."""
    layers = [nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
              nn.BatchNorm2d(out_chs)]
    return nn.Sequential(*layers, *([act()] if act else []))


def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C / heads)."""
    return t.reshape(t.shape[0], t.shape[1], num_heads, t.shape[2] // num_heads).transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head attention of q (B, N, C) over k, v (B, M, C), the channels split into heads."""
    scale = (q.shape[2] // num_heads) ** -0.5
    heads = split_heads(q, num_heads) @ split_heads(k, num_heads).transpose(-2, -1)
    # explicit matmuls rather than scaled_dot_product_attention: FlopCounterMode counts them on a CPU too
    out = (heads * scale).softmax(dim=-1) @ split_heads(v, num_heads)
    return out.transpose(1, 2).reshape(q.shape)


def _drop_path(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0 else nn.Identity()


class DynamicReLU(nn.Module):
    """Dynamic ReLU max(a1 x, a2 x) with per-channel slopes computed from a global token.

    Two slopes per channel and no intercepts: the four coefficients of DY-ReLU-B would add about
    10% to the parameter counts of the paper's table.
    """

    def __init__(self, chs: int, token_dim: int, reduction: int = 4):
        super().__init__()
        self.coefs = nn.Sequential(nn.Linear(token_dim, token_dim // reduction), nn.ReLU(inplace=True),
                                   nn.Linear(token_dim // reduction, 2 * chs), nn.Hardsigmoid())

    def forward(self, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        # centred so that a zero output of the MLP gives a1 = 1, a2 = 0: a plain ReLU
        offsets = 2 * self.coefs(token)[:, :, None, None] - 1  # in [-1, 1]
        a1, a2 = offsets.chunk(2, dim=1)
        return torch.maximum(x * (1 + a1), x * a2)


class ConvBnDynamicReLU(nn.Module):
    """Conv + BatchNorm, then a dynamic ReLU unless the layer is a linear projection."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, token_dim: int, stride: int = 1,
                 groups: int = 1, linear: bool = False):
        super().__init__()
        self.conv = conv_bn(in_chs, out_chs, kernel_size, stride, groups)
        self.act = None if linear else DynamicReLU(out_chs, token_dim)

    def forward(self, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x if self.act is None else self.act(x, token)


class Mobile(nn.Module):
    """Mobile sub-block: an inverted bottleneck with dynamic ReLUs."""

    def __init__(self, in_chs: int, exp_chs: int, out_chs: int, stride: int, token_dim: int, drop_path: float):
        super().__init__()
        if stride == 1:  # pointwise expand -> depthwise -> pointwise project
            layers = [ConvBnDynamicReLU(in_chs, exp_chs, 1, token_dim),
                      ConvBnDynamicReLU(exp_chs, exp_chs, 3, token_dim, groups=exp_chs),
                      ConvBnDynamicReLU(exp_chs, out_chs, 1, token_dim, linear=True)]
        else:
            # The paper's downsampling block: depthwise (stride 2) -> pointwise -> depthwise -> pointwise,
            # each depthwise expanding channels, so that both pointwise convs run after downsampling.
            # The table gives the first expansion; the second is 4x (the published models' choice).
            layers = [ConvBnDynamicReLU(in_chs, exp_chs, 3, token_dim, stride=stride, groups=in_chs),
                      ConvBnDynamicReLU(exp_chs, out_chs, 1, token_dim, linear=True),
                      ConvBnDynamicReLU(out_chs, 4 * out_chs, 3, token_dim, groups=out_chs),
                      ConvBnDynamicReLU(4 * out_chs, out_chs, 1, token_dim, linear=True)]
        self.layers = nn.ModuleList(layers)
        self.has_residual = stride == 1 and in_chs == out_chs
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        shortcut = x
        for layer in self.layers:
            x = layer(x, token)
        return shortcut + self.drop_path(x) if self.has_residual else x


class MobileToFormer(nn.Module):
    """Bridge Mobile->Former: the tokens attend to the pixels (no key/value projections on the pixels)."""

    def __init__(self, chs: int, token_dim: int, drop_path: float = 0.):
        super().__init__()
        self.num_heads = BRIDGE_HEADS
        self.q = nn.Linear(token_dim, chs)
        self.proj = nn.Linear(chs, token_dim)
        self.norm = nn.LayerNorm(token_dim)
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        pixels = x.flatten(2).transpose(1, 2)
        update = self.proj(attend(self.q(tokens), pixels, pixels, self.num_heads))
        return self.norm(tokens + self.drop_path(update))


class FormerToMobile(nn.Module):
    """Bridge Former->Mobile: the pixels attend to the tokens (no query projection on the pixels)."""

    def __init__(self, chs: int, token_dim: int, drop_path: float = 0.):
        super().__init__()
        self.num_heads = BRIDGE_HEADS
        self.k = nn.Linear(token_dim, chs)
        self.v = nn.Linear(token_dim, chs)
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        update = attend(x.flatten(2).transpose(1, 2), self.k(tokens), self.v(tokens), self.num_heads)
        return x + self.drop_path(update.transpose(1, 2).reshape(x.shape))


class Former(nn.Module):
    """A transformer layer over the global tokens: post-norm, as in the paper, FFN expansion 2.

    The paper describes a standard transformer; its published code also drops the key and value
    projections here, which is most of why our parameter counts are 5-9% above the paper's.
    """

    def __init__(self, dim: int, drop_path: float = 0.):
        super().__init__()
        self.num_heads = FORMER_HEADS
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 2 * dim)
        self.norm2 = nn.LayerNorm(dim)
        self.drop_path = _drop_path(drop_path)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        tokens = self.norm1(tokens + self.drop_path(self.proj(attend(q, k, v, self.num_heads))))
        return self.norm2(tokens + self.drop_path(self.mlp(tokens)))


class MobileFormerBlock(nn.Module):
    """Mobile->Former, Former, Mobile (dynamic ReLU from the first token), Former->Mobile."""

    def __init__(self, in_chs: int, exp_chs: int, out_chs: int, stride: int, token_dim: int, drop_path: float):
        super().__init__()
        self.mobile_to_former = MobileToFormer(in_chs, token_dim, drop_path)
        self.former = Former(token_dim, drop_path)
        self.mobile = Mobile(in_chs, exp_chs, out_chs, stride, token_dim, drop_path)
        self.former_to_mobile = FormerToMobile(out_chs, token_dim, drop_path)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        tokens = self.former(self.mobile_to_former(x, tokens))
        x = self.mobile(x, tokens[:, 0])
        return self.former_to_mobile(x, tokens), tokens


class LiteBottleneck(nn.Module):
    """The stem's lightweight bottleneck (MicroNet): depthwise conv expanding channels, pointwise project."""

    def __init__(self, in_chs: int, exp_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.conv = nn.Sequential(conv_bn(in_chs, exp_chs, 3, stride, groups=in_chs, act=nn.ReLU6),
                                  conv_bn(exp_chs, out_chs, 1))
        self.has_residual = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.has_residual else self.conv(x)


class PassTokens(nn.Module):
    """Stands in for the last bridge once the head is pruned: the tokens pass through unchanged."""

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return tokens


class MobileFormer(nn.Module):
    """Mobile-Former classifier with timm's model interface.

    ``forward_features`` returns the head's feature map with the first global token appended as
    channels at every position, (B, num_features, H/32, W/32); ``forward_intermediates`` and
    ``features_only`` give the MobileNet path's feature map at the end of each stride (``feature_info``).
    With ``global_pool=''`` the head runs at every position and returns a map, as timm's MobileNetV3.
    """

    def __init__(self, cfg: MobileFormerConfig, num_classes: int = 1000, in_chans: int = 3,
                 global_pool: str = 'avg', drop_rate: float = 0., drop_path_rate: float = 0.):
        super().__init__()
        self.num_classes = num_classes
        self._set_global_pool(global_pool)
        self.grad_checkpointing = False
        self.tokens = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.token_dim))  # learnt global priors
        self.stem = conv_bn(in_chans, cfg.stem_chs, 3, stride=2, act=nn.ReLU6)
        self.lite_bneck = LiteBottleneck(cfg.stem_chs, *cfg.lite_bneck)
        chs, blocks = cfg.lite_bneck[1], []
        # (module, channels, reduction) of each layer's output; feature_info keeps the last one at each stride
        layers = [('stem', cfg.stem_chs, 2), ('lite_bneck', chs, 2 * cfg.lite_bneck[2])]
        for (exp_chs, out_chs, stride), drop_path in zip(cfg.blocks, calculate_drop_path_rates(
                drop_path_rate, len(cfg.blocks))):
            blocks.append(MobileFormerBlock(chs, exp_chs, out_chs, stride, cfg.token_dim, drop_path))
            chs = out_chs
            layers.append((f'blocks.{len(blocks) - 1}', chs, layers[-1][2] * stride))
        self.blocks = nn.ModuleList(blocks)
        # layer numbers (0 stem, 1 lite bottleneck, 2 + i block i) of the feature levels
        self.stage_ends = [i for i in range(len(layers)) if i + 1 == len(layers) or layers[i + 1][2] > layers[i][2]]
        self.feature_info = [dict(module=layers[i][0], num_chs=layers[i][1], reduction=layers[i][2])
                             for i in self.stage_ends]
        # One more bridge, so that the first token, which the head reads, has seen the last feature map.
        self.mobile_to_former = MobileToFormer(chs, cfg.token_dim)
        self.conv_head = conv_bn(chs, cfg.head_chs, 1, act=nn.Hardswish)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = cfg.head_chs + cfg.token_dim
        self.fc = nn.Linear(self.num_features, cfg.head_hidden)
        self.fc_act = nn.Hardswish()
        self.head_hidden_size = cfg.head_hidden
        self.head_drop = nn.Dropout(drop_rate)
        self.classifier = self._new_classifier(num_classes)
        self.apply(self._init_weights)
        trunc_normal_(self.tokens, std=.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=.02)
            nn.init.zeros_(module.bias)

    def _new_classifier(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        return nn.Linear(self.head_hidden_size, num_classes, **get_device_dtype(self))

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'tokens'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for timm's layer-wise learning-rate decay; the head, unmatched, comes last."""
        return dict(stem=r'^tokens|^stem|^lite_bneck', blocks=r'^blocks\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier

    def _set_global_pool(self, global_pool: str) -> None:
        if global_pool not in ('avg', ''):
            raise ValueError(f"Mobile-Former's head pools by average ('avg') or not at all (''), not {global_pool!r}")
        self.global_pool = global_pool

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            self._set_global_pool(global_pool)
        self.num_classes = num_classes
        self.classifier = self._new_classifier(num_classes)
        self.classifier.train(self.training)

    def _forward_layers(self, x: torch.Tensor, take_layers: List[int],
                        num_blocks: int) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        """Stem, lite bottleneck and the first ``num_blocks`` blocks (all of them when scripted): the feature
        map, the global tokens, and the outputs of ``take_layers`` (0 stem, 1 lite bottleneck, 2 + i block i)."""
        taken: List[torch.Tensor] = []
        tokens = self.tokens.expand(x.shape[0], -1, -1)
        x = self.stem(x)
        if 0 in take_layers:
            taken.append(x)
        x = self.lite_bneck(x)
        if 1 in take_layers:
            taken.append(x)
        if torch.jit.is_scripting():  # TorchScript cannot slice a ModuleList by a variable
            blocks = self.blocks
        else:
            blocks = self.blocks[:num_blocks]
        for i, block in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x, tokens = checkpoint(block, x, tokens)
            else:
                x, tokens = block(x, tokens)
            if i + 2 in take_layers:
                taken.append(x)
        return x, tokens, taken

    def _head_features(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The head's 1x1 conv of the feature map, with the first global token (after the last bridge) as
        extra channels at every position, so that average pooling yields their concatenation."""
        token = self.mobile_to_former(x, tokens)[:, 0, :, None, None]
        x = self.conv_head(x)
        return torch.cat((x, token.expand(-1, -1, x.shape[2], x.shape[3])), dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, tokens, _ = self._forward_layers(x, [], len(self.blocks))
        return self._head_features(x, tokens)

    def forward_intermediates(
            self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None, norm: bool = False,
            stop_early: bool = False, output_fmt: str = 'NCHW', intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's feature extraction: the feature maps of the ``feature_info`` levels selected by ``indices``
        (the last n if an int, all if None), after ``forward_features``' output unless ``intermediates_only``."""
        assert output_fmt == 'NCHW', 'Mobile-Former features are NCHW.'
        assert not stop_early or intermediates_only, 'Stopping early needs intermediates_only.'
        take_indices, max_index = feature_take_indices(len(self.stage_ends), indices)
        num_blocks = max(self.stage_ends[max_index] - 1, 0) if stop_early else len(self.blocks)
        x, tokens, intermediates = self._forward_layers(x, [self.stage_ends[i] for i in take_indices], num_blocks)
        if intermediates_only:
            return intermediates
        return self._head_features(x, tokens), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drops the blocks after the last feature level in ``indices`` and, with ``prune_head``, the head."""
        take_indices, max_index = feature_take_indices(len(self.stage_ends), indices)
        self.blocks = self.blocks[:max(self.stage_ends[max_index] - 1, 0)]
        if prune_head:
            self.mobile_to_former = PassTokens()
            self.conv_head = nn.Identity()
            self.fc = nn.Identity()
            self.reset_classifier(0)
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = self.pool(x).flatten(1)
        # unpooled (global_pool ''), the head runs at every position: channels last for the linear layers
        x = self.head_drop(self.fc_act(self.fc(x.movedim(1, -1))))
        return (x if pre_logits else self.classifier(x)).movedim(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# timm's register_model reads this module-level table for each entrypoint's pretrained config.
default_cfgs = generate_default_cfgs({
    name: {'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
           'crop_pct': 0.875, 'interpolation': 'bilinear', 'mean': IMAGENET_DEFAULT_MEAN,
           'std': IMAGENET_DEFAULT_STD, 'first_conv': 'stem.0', 'classifier': 'classifier'}
    for name in CONFIGS
})


def _create(variant: str, pretrained: bool, **kwargs) -> MobileFormer:
    # build_model_with_cfg consumes the pretrained_cfg/cache_dir kwargs that create_model passes; the blocks
    # take the tokens along with the feature map, so features_only reads forward_intermediates ('getter').
    return build_model_with_cfg(MobileFormer, variant, pretrained, cfg=CONFIGS[variant],
                                feature_cfg=dict(feature_cls='getter'), **kwargs)


@register_model
def mobile_former_294m(pretrained: bool = False, **kwargs) -> MobileFormer:
    """Mobile-Former-294M (77.9% ImageNet top-1 in the paper; sizes in CONFIGS)."""
    return _create('mobile_former_294m', pretrained, **kwargs)


@register_model
def mobile_former_151m(pretrained: bool = False, **kwargs) -> MobileFormer:
    """Mobile-Former-151M (75.2% ImageNet top-1 in the paper; sizes in CONFIGS)."""
    return _create('mobile_former_151m', pretrained, **kwargs)


@register_model
def mobile_former_52m(pretrained: bool = False, **kwargs) -> MobileFormer:
    """Mobile-Former-52M (68.7% ImageNet top-1 in the paper; sizes in CONFIGS)."""
    return _create('mobile_former_52m', pretrained, **kwargs)
