"""Trajectory matching (MTT): unroll SGD of a student on synthetic data, compare with an expert.

The loss is ||w_N - w_target||^2 / ||w_0 - w_target||^2 after `N` steps
w_{i+1} = w_i - lr * grad l_i(w_i). Three ways to get its gradient w.r.t. the synthetic images
and the learnable step size `lr`:

- `naive`: plain autograd through all N steps (memory grows with N: every step's graph is kept).
- `exact` (default): reverse-mode adjoint with recomputation. A forward pass keeps only the flat
  weights w_i; the backward pass walks i = N-1..0, rebuilds step i's graph alone and applies
  lambda_i = lambda_{i+1} - lr * H_i lambda_{i+1} (Hessian-vector product by double backward).
  Same gradient as `naive` up to float rounding; activation memory is that of ONE step.
- `tesla`: TESLA's (Cui et al., 2023) constant-memory gradient, which drops the Hessian terms
  (each step's gradient is treated as depending on its own batch only, lambda_i = lambda_N), so
  the backward pass differentiates only w.r.t. the images: cheaper, and an approximation.
  (A finite-difference variant was tried and rejected: ReLU kinks make it wildly inaccurate.)

Both keep the N flat weight vectors (N x P floats, small next to activations).

A step's loss is a closure `step_loss(w, i) -> scalar` that reads the synthetic images from
leaf tensors (`inputs`) and must be deterministic in (w, i), since steps are recomputed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

StepLoss = Callable[[torch.Tensor, int], torch.Tensor]
METHODS = ("exact", "tesla", "naive")


@dataclass
class UnrollResult:
    """The matching loss (a float) and its gradients; input grads are also accumulated in `.grad`."""

    loss: float
    lr_grad: torch.Tensor
    start_distance: float


def _distance_terms(w_end: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    denom = (start - target).pow(2).sum()
    return (w_end - target).pow(2).sum() / denom, denom


def _accumulate(inputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    for x, g in zip(inputs, grads):
        if g is None:
            continue
        if x.grad is None:
            x.grad = g.detach().clone()
        else:
            x.grad.add_(g.detach())


def trajectory_match(step_loss: StepLoss, inputs: Sequence[torch.Tensor], start: torch.Tensor,
                     target: torch.Tensor, lr: torch.Tensor, steps: int, method: str = "exact",
                     ) -> UnrollResult:
    """Unroll `steps` SGD steps from `start`, return the normalised matching loss and gradients.

    `inputs` are leaf tensors (requires_grad) the closure reads; their `.grad` receives
    d loss / d input. `lr` is a scalar tensor; its gradient is returned (not accumulated).
    """
    if method not in METHODS:
        raise ValueError(f"unroll method must be one of {METHODS}, got {method!r}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    start, target = start.detach(), target.detach()
    if method == "naive":
        return _naive(step_loss, inputs, start, target, lr, steps)
    lr_value = lr.detach()
    # Forward: first-order steps without graphs; keep the weights (exact) or nothing (tesla).
    weights: list[torch.Tensor] = []
    grad_sum = torch.zeros_like(start)
    w = start
    for i in range(steps):
        w_req = w.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(step_loss(w_req, i), w_req)
        weights.append(w)
        grad_sum += g
        w = (w - lr_value * g).detach()
    loss, denom = _distance_terms(w, start, target)
    lam = 2.0 * (w - target) / denom  # dL/dw_N
    lr_grad = torch.zeros((), dtype=start.dtype, device=start.device)
    if method == "exact":
        for i in reversed(range(steps)):
            w_req = weights[i].detach().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(step_loss(w_req, i), w_req, create_graph=True)
                # d/d(w_i, X): -lr * lam . g_i ; w_{i+1} = w_i - lr g_i.
                lr_grad -= (lam * g.detach()).sum()
                outs = torch.autograd.grad(g, [w_req, *inputs], grad_outputs=lam, allow_unused=True)
            hvp, x_grads = outs[0], outs[1:]
            _accumulate(inputs, [None if gx is None else -lr_value * gx for gx in x_grads])
            lam = lam - lr_value * hvp
            weights[i] = None  # type: ignore[call-overload]  # free as we go
    else:  # tesla: lam stays dL/dw_N; d w_N / d X_i = -lr d g_i / d X_i (Hessian path dropped)
        lr_grad = -(lam * grad_sum).sum()
        for i in range(steps):
            w_req = weights[i].detach().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(step_loss(w_req, i), w_req, create_graph=True)
                x_grads = torch.autograd.grad(g, list(inputs), grad_outputs=lam, allow_unused=True)
            _accumulate(inputs, [None if gx is None else -lr_value * gx for gx in x_grads])
            weights[i] = None  # type: ignore[call-overload]
    return UnrollResult(loss=float(loss), lr_grad=lr_grad.detach(), start_distance=float(denom))


def _naive(step_loss: StepLoss, inputs: Sequence[torch.Tensor], start: torch.Tensor,
           target: torch.Tensor, lr: torch.Tensor, steps: int) -> UnrollResult:
    """Plain autograd through every step: the memory-hungry reference."""
    lr_leaf = lr.detach().requires_grad_(True)
    with torch.enable_grad():
        w = start.clone().requires_grad_(True)
        for i in range(steps):
            (g,) = torch.autograd.grad(step_loss(w, i), w, create_graph=True)
            w = w - lr_leaf * g
        loss, denom = _distance_terms(w, start, target)
        grads = torch.autograd.grad(loss, [lr_leaf, *inputs], allow_unused=True)
    _accumulate(inputs, grads[1:])
    return UnrollResult(loss=float(loss.detach()), lr_grad=grads[0].detach(), start_distance=float(denom.detach()))
