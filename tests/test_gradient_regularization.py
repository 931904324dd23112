"""Gradient regularization by projection: what changes, what does not."""

import torch

from romebert.training.gradient_regularization import GradientProjector, project_conflicting, shared_encoder_weights
from romebert.training.model import MultiExitBert


def flat_dot(a, b):
    return sum((x * y).sum() for x, y in zip(a, b)).item()


def test_a_conflicting_gradient_loses_exactly_its_component_along_the_other():
    g_a = [torch.tensor([1.0, 0.0]), torch.tensor([[1.0]])]  # ||g_A||^2 = 2
    g_b = [torch.tensor([-2.0, 1.0]), torch.tensor([[0.5]])]  # <g_B, g_A> = -1.5
    assert project_conflicting(g_b, g_a)
    # g_B - (-1.5 / 2) g_A: orthogonal to g_A afterwards, not past it
    assert torch.equal(g_b[0], torch.tensor([-1.25, 1.0])) and torch.equal(g_b[1], torch.tensor([[1.25]]))
    assert flat_dot(g_b, g_a) == 0.0


def test_a_gradient_too_small_to_square_is_left_alone_rather_than_divided_by_zero():
    g_a = [torch.tensor([1e-30])]  # its square underflows to 0 in float32, the dot does not
    g_b = [torch.tensor([-1.0])]
    assert flat_dot(g_b, g_a) < 0
    assert not project_conflicting(g_b, g_a)
    assert torch.equal(g_b[0], torch.tensor([-1.0]))


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
    assert projected and (projector.projections, projector.steps) == (1, 1)
    norm_sq = flat_dot(g_a, g_a)
    for p, ga, gb in zip(params, g_a, g_b):  # g_A + (g_B - (<g_B, g_A> / ||g_A||^2) g_A)
        assert torch.allclose(p.grad, ga + gb - dot / norm_sq * ga, atol=1e-6)
    g_b_proj = [p.grad - ga for p, ga in zip(params, g_a)]
    assert abs(flat_dot(g_b_proj, g_a)) <= 1e-5 * abs(dot)  # orthogonal to g_A, not past it
    assert torch.allclose(model.layers[-1].output.dense.weight.grad, plain_other, atol=1e-6)
