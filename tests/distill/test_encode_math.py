"""MMD and the trajectory-matching unroll: the numbers the distillation objective is built on."""
from __future__ import annotations

import pytest
import torch

from d3codec.distill.mmd import classwise_mmd, mmd2_unbiased
from d3codec.distill.unroll import trajectory_match
from d3codec.models.convnet import ConvNet, flatten_params, functional_forward, init_params


def test_mmd_separates_distributions_and_is_unbiased() -> None:
    g = torch.Generator().manual_seed(0)
    same = [float(mmd2_unbiased(torch.randn(40, 8, generator=g), torch.randn(50, 8, generator=g)))
            for _ in range(200)]
    mean_same = sum(same) / len(same)
    shifted = float(mmd2_unbiased(torch.randn(40, 8, generator=g), torch.randn(50, 8, generator=g) + 1.5))
    # Unbiased: same-distribution estimates average to ~0 (some are negative); a shift is far above.
    assert abs(mean_same) < 0.01
    assert min(same) < 0 < shifted
    assert shifted > 20 * max(abs(mean_same), 1e-4)


def test_mmd_gradient_pulls_samples_towards_target() -> None:
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(30, 4, generator=g) + 2).requires_grad_(True)
    y = torch.randn(30, 4, generator=g)
    opt = torch.optim.SGD([x], lr=1.0)
    before = float(mmd2_unbiased(x, y).detach())
    for _ in range(50):
        opt.zero_grad()
        mmd2_unbiased(x, y).backward()
        opt.step()
    assert float(mmd2_unbiased(x, y).detach()) < 0.5 * before


def test_classwise_mmd_compares_only_same_class() -> None:
    g = torch.Generator().manual_seed(2)
    real = torch.randn(40, 3, generator=g)
    real_labels = torch.arange(40) % 2
    syn = real.clone() + 0.01 * torch.randn(40, 3, generator=g)
    swapped = classwise_mmd(syn, 1 - real_labels, real + 3 * real_labels[:, None], real_labels)
    matched = classwise_mmd(syn + 3 * real_labels[:, None], real_labels, real + 3 * real_labels[:, None], real_labels)
    assert float(matched) < 0.05 < float(swapped)


def test_mmd_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        mmd2_unbiased(torch.zeros(1, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError):
        mmd2_unbiased(torch.zeros(4, 3), torch.zeros(5, 2))


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    net = init_params(ConvNet(1, 4, 8, width=8), g)
    images = torch.randn(16, 1, 8, 8, generator=g).requires_grad_(True)
    labels = torch.arange(16) % 4
    start = flatten_params(net).detach()
    target = start + 0.05 * torch.randn(start.shape, generator=g)

    def step_loss(w: torch.Tensor, i: int) -> torch.Tensor:
        idx = torch.arange(i % 2, 16, 2)
        return torch.nn.functional.cross_entropy(functional_forward(net, w, images[idx] * 1.0), labels[idx])

    return images, start, target, step_loss


@pytest.mark.parametrize("steps", [1, 4])
def test_exact_unroll_equals_naive_autograd(steps: int) -> None:
    images, start, target, step_loss = _problem()
    lr = torch.tensor(0.05)
    grads, lr_grads, losses = [], [], []
    for method in ("naive", "exact"):
        images.grad = None
        res = trajectory_match(step_loss, [images], start, target, lr, steps, method)
        grads.append(images.grad.clone())
        lr_grads.append(res.lr_grad)
        losses.append(res.loss)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    assert torch.allclose(lr_grads[0], lr_grads[1], rtol=1e-4, atol=1e-7)
    assert grads[0].abs().sum() > 0


def test_tesla_unroll_approximates_the_exact_gradient() -> None:
    images, start, target, step_loss = _problem(3)
    lr = torch.tensor(0.01)
    out = []
    for method in ("exact", "tesla"):
        images.grad = None
        trajectory_match(step_loss, [images], start, target, lr, 5, method)
        out.append(images.grad.flatten().clone())
    cos = torch.nn.functional.cosine_similarity(out[0], out[1], dim=0)
    assert cos > 0.95


def test_unroll_loss_is_one_at_zero_steps_of_progress() -> None:
    """With lr = 0 the student never moves: the normalised distance is exactly 1."""
    images, start, target, step_loss = _problem()
    res = trajectory_match(step_loss, [images], start, target, torch.tensor(0.0), 3, "exact")
    assert res.loss == pytest.approx(1.0)


def test_unroll_rejects_bad_arguments() -> None:
    images, start, target, step_loss = _problem()
    with pytest.raises(ValueError, match="method"):
        trajectory_match(step_loss, [images], start, target, torch.tensor(0.1), 2, "magic")
    with pytest.raises(ValueError, match="steps"):
        trajectory_match(step_loss, [images], start, target, torch.tensor(0.1), 0)
