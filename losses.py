"""Every training criterion: built by ``build_criterion`` from the command line, checked by ``check_loss_flags``.

A criterion is called as ``criterion(inputs, outputs, labels)`` on the batch after mixup, with the model's
outputs for ``criterion.model_inputs(inputs)`` (the batch itself, or what the loss needs the model to see,
e.g. the batch twice for --cosub). To add a loss: subclass ``Criterion`` here (or pass a plain
``loss(outputs, labels)`` as the base of ``DistillationLoss``), add its flag to main.get_args_parser,
its choice to ``build_criterion`` and any flag it cannot combine with to ``check_loss_flags``.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from utils import UserError

DISTILLATION_TYPES = ('none', 'soft', 'hard')


def check_loss_flags(bce_loss: bool, cosub: bool, mixup: bool, distillation_type: str) -> None:
    """Refuse loss flags that cannot work together (``mixup``: mixup or cutmix is on)."""
    if bce_loss and not mixup:
        raise UserError('--bce-loss needs soft targets: enable --mixup or --cutmix')
    if cosub and not mixup:
        raise UserError('--cosub learns from soft targets (binary cross-entropy): enable --mixup or --cutmix')
    if cosub and distillation_type != 'none':
        raise UserError('--cosub trains without a teacher: drop --distillation-type or --cosub')


def build_criterion(cosub: bool, bce_loss: bool, mixup: bool, smoothing: float,
                    teacher: Optional[torch.nn.Module], distillation_type: str, alpha: float, tau: float,
                    distillation_token: bool) -> 'Criterion':
    """The criterion of the command line, as the original DeiT builds it.

    --bce-loss, like the original, trains on mixed targets binarised (every class present in the mix
    counts 1), also under --cosub; without mixup the labels are smoothed by the loss itself.
    """
    if cosub:
        return CoSubLoss(binary_labels=bce_loss)  # the original ignores the other loss settings with --cosub
    if bce_loss:
        base = BinaryCrossEntropy(smoothing=0.0, target_threshold=0.0)
    elif mixup:
        base = SoftTargetCrossEntropy()  # targets are already smoothed by Mixup
    elif smoothing > 0:
        base = LabelSmoothingCrossEntropy(smoothing=smoothing)
    else:
        base = torch.nn.CrossEntropyLoss()
    return DistillationLoss(base, teacher, distillation_type, alpha, tau, distillation_token=distillation_token)


class Criterion(torch.nn.Module):
    """What engine.train_one_epoch calls: ``forward(inputs, outputs, labels)`` returns the scalar loss of
    the model's ``outputs`` for ``model_inputs(inputs)``."""

    def model_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """The batch the model runs on: ``inputs`` unless the loss needs more."""
        return inputs


class DistillationLoss(Criterion):
    """``(1 - alpha) * base(cls logits, labels) + alpha * distillation(dist logits, teacher)``.

    With ``distillation_token=False`` (a model without distillation head) the distillation term
    applies to the class-head logits, the paper's "usual distillation" rows of Table 3.

    soft: KL(student / tau || teacher / tau) * tau^2, summed and divided by the number of logits;
    hard: cross-entropy of the student against the teacher's argmax.
    The teacher sees the same (mixed-up) inputs as the student, in eval mode and without gradients.
    """

    def __init__(self, base_criterion: torch.nn.Module, teacher_model: torch.nn.Module,
                 distillation_type: str, alpha: float, tau: float, distillation_token: bool = True):
        super().__init__()
        self.distillation_token = distillation_token
        if distillation_type not in DISTILLATION_TYPES:
            raise ValueError(f'distillation_type must be one of {DISTILLATION_TYPES}, got {distillation_type}')
        self.base_criterion = base_criterion
        self.teacher_model = teacher_model
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau

    def forward(self, inputs: torch.Tensor, outputs, labels: torch.Tensor) -> torch.Tensor:
        """``outputs`` is the student's logits, or its ``(cls, dist)`` pair for a distilled model."""
        outputs_kd = None
        if not isinstance(outputs, torch.Tensor):
            outputs, outputs_kd = outputs
        base_loss = self.base_criterion(outputs, labels)
        if self.distillation_type == 'none':
            return base_loss
        if outputs_kd is None:
            if self.distillation_token:
                raise ValueError('distillation through the token needs (cls, dist) logits: use a '
                                 '*_distilled_* model, or distillation_token=False to distil into the class head')
            outputs_kd = outputs  # the paper's "usual distillation": both terms on the class head

        with torch.no_grad():
            teacher_outputs = self.teacher_model(inputs)

        if self.distillation_type == 'soft':
            T = self.tau
            distillation_loss = F.kl_div(
                F.log_softmax(outputs_kd / T, dim=1),
                F.log_softmax(teacher_outputs / T, dim=1),
                reduction='sum', log_target=True,
            ) * (T * T) / outputs_kd.numel()
        else:
            distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))

        return base_loss * (1 - self.alpha) + distillation_loss * self.alpha


class CoSubLoss(Criterion):
    """Co-training with sub-models (DeiT III, ``--cosub``): binary cross-entropy, four terms.

    The batch goes through the model twice (``model_inputs``), so the two halves of ``outputs`` are
    two sub-models of the same network (independent drop-path masks) on the same images. Each half
    learns from the labels and from the other half's sigmoid predictions, taken as fixed targets:

        loss = (BCE(a, y) + BCE(b, y) + BCE(a, sigmoid(b)) + BCE(b, sigmoid(a))) / 4

    With ``binary_labels`` (--bce-loss) the labels' mixed targets are binarised first, as the original does.
    """

    def __init__(self, binary_labels: bool = False):
        super().__init__()
        self.bce = torch.nn.BCEWithLogitsLoss()
        self.binary_labels = binary_labels

    def model_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs`` twice, one after the other."""
        return torch.cat((inputs, inputs), dim=0)

    def forward(self, inputs: torch.Tensor, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``outputs``: logits of the duplicated batch; ``labels``: soft targets of one copy."""
        if self.binary_labels:
            labels = labels.gt(0.0).type(labels.dtype)
        first, second = outputs.chunk(2, dim=0)
        return 0.25 * (self.bce(first, labels) + self.bce(second, labels)
                       + self.bce(first, second.detach().sigmoid()) + self.bce(second, first.detach().sigmoid()))
