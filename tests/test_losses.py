import math

import torch

from losses import DistillationLoss


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
