"""Gradient regularization (GR) by projection, as RomeBERT's released scripts run it.

A = the early exits' losses, B = the final exit's CE. Over the shared encoder weight matrices
(layers 1..L-1, LayerNorm and biases excluded), if <g_B, g_A> < 0 the final exit's gradient loses
its component against the exits' gradient:  g_B <- g_B - (<g_B, g_A> / ||g_A||^2) g_A.
The update uses g_A + g_B there and the plain sum everywhere else.

Unlike the reference (CUDA only, wrong under gradient accumulation), g_A and g_B are accumulated
separately over micro-batches and projected once per optimizer step, on any device: the
projection then acts on the gradient of the whole effective batch.
"""

from __future__ import annotations

import torch
from torch import nn


def shared_encoder_weights(model: nn.Module) -> list[nn.Parameter]:
    """Weight matrices of encoder layers 1..L-1 (0-based 0..L-2): where the exits and the final exit meet."""
    params = []
    for layer in model.layers[:-1]:
        for name, p in layer.named_parameters():
            if p.requires_grad and p.dim() >= 2 and "LayerNorm" not in name:
                params.append(p)
    return params


def project_conflicting(g_b: list[torch.Tensor], g_a: list[torch.Tensor]) -> bool:
    """Project g_B (in place) off g_A when they conflict; return whether a projection happened."""
    dot = sum((b * a).sum() for b, a in zip(g_b, g_a))
    if dot >= 0:
        return False
    norm_sq = sum((a * a).sum() for a in g_a)
    if norm_sq == 0:
        return False
    coeff = dot / norm_sq
    for b, a in zip(g_b, g_a):
        b.sub_(coeff * a)
    return True


class GradientProjector:
    """Keeps g_A and g_B of the shared weights apart across the micro-batches of one step.

    Use: after A.backward(retain_graph=True) call take_exits(); after B.backward() call
    take_final(); before clipping call apply(), which writes g_A + proj(g_B) into .grad.
    """

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.g_a = [torch.zeros_like(p) for p in params]
        self.g_b = [torch.zeros_like(p) for p in params]
        self.projections = 0
        self.steps = 0

    def _take(self, into: list[torch.Tensor]) -> None:
        for acc, p in zip(into, self.params):
            if p.grad is not None:
                acc.add_(p.grad)
                p.grad = None

    def take_exits(self) -> None:
        self._take(self.g_a)

    def take_final(self) -> None:
        self._take(self.g_b)

    def buffers(self) -> list[torch.Tensor]:
        return self.g_a + self.g_b

    def apply(self) -> bool:
        projected = project_conflicting(self.g_b, self.g_a)
        self.projections += int(projected)
        self.steps += 1
        for p, a, b in zip(self.params, self.g_a, self.g_b):
            p.grad = a + b
            a.zero_()
            b.zero_()
        return projected
