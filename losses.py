"""Knowledge distillation through the distillation token (DeiT, section 4)."""
import torch
import torch.nn.functional as F

DISTILLATION_TYPES = ('none', 'soft', 'hard')


class DistillationLoss(torch.nn.Module):
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


class CoSubLoss(torch.nn.Module):
    """Co-training with sub-models (DeiT III, ``--cosub``): binary cross-entropy, four terms.

    The batch goes through the model twice (``duplicate``), so the two halves of ``outputs`` are
    two sub-models of the same network (independent drop-path masks) on the same images. Each half
    learns from the labels and from the other half's sigmoid predictions, taken as fixed targets:

        loss = (BCE(a, y) + BCE(b, y) + BCE(a, sigmoid(b)) + BCE(b, sigmoid(a))) / 4
    """

    def __init__(self):
        super().__init__()
        self.bce = torch.nn.BCEWithLogitsLoss()

    @staticmethod
    def duplicate(samples: torch.Tensor) -> torch.Tensor:
        """The batch that the model sees: ``samples`` twice, one after the other."""
        return torch.cat((samples, samples), dim=0)

    def forward(self, inputs: torch.Tensor, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``outputs``: logits of the duplicated batch; ``labels``: soft targets of one copy."""
        first, second = outputs.chunk(2, dim=0)
        return 0.25 * (self.bce(first, labels) + self.bce(second, labels)
                       + self.bce(first, second.detach().sigmoid()) + self.bce(second, first.detach().sigmoid()))
