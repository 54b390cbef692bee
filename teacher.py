"""The distillation teacher as an inference-only module: no autograd state, BatchNorm folded, channels_last.

The teacher is frozen, so everything that only serves training can go: autograd bookkeeping
(inference_mode), the BatchNorm pass after each convolution (folded into the convolution's weights),
and the NCHW layout that oneDNN convolutions convert from and back to on every call (channels_last).
"""
from typing import Optional

import torch
from timm.layers import BatchNormAct2d, ConvNormAct
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from speedups import compile_or_eager, unfuse_cpu_bf16_attention


def _bn_as_activation(bn: nn.BatchNorm2d) -> nn.Module:
    """What remains of a (timm BatchNormAct2d) norm layer once its affine map lives in the conv."""
    if isinstance(bn, BatchNormAct2d):
        return nn.Sequential(bn.drop, bn.act)
    return nn.Identity()


def _foldable(module: nn.Module) -> bool:
    # timm's ConvNormAct.forward is exactly conv -> bn (-> aa): nothing reads the conv output but the
    # norm layer, and in eval mode the norm is a fixed per-channel affine map of it.
    bn = getattr(module, 'bn', None)
    return (type(module).forward is ConvNormAct.forward and isinstance(module.conv, nn.Conv2d)
            and isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None and not bn.training)


def fold_batchnorm(model: nn.Module) -> int:
    """Fold each eval-mode BatchNorm of timm's ConvNormAct blocks into its convolution; returns the count.

    y = gamma * (conv(x) + b - mean) / sqrt(var + eps) + beta is again a convolution, with weights
    scaled per output channel: the same function up to float rounding. Other conv/BN pairs (a
    BN that may follow something else in a custom forward) are left alone, since only this
    block's forward is known to feed the conv straight into the norm.
    """
    folded = 0
    for module in model.modules():
        if not _foldable(module):
            continue
        conv, bn = module.conv, module.bn
        weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                            bn.eps, bn.weight, bn.bias)
        conv.weight, conv.bias = weight, bias
        module.bn = _bn_as_activation(bn)
        folded += 1
    return folded


class InferenceTeacher(nn.Module):
    """Wraps a frozen teacher: inference mode, channels_last input, optional autocast; fp32 logits out."""

    def __init__(self, model: nn.Module, amp_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.model = model
        self.amp_dtype = amp_dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(images.device.type, dtype=self.amp_dtype,
                                                    enabled=self.amp_dtype is not None):
            logits = self.model(images.contiguous(memory_format=torch.channels_last)).float()
        # inference tensors cannot enter autograd graphs later (soft distillation): return a normal one
        return logits.clone()

    def train(self, mode: bool = True) -> 'InferenceTeacher':
        return super().train(False)  # always eval: running statistics are folded into the weights


def prepare_teacher(model: nn.Module, device: torch.device, compile: bool = False,
                    amp_dtype: Optional[torch.dtype] = None) -> InferenceTeacher:
    """The frozen ``model`` ready for fast forwards on ``device`` (see the module docstring)."""
    model = model.eval().requires_grad_(False)
    with torch.no_grad():
        fold_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last)
    unfuse_cpu_bf16_attention(model, device, amp_dtype)  # a transformer teacher (e.g. a DeiT)
    if compile:
        model = compile_or_eager(model, 'teacher')
    return InferenceTeacher(model, amp_dtype)
