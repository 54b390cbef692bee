"""A RegNetY convnet teacher for tiny inputs (16-32 px), e.g. for the DIGITS quickstart.

timm's RegNetY-200MF (regnety_002) downsamples by 32: a 16 px image is 1x1 from its third stage
on, too little for it to learn DIGITS (docs/quickstart.md). This one keeps RegNetY's design
(grouped 3x3 bottlenecks with squeeze-excitation, four stages) at a size for tiny images: stage
widths 16-32-64-128, output stride 8 (stages 3-4 dilated instead of strided), 0.1 M parameters.
"""
from dataclasses import replace

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.regnet import RegNet, RegNetCfg, model_cfgs

# RegNetY-200MF's settings (SE 0.25, groups of 8, ...) with fewer, narrower blocks: depths 1-1-3-1.
TINY_CFG: RegNetCfg = replace(model_cfgs['regnety_002'], depth=6, w0=16, wa=16, wm=2.0)

# timm's register_model reads this module-level table for each entrypoint's pretrained config.
default_cfgs = generate_default_cfgs({
    'regnety_tiny_os8': {
        'url': '', 'num_classes': 10, 'input_size': (3, 16, 16), 'pool_size': (2, 2), 'crop_pct': 1.0,
        'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv', 'classifier': 'head.fc',
    },
})


@register_model
def regnety_tiny_os8(pretrained: bool = False, **kwargs) -> RegNet:
    """A 0.1 M-parameter RegNetY with output stride 8, for 16-32 px inputs."""
    kwargs.setdefault('output_stride', 8)
    return build_model_with_cfg(RegNet, 'regnety_tiny_os8', pretrained, model_cfg=TINY_CFG, **kwargs)
