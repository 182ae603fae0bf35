"""The distillation objectives on their own (`distill/objectives.py`, `mmd.grouped_mmd`): explicit
networks and tensors in, a loss (and gradients) out, no `Distiller`."""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from d3codec.distill.mmd import grouped_mmd, mmd2_unbiased
from d3codec.distill.objectives import FeatureView, feature_mmd, feature_params, named_params, trajectory_loss
from d3codec.models.convnet import ConvNet, flatten_params, functional_forward, init_params


def _net(seed: int = 0) -> ConvNet:
    return init_params(ConvNet(1, 4, 8, width=8), torch.Generator().manual_seed(seed))


# ---- MMD ----

def test_grouped_mmd_is_the_sum_of_the_classes_terms_and_skips_classes_under_two_real_rows() -> None:
    g = torch.Generator().manual_seed(0)
    syn = torch.randn(9, 5, generator=g)  # 3 classes x 3 samples
    real = torch.randn(2 + 1 + 4, 5, generator=g)  # class 1 has one real row: it adds nothing
    got = grouped_mmd(syn, real, 3, [2, 1, 4])
    want = mmd2_unbiased(syn[0:3], real[0:2]) + mmd2_unbiased(syn[6:9], real[3:7])
    assert got.shape == () and got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


def test_grouped_mmd_of_classes_without_two_real_rows_is_a_constant_zero() -> None:
    syn = torch.randn(4, 3, requires_grad=True)
    out = grouped_mmd(syn, torch.randn(2, 3), 2, [1, 1])
    assert float(out) == 0.0 and not out.requires_grad


def test_feature_params_drive_the_feature_view_as_the_network_itself() -> None:
    net = _net()
    view = FeatureView(net)
    params = feature_params(net, flatten_params(net).detach())
    assert set(params) == {name for name, _ in view.named_parameters()}
    assert set(named_params(net, flatten_params(net))) == {name for name, _ in net.named_parameters()}
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(functional_call(view, params, (x,)), net.features(x))


def test_feature_mmd_is_positive_and_falls_as_the_synthetic_set_approaches_the_real_one() -> None:
    net = _net(2)
    view = FeatureView(net)
    params = feature_params(net, flatten_params(net).detach())
    g = torch.Generator().manual_seed(3)
    real = torch.randn(2 * 24, 1, 8, 8, generator=g)
    other = torch.randn(2 * 24, 1, 8, 8, generator=g)  # same distribution, other draws
    values = [float(feature_mmd(view, params, other + shift, real, 24, [24, 24])) for shift in (3.0, 1.5, 0.5, 0.0)]
    assert values[0] > values[1] > values[2] > values[3]
    assert values[0] > 0 and abs(values[3]) < 0.1 * values[0]


def test_feature_mmd_differentiates_the_synthetic_images_only() -> None:
    net = _net(4)
    params = feature_params(net, flatten_params(net).detach())
    g = torch.Generator().manual_seed(5)
    syn = (torch.randn(6, 1, 8, 8, generator=g) + 1.0).requires_grad_(True)
    real = torch.randn(6, 1, 8, 8, generator=g).requires_grad_(True)
    loss = feature_mmd(FeatureView(net), params, syn, real, 3, [3, 3])
    loss.backward()
    assert syn.grad is not None and syn.grad.shape == syn.shape and syn.grad.abs().sum() > 0
    assert real.grad is None


# ---- trajectory matching ----

def _mtt_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    net = _net(seed)
    images = torch.randn(16, 1, 8, 8, generator=g).requires_grad_(True)
    labels = torch.arange(16) % 4
    start = flatten_params(net).detach()
    batches = [torch.arange(i % 2, 16, 2) for i in range(3)]
    return net, images, labels, start, batches


def _sgd(net, images, labels, start, batches, lr: float) -> torch.Tensor:
    """The student's weights after plain SGD on `batches`: where the synthetic trajectory lands."""
    w = start.clone()
    for idx in batches:
        w_req = w.detach().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(functional_forward(net, w_req, images.detach()[idx]), labels[idx])
        (grad,) = torch.autograd.grad(loss, w_req)
        w = (w - lr * grad).detach()
    return w


@pytest.mark.parametrize("method", ["exact", "tesla", "naive"])
def test_trajectory_loss_is_zero_when_the_student_lands_on_the_target(method: str) -> None:
    net, images, labels, start, batches = _mtt_problem()
    target = _sgd(net, images, labels, start, batches, 0.1)
    res = trajectory_loss(net, images, labels, start, target, torch.tensor(0.1), batches, method=method)
    assert res.loss == pytest.approx(0.0, abs=1e-9)
    assert res.start_distance > 0


def test_trajectory_loss_is_one_when_the_student_does_not_move_and_positive_off_target() -> None:
    net, images, labels, start, batches = _mtt_problem(1)
    target = _sgd(net, images, labels, start, batches, 0.1)
    still = trajectory_loss(net, images, labels, start, target, torch.tensor(0.0), batches)
    assert still.loss == pytest.approx(1.0)
    images.grad = None
    short = trajectory_loss(net, images, labels, start, target, torch.tensor(0.05), batches)
    assert 0.0 < short.loss < 1.0


def test_trajectory_loss_gradients_have_the_inputs_shapes_and_dtypes() -> None:
    net, images, labels, start, batches = _mtt_problem(2)
    target = start + 0.05 * torch.randn(start.shape, generator=torch.Generator().manual_seed(9))
    res = trajectory_loss(net, images, labels, start, target, torch.tensor(0.05), batches)
    assert isinstance(res.loss, float) and res.loss > 0
    assert images.grad is not None and images.grad.shape == images.shape and images.grad.dtype == torch.float32
    assert images.grad.abs().sum() > 0
    assert res.lr_grad.shape == () and res.lr_grad.dtype == torch.float32


def test_trajectory_loss_augments_each_step_with_its_seed() -> None:
    net, images, labels, start, batches = _mtt_problem(3)
    target = _sgd(net, images, labels, start, batches, 0.1)
    seen: list[int] = []

    def augment(x: torch.Tensor, seed: int) -> torch.Tensor:
        seen.append(seed)
        return x.flip(-1)

    res = trajectory_loss(net, images, labels, start, target, torch.tensor(0.1), batches, augment=augment,
                          seeds=[7, 8, 9], method="exact")
    assert seen[:3] == [7, 8, 9]  # the forward pass, in step order (the backward pass replays them)
    assert res.loss > 1e-6  # flipped images do not retrace the unflipped trajectory
    with pytest.raises(ValueError, match="seed per step"):
        trajectory_loss(net, images, labels, start, target, torch.tensor(0.1), batches, augment=augment, seeds=[1])
