"""Trajectory-matching unroll: iterations/s and peak memory, constant-memory vs naive autograd.

Each (method, syn_steps) runs in a fresh child process, so its peak RSS is its own. The naive
unroll (plain autograd through all steps) is the baseline measured in the same run; figures are
reported as ratios to it. The workload is one MTT iteration of the distiller: a ConvNet student
(width 128, instance norm) on a synthetic batch per step.

    python benchmarks/distill_speed.py                      # CIFAR-like 3x32x32, steps 10 and 30
    python benchmarks/distill_speed.py --steps 10 20 --batch 50 --json
    python benchmarks/distill_speed.py --cost-model       # why: the cost of one step's primitives

`--cost-model` times the primitives one unroll step is built of, as multiples of one plain gradient
(forward + backward): a gradient with its graph kept plus the double backward that gives the
Hessian-vector product and the image gradient (reverse over reverse, what naive autograd does for
every step), and the same by forward over reverse (`torch.func.jvp` of `torch.func.grad`). An exact
constant-memory method pays one extra plain gradient per step (the forward sweep that finds the
weights it recomputes from), so its best speed is rr / (1 + rr) of naive's when memory is no
bottleneck.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _child(method: str, steps: int, batch: int, size: int, channels: int, width: int, repeats: int,
           threads: int) -> dict:
    import torch

    from d3codec.distill.unroll import trajectory_match
    from d3codec.models.convnet import ConvNet, flatten_params, functional_forward, init_params

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    net = init_params(ConvNet(channels, 10, size, width=width), g)
    images = torch.randn(batch * 2, channels, size, size, generator=g).requires_grad_(True)
    labels = torch.arange(batch * 2) % 10
    start = flatten_params(net).detach()
    target = start + 0.01 * torch.randn(start.shape, generator=g)
    lr = torch.tensor(0.01)

    def step_loss(w: torch.Tensor, i: int) -> torch.Tensor:
        idx = torch.arange(i % 2, batch * 2, 2)
        return torch.nn.functional.cross_entropy(functional_forward(net, w, images[idx]), labels[idx])

    trajectory_match(step_loss, [images], start, target, lr, steps, method)  # warm-up
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for _ in range(repeats):
        images.grad = None
        trajectory_match(step_loss, [images], start, target, lr, steps, method)
    elapsed = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "syn_steps": steps, "it_per_s": repeats / elapsed,
            "peak_rss_mb": peak_kib / 1024, "rss_after_warmup_mb": rss_before / 1024}


def _cost_model(batch: int, size: int, channels: int, width: int, repeats: int, threads: int) -> dict:
    import torch
    from torch.func import grad, jvp

    from d3codec.models.convnet import ConvNet, flatten_params, functional_forward, init_params

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    net = init_params(ConvNet(channels, 10, size, width=width), g)
    x = torch.randn(batch, channels, size, size, generator=g)
    y = torch.arange(batch) % 10
    w0 = flatten_params(net).detach()
    lam = 1e-3 * torch.randn(w0.shape, generator=g)

    def loss(w: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_forward(net, w, xs), y)

    def plain() -> None:
        w = w0.clone().requires_grad_(True)
        torch.autograd.grad(loss(w, x), w)

    def rev_over_rev() -> None:
        w, xs = w0.clone().requires_grad_(True), x.clone().requires_grad_(True)
        (gw,) = torch.autograd.grad(loss(w, xs), w, create_graph=True)
        torch.autograd.grad(gw, [w, xs], grad_outputs=lam)

    both = grad(loss, argnums=(0, 1))

    def fwd_over_rev() -> None:
        jvp(both, (w0, x), (lam, torch.zeros_like(x)))

    def seconds(fn) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats

    times = {name: seconds(fn) for name, fn in
             (("grad", plain), ("rev_over_rev", rev_over_rev), ("fwd_over_rev", fwd_over_rev))}
    base = times["grad"]
    out = {f"{k}_s": v for k, v in times.items()}
    out.update({f"{k}_x_grad": v / base for k, v in times.items()})
    rr = out["rev_over_rev_x_grad"]
    out["best_exact_speed_vs_naive"] = rr / (1.0 + rr)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 30])
    ap.add_argument("--methods", nargs="+", default=["naive", "exact", "tesla"])
    ap.add_argument("--batch", type=int, default=50, help="synthetic images per unroll step")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--cost-model", action="store_true",
                    help="time one step's primitives (gradient, reverse/forward over reverse) instead")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    common = (args.batch, args.size, args.channels, args.width, args.repeats, args.threads)
    if args.cost_model:
        print(json.dumps(_cost_model(*common)))
        return
    if args.child:
        print(json.dumps(_child(args.child[0], int(args.child[1]), *common)))
        return
    rows = []
    for steps in args.steps:
        for method in args.methods:
            cmd = [sys.executable, __file__, "--child", method, str(steps), "--batch", str(args.batch),
                   "--size", str(args.size), "--channels", str(args.channels), "--width", str(args.width),
                   "--repeats", str(args.repeats), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    base = {r["syn_steps"]: r for r in rows if r["method"] == "naive"}
    for r in rows:
        b = base.get(r["syn_steps"])
        if b:
            r["speed_vs_naive"] = r["it_per_s"] / b["it_per_s"]
            r["memory_vs_naive"] = r["peak_rss_mb"] / b["peak_rss_mb"]
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(f"{'method':8} {'steps':>5} {'it/s':>8} {'peak MB':>8} {'speed x':>8} {'mem x':>6}")
    for r in rows:
        print(f"{r['method']:8} {r['syn_steps']:5d} {r['it_per_s']:8.3f} {r['peak_rss_mb']:8.0f} "
              f"{r.get('speed_vs_naive', float('nan')):8.2f} {r.get('memory_vs_naive', float('nan')):6.2f}")


if __name__ == "__main__":
    main()
