"""The RomeBERT objective, checked against a hand computation on fixed logits."""

import math

import torch

from romebert.training.losses import distillation_kl, early_exits_loss, final_exit_loss, romebert_losses


def ce(logits, label):
    return math.log(sum(math.exp(v) for v in logits)) - logits[label]


def softmax(logits, t=1.0):
    e = [math.exp(v / t) for v in logits]
    return [x / sum(e) for x in e]


def test_romebert_loss_matches_hand_computation():
    z = torch.tensor([[[2.0, -1.0], [0.5, 0.5]], [[1.0, 3.0], [-2.0, 1.0]]])  # (L=2, B=2, C=2)
    y = torch.tensor([0, 1])
    gamma, t = 0.9, 3.0
    exits, final = romebert_losses(z, y, gamma, t, kl_reduction="batchmean")

    final_hand = (ce([1.0, 3.0], 0) + ce([-2.0, 1.0], 1)) / 2
    ce_exit = (ce([2.0, -1.0], 0) + ce([0.5, 0.5], 1)) / 2
    kl = 0.0
    for student, teacher in (([2.0, -1.0], [1.0, 3.0]), ([0.5, 0.5], [-2.0, 1.0])):
        p, q = softmax(teacher, t), softmax(student, t)
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    kl /= 2  # batchmean: summed over classes, averaged over the batch
    assert math.isclose(final.item(), final_hand, rel_tol=1e-6)
    assert math.isclose(exits.item(), (1 - gamma) * ce_exit + gamma * t * t * kl, rel_tol=1e-6)


def test_teacher_gets_no_gradient_from_distillation():
    student = torch.randn(4, 3, requires_grad=True)
    teacher = torch.randn(4, 3, requires_grad=True)
    distillation_kl(student, teacher, 3.0).backward()
    assert teacher.grad is None
    assert student.grad.abs().sum() > 0


def test_gamma_zero_is_plain_cross_entropy_on_every_exit():
    z = torch.randn(3, 5, 4)
    y = torch.randint(0, 4, (5,))
    exits, final = romebert_losses(z, y, gamma=0.0, temperature=3.0, kl_reduction="mean")
    assert torch.allclose(exits, early_exits_loss(z, y))
    assert torch.allclose(final, final_exit_loss(z, y))


def test_the_reference_kl_reduction_is_the_true_kl_divided_by_the_number_of_labels():
    student, teacher = torch.randn(5, 4), torch.randn(5, 4)
    true_kl = distillation_kl(student, teacher, 3.0)
    assert torch.allclose(distillation_kl(student, teacher, 3.0, "mean"), true_kl / 4)
