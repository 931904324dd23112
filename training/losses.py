"""The training objectives of RomeBERT, DeeBERT and plain fine-tuning, on (L, B, C) exit logits.

RomeBERT (romebert.md), with sg() = detach, gamma = 0.9 and T = 3.0 by default:

    L = CE(z_L, y) + sum_{i<L} [(1 - gamma) CE(z_i, y) + gamma T^2 KL(softmax(sg(z_L)/T) || softmax(z_i/T))]

Two reductions of the KL: "batchmean" sums over classes and averages over the batch, the
definition of a KL divergence between per-sample distributions; "mean" is the reference code's
nn.KLDivLoss() default, element-wise, which also divides by the number of classes C and so
weakens the distillation term by 1/C. The default is "mean": on this backbone the weaker
distillation keeps fine-tuning's final exit and lifts the early ones more (the recipe search in
docs/training.md: dev at full depth 82.9 against 79.2 with "batchmean"). It is a choice made on
dev, not a bug kept for compatibility; for another number of labels it weakens the term by 1/C.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


KL_REDUCTIONS = ("batchmean", "mean")


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, reduction: str = "batchmean") -> torch.Tensor:
    """KL(softmax(sg(teacher)/T) || softmax(student/T)): summed over classes and averaged over the
    batch ("batchmean"), or the reference code's element-wise "mean" (that, divided by C)."""
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, not {reduction!r}")
    kl = F.kl_div(
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher.detach() / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    # "mean" written out rather than asked of torch, whose element-wise mean is announced to
    # become batchmean in a future release.
    return kl / student.shape[-1] if reduction == "mean" else kl


def romebert_losses(
    exit_logits: torch.Tensor, labels: torch.Tensor, gamma: float, temperature: float, kl_reduction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B): A = the early exits' losses (i < L) with self-distillation, B = the final exit's CE.

    They are returned apart because gradient regularization needs the gradient of each. No
    defaults here: the training config (train.py) is the one place that holds them.
    """
    final = exit_logits[-1]
    loss_final = F.cross_entropy(final, labels)
    loss_exits = final.new_zeros(())
    for z in exit_logits[:-1]:
        loss_exits = loss_exits + (1 - gamma) * F.cross_entropy(z, labels)
        if gamma > 0:
            loss_exits = loss_exits + gamma * temperature**2 * distillation_kl(z, final, temperature, kl_reduction)
    return loss_exits, loss_final


def final_exit_loss(exit_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain fine-tuning and DeeBERT stage 1: only the last exit learns."""
    return F.cross_entropy(exit_logits[-1], labels)


def early_exits_loss(exit_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """DeeBERT stage 2: sum of the early exits' cross-entropies (backbone and final exit frozen)."""
    return sum(F.cross_entropy(z, labels) for z in exit_logits[:-1])
