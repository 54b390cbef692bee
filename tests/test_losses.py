import math

import pytest
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from losses import DistillationLoss, build_criterion, check_loss_flags
from utils import UserError


class FixedTeacher(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits


STUDENT_CLS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
STUDENT_DIST = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
TEACHER = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.5]])
LABELS = torch.tensor([0, 1])


def log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def ce(rows, labels):
    return sum(-log_softmax(r)[y] for r, y in zip(rows, labels)) / len(rows)


def make(kind, alpha=0.5, tau=1.0):
    return DistillationLoss(torch.nn.CrossEntropyLoss(), FixedTeacher(TEACHER), kind, alpha, tau)


def test_none_uses_only_the_class_head():
    loss = make('none')(None, (STUDENT_CLS, STUDENT_DIST), LABELS)
    assert math.isclose(loss.item(), ce(STUDENT_CLS.tolist(), [0, 1]), rel_tol=1e-6)


def test_hard_distillation_against_hand_computation():
    alpha = 0.3
    loss = make('hard', alpha=alpha)(None, (STUDENT_CLS, STUDENT_DIST), LABELS)
    teacher_labels = [1, 0]  # argmax of each teacher row
    expected = (1 - alpha) * ce(STUDENT_CLS.tolist(), [0, 1]) + alpha * ce(STUDENT_DIST.tolist(), teacher_labels)
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)


def test_soft_distillation_against_hand_computation():
    alpha, tau = 0.5, 2.0
    loss = make('soft', alpha=alpha, tau=tau)(None, (STUDENT_CLS, STUDENT_DIST), LABELS)
    kl = 0.0
    for s_row, t_row in zip(STUDENT_DIST.tolist(), TEACHER.tolist()):
        log_s = log_softmax([v / tau for v in s_row])
        log_t = log_softmax([v / tau for v in t_row])
        kl += sum(math.exp(lt) * (lt - ls) for ls, lt in zip(log_s, log_t))
    distill = kl * tau * tau / STUDENT_DIST.numel()
    expected = (1 - alpha) * ce(STUDENT_CLS.tolist(), [0, 1]) + alpha * distill
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)


def test_classic_distillation_uses_the_class_head():
    alpha = 0.3
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), FixedTeacher(TEACHER), 'hard', alpha, 1.0,
                            distillation_token=False)(None, STUDENT_CLS, LABELS)
    expected = (1 - alpha) * ce(STUDENT_CLS.tolist(), [0, 1]) + alpha * ce(STUDENT_CLS.tolist(), [1, 0])
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)


def test_distillation_needs_a_distillation_head():
    try:
        make('hard')(None, STUDENT_CLS, LABELS)
    except ValueError as e:
        assert 'distilled' in str(e)
    else:
        raise AssertionError('a single-head output was accepted for hard distillation')


def bce(rows, targets):
    """Binary cross-entropy with logits, averaged over every logit."""
    terms = [t * math.log1p(math.exp(-x)) + (1 - t) * math.log1p(math.exp(x))
             for row, target in zip(rows, targets) for x, t in zip(row, target)]
    return sum(terms) / len(terms)


MIXED = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.1, 0.9]])  # soft targets, as after Mixup
BINARY = [[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]  # every class present in the mix counts 1


def criterion(**flags):
    settings = dict(cosub=False, bce_loss=False, mixup=True, smoothing=0.1, teacher=None,
                    distillation_type='none', alpha=0.5, tau=1.0, distillation_token=True)
    return build_criterion(**{**settings, **flags})


def test_bce_loss_learns_from_the_mixed_targets_binarised():
    loss = criterion(bce_loss=True)(None, STUDENT_CLS, MIXED)
    assert math.isclose(loss.item(), bce(STUDENT_CLS.tolist(), BINARY), rel_tol=1e-6)


def test_cosub_with_bce_loss_binarises_the_labels_not_the_other_halfs_predictions():
    a, b = STUDENT_CLS, STUDENT_DIST
    loss = criterion(cosub=True, bce_loss=True)(None, torch.cat((a, b)), MIXED)
    expected = (bce(a.tolist(), BINARY) + bce(b.tolist(), BINARY)
                + bce(a.tolist(), b.sigmoid().tolist()) + bce(b.tolist(), a.sigmoid().tolist())) / 4
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)


def test_cosub_runs_the_model_on_the_batch_twice():
    images = torch.randn(2, 3, 4, 4)
    assert torch.equal(criterion(cosub=True).model_inputs(images), torch.cat((images, images)))
    assert criterion().model_inputs(images) is images


@pytest.mark.parametrize('flags, base', [
    (dict(mixup=True), SoftTargetCrossEntropy),  # Mixup smooths the targets itself
    (dict(mixup=False, smoothing=0.1), LabelSmoothingCrossEntropy),
    (dict(mixup=False, smoothing=0.0), torch.nn.CrossEntropyLoss),
])
def test_the_base_criterion_follows_mixup_and_smoothing(flags, base):
    built = criterion(**flags)
    assert isinstance(built, DistillationLoss) and type(built.base_criterion) is base


@pytest.mark.parametrize('flags, fragment', [
    (dict(bce_loss=True, cosub=False, mixup=False, distillation_type='none'), '--bce-loss needs soft targets'),
    (dict(bce_loss=False, cosub=True, mixup=False, distillation_type='none'), 'enable --mixup or --cutmix'),
    (dict(bce_loss=False, cosub=True, mixup=True, distillation_type='hard'), 'drop --distillation-type or --cosub'),
])
def test_loss_flags_that_cannot_work_together_are_refused(flags, fragment):
    with pytest.raises(UserError, match=fragment):
        check_loss_flags(**flags)
    check_loss_flags(**{**flags, 'mixup': True, 'distillation_type': 'none'})  # the fix named is enough
