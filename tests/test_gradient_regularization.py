"""Gradient regularization by projection: what changes, what does not."""

import torch

from romebert.training.gradient_regularization import GradientProjector, project_conflicting, shared_encoder_weights
from romebert.training.model import MultiExitBert


def flat_dot(a, b):
    return sum((x * y).sum() for x, y in zip(a, b)).item()


def test_conflicting_gradient_is_projected_to_non_negative_dot():
    g_a = [torch.tensor([1.0, 0.0]), torch.tensor([[1.0]])]
    g_b = [torch.tensor([-2.0, 1.0]), torch.tensor([[0.5]])]
    assert flat_dot(g_b, g_a) < 0
    assert project_conflicting(g_b, g_a)
    assert flat_dot(g_b, g_a) >= -1e-6
    # the component orthogonal to g_A is untouched
    assert torch.allclose(g_b[0][1], torch.tensor(1.0))


def test_agreeing_gradient_is_left_unchanged():
    g_a = [torch.tensor([1.0, 2.0])]
    g_b = [torch.tensor([0.5, 0.1])]
    before = g_b[0].clone()
    assert not project_conflicting(g_b, g_a)
    assert torch.equal(g_b[0], before)


def test_shared_set_is_weight_matrices_of_layers_before_the_last(tiny_backbone):
    model = MultiExitBert.from_backbone(tiny_backbone, ["a", "b"])
    shared = {id(p) for p in shared_encoder_weights(model)}
    names = [n for n, p in model.named_parameters() if id(p) in shared]
    assert names and all(n.startswith(("layers.0.", "layers.1.")) for n in names)
    assert not any("LayerNorm" in n or n.endswith("bias") for n in names)


def test_projector_writes_projected_sum_into_shared_and_plain_sum_elsewhere(tiny_backbone):
    torch.manual_seed(0)
    model = MultiExitBert.from_backbone(tiny_backbone, ["a", "b"])
    model.eval()
    params = shared_encoder_weights(model)
    ids = torch.randint(1000, 2000, (4, 7))
    mask = torch.ones_like(ids)
    y = torch.tensor([0, 1, 0, 1])

    def losses():
        z = model(ids, mask)
        a = sum(torch.nn.functional.cross_entropy(zi, y) for zi in z[:-1])
        b = torch.nn.functional.cross_entropy(z[-1], 1 - y)  # opposite labels: conflict likely
        return a, b

    a, b = losses()
    g_a = torch.autograd.grad(a, params, retain_graph=True)
    g_b = [g.clone() for g in torch.autograd.grad(b, params, retain_graph=True)]
    plain_other = torch.autograd.grad(a + b, [model.layers[-1].output.dense.weight])[0]
    dot = flat_dot(g_b, g_a)
    assert dot < 0, "the fixture should produce conflicting gradients"
    projector = GradientProjector(params)
    a, b = losses()
    a.backward(retain_graph=True)
    projector.take_exits()
    b.backward()
    projector.take_final()
    projected = projector.apply()
    assert projected
    g_b_proj = [p.grad - ga for p, ga in zip(params, g_a)]
    assert flat_dot(g_b_proj, g_a) >= -1e-5 * max(1.0, abs(dot))
    assert torch.allclose(model.layers[-1].output.dense.weight.grad, plain_other, atol=1e-6)
