"""The distillation teacher as an inference-only module: no autograd state, BatchNorm folded, channels_last,
fed the inputs it was trained on.

The teacher is frozen, so everything that only serves training can go: autograd bookkeeping
(inference_mode), the BatchNorm pass after each convolution (folded into the convolution's weights),
and the NCHW layout that oneDNN convolutions convert from and back to on every call (channels_last).

A teacher trained with another normalisation or at another resolution than the student (many of timm's
weights use mean = std = 0.5; strong convnets are trained at 256-384 px) receives the student's batch
converted on the device, once per step (TeacherInputs): no second data pipeline, the same crops.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
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


@dataclass(frozen=True)
class InputSpec:
    """What a model's input images are: square ``size`` px, resized with ``interpolation`` (timm's names:
    bicubic, bilinear, nearest), normalised by per-channel ``mean`` and ``std``."""
    size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    interpolation: str = 'bicubic'

    @classmethod
    def from_data_config(cls, config: dict) -> 'InputSpec':
        """From timm's data config (timm.data.resolve_data_config): its input_size, interpolation, mean, std."""
        return cls(int(config['input_size'][-1]), tuple(map(float, config['mean'])), tuple(map(float, config['std'])),
                   config.get('interpolation') or 'bicubic')

    def describe(self, interpolation: bool = False) -> str:
        mean, std = (', '.join(f'{v:.3g}' for v in values) for values in (self.mean, self.std))
        return f'{self.size} px' + (f' ({self.interpolation})' if interpolation else '') + f', mean ({mean}) std ({std})'


class TeacherInputs(nn.Module):
    """The student's normalised batch as the teacher's preprocessing makes it: renormalised, then resized.

    ``x_t = x_s * std_s / std_t + (mean_s - mean_t) / std_t`` per channel (one multiply-add: the
    pixels are ``x_s * std_s + mean_s``), then, if the sizes differ, resized with the teacher's
    interpolation, antialiased as torchvision's tensor Resize and PIL's (the kernels timm's transforms
    use). Both steps are linear in the pixels, so their order only moves float rounding.
    """

    def __init__(self, student: InputSpec, teacher: InputSpec):
        super().__init__()
        self.size = teacher.size if teacher.size != student.size else None
        self.mode = teacher.interpolation if teacher.interpolation in ('bilinear', 'bicubic', 'nearest') else 'bicubic'
        mean_s, std_s = torch.tensor(student.mean), torch.tensor(student.std)
        mean_t, std_t = torch.tensor(teacher.mean), torch.tensor(teacher.std)
        self.renormalise = not (torch.equal(mean_s, mean_t) and torch.equal(std_s, std_t))
        self.register_buffer('scale', (std_s / std_t).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('shift', ((mean_s - mean_t) / std_t).view(1, 3, 1, 1), persistent=False)

    @property
    def identity(self) -> bool:
        return self.size is None and not self.renormalise

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.renormalise:
            images = torch.addcmul(self.shift, images, self.scale)
        if self.size is not None:
            # fp32 even under autocast: the antialiased kernels have no CPU bf16 version, and the
            # teacher's first layer rounds to its precision anyway
            images = F.interpolate(images.float(), size=(self.size, self.size), mode=self.mode,
                                   antialias=self.mode != 'nearest',
                                   align_corners=None if self.mode == 'nearest' else False)
        return images


class InferenceTeacher(nn.Module):
    """Wraps a frozen teacher: inference mode, its own inputs (TeacherInputs), channels_last, optional
    autocast; fp32 logits out."""

    def __init__(self, model: nn.Module, amp_dtype: Optional[torch.dtype] = None,
                 inputs: Optional[TeacherInputs] = None):
        super().__init__()
        self.model = model
        self.amp_dtype = amp_dtype
        self.inputs = inputs if inputs is not None and not inputs.identity else nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(images.device.type, dtype=self.amp_dtype,
                                                    enabled=self.amp_dtype is not None):
            images = self.inputs(images)
            logits = self.model(images.contiguous(memory_format=torch.channels_last)).float()
        # inference tensors cannot enter autograd graphs later (soft distillation): return a normal one
        return logits.clone()

    def train(self, mode: bool = True) -> 'InferenceTeacher':
        return super().train(False)  # always eval: running statistics are folded into the weights


def prepare_teacher(model: nn.Module, device: torch.device, compile: bool = False,
                    amp_dtype: Optional[torch.dtype] = None, inputs: Optional[TeacherInputs] = None) -> InferenceTeacher:
    """The frozen ``model`` ready for fast forwards on ``device`` (see the module docstring), fed the
    student's batch converted by ``inputs`` (None: as it is)."""
    model = model.eval().requires_grad_(False)
    with torch.no_grad():
        fold_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last)
    unfuse_cpu_bf16_attention(model, device, amp_dtype)  # a transformer teacher (e.g. a DeiT)
    if compile:
        model = compile_or_eager(model, 'teacher')
    return InferenceTeacher(model, amp_dtype, inputs.to(device) if inputs is not None else None)
