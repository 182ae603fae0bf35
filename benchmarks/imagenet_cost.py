"""ImageNet-1K on GPUs, derived (not measured): the federated plan the encoder makes for the real
CUDA settings, the FLOPs of each unit of work counted on the real code, and the wall time of the
run on G GPUs at a stated sustained throughput, with the encoder's own schedule of ranks.

Units are counted with `torch.utils.flop_counter.FlopCounterMode` (matmuls and convolutions,
forward, backward and the double backward of the exact unroll; norms and element-wise ops are not
counted, they are in the sustained fraction) on CPU at small sizes, then scaled linearly:
- an expert's SGD step, per image (ConvNet-D4 width 128 at 64 px, 1,000 classes);
- a fit step, per target (decode, MSE, backward through decoder and latents);
- MTT, per decoded image (decoder forward + backward) and per image-step of the unroll;
- MMD, per decoded sample (decoder + features, backward) and per real image (features, no grad).
Every count is printed, so a change of the defaults (fit length, samples per class, iterations,
experts, epochs) only needs a rerun, or the arithmetic redone by hand from the printed units.

Memory per GPU is derived from the bytes autograd saves per image (counted with saved-tensor hooks).

    python benchmarks/imagenet_cost.py --data-dir DIR [--cache-dir C --budget 2ipc --subtasks 2 --gpus 8
                                        --images 1281167 --tflops 74]

DIR: a 1,000-class ImageFolder (`train/<wnid>/`) at the resolution to cost (64x64 for the paper's
setting); it gives the planner the class count and shape, and the units their image size (the image
counts in the schedule are `--images`, spread evenly over the classes). Its smallest class caps K.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import replace
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

#: H100 SXM dense peaks (NVIDIA datasheet), TFLOPS.
H100_PEAK = {"tf32": 494.0, "bf16": 989.0, "fp32": 67.0}


def flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` (matmuls and convolutions, forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes autograd saves for backward during one call of `fn` (the activations kept)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def expert_units(classes: int, shape: tuple[int, int, int], batch: int = 4) -> tuple[float, float, float]:
    """(FLOPs of one expert SGD step per image, FLOPs of one forward per image, bytes saved per image)."""
    from d3codec.distill.classifier import default_augment
    from d3codec.models.convnet import ConvNet

    net = ConvNet(shape[0], classes, shape[1:], width=128)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    aug = default_augment()
    x = torch.randn(batch, *shape)
    y = torch.arange(batch) % classes

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(net(aug(x, torch.Generator().manual_seed(1))), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def forward() -> None:
        with torch.no_grad():
            net(x)

    return flops(step) / batch, flops(forward) / batch, saved_bytes(lambda: net(x).sum()) / batch


class _Experts:
    """Stand-in experts (random ConvNet parameters): the FLOPs do not depend on the values."""

    def __init__(self, classes: int, shape: tuple[int, int, int], epochs: int) -> None:
        from d3codec.models.convnet import flatten_params, init_params

        self.classes, self.shape, self.num_experts, self.num_epochs = classes, shape, 1, epochs
        self._flat = flatten_params(init_params(self.build_model(), torch.Generator().manual_seed(0))).detach()

    def build_model(self) -> Any:
        from d3codec.models.convnet import ConvNet

        return ConvNet(self.shape[0], self.classes, self.shape[1:], width=128)

    def flat_at(self, i: int, epoch: int) -> torch.Tensor:
        return self._flat


def distill_units(dataset: Any, plan: Any, cfg: Any) -> dict[str, float]:
    """FLOPs of the distillation's units with the planned decoder (see the module docstring),
    from steps of the real `Distiller` on 2 classes at small sizes."""
    from d3codec.distill.distiller import Distiller

    sub = dataset.subset([0, 1])
    meta = sub.metadata()
    experts = _Experts(2, tuple(sub.image_shape), max(cfg.max_start_epoch + cfg.expert_epochs, 3))
    base = replace(cfg, init="random", fit_steps=0, iterations=10, final_fraction=0.0)

    def step(**over: Any) -> int:
        d = Distiller(plan, meta, sub, experts, replace(base, **over), device="cpu")
        return flops(d.step)

    mtt_42 = step(objective="mtt", unroll_batch=4, syn_steps=2)
    mtt_82 = step(objective="mtt", unroll_batch=8, syn_steps=2)
    mtt_44 = step(objective="mtt", unroll_batch=4, syn_steps=4)
    per_image_step = (mtt_44 - mtt_42) / 8
    per_decoded = (mtt_82 - mtt_42 - 8 * per_image_step) / 4
    mmd_44 = step(objective="mmd", samples_per_class=4, real_per_class=4)
    mmd_84 = step(objective="mmd", samples_per_class=8, real_per_class=4)
    mmd_48 = step(objective="mmd", samples_per_class=4, real_per_class=8)
    batch = min(4, 2 * plan.latents_per_class)  # a fit step decodes at most the N x K targets
    fit = Distiller(plan, meta, sub, experts, replace(cfg, init="real", fit_steps=4, fit_batch=batch), device="cpu")
    fit.step()  # the first step draws the targets and starts the latents from a PCA
    return {"mtt_decoded": per_decoded, "mtt_image_step": per_image_step,
            "mmd_sample": (mmd_84 - mmd_44) / 8, "mmd_real": (mmd_48 - mmd_44) / 8,
            "fit_target": flops(fit.step) / batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--cache-dir", help="d3codec's data cache (default: its usual place)")
    ap.add_argument("--budget", default="2ipc")
    ap.add_argument("--subtasks", type=int, default=2)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--images", type=int, default=1_281_167, help="training images (ILSVRC2012 train)")
    ap.add_argument("--tflops", type=float, default=74.0,
                    help="sustained TFLOPS per GPU on the counted FLOPs (default: 15%% of the H100's dense TF32 peak)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from d3codec.data import open_dataset
    from d3codec.distill.api import EncodeOptions
    from d3codec.distill.cost import wall_seconds
    from d3codec.distill.federated import plan_federated

    ds = open_dataset("imagenet", data_dir=args.data_dir, cache_dir=args.cache_dir, progress=False)
    options = EncodeOptions(device="cuda")  # the plan a GPU run makes: CUDA defaults, nothing run on CUDA
    fplan = plan_federated(ds, args.budget, options, args.subtasks)
    print(fplan.summary())
    opts = fplan.subtask_options(0)
    cfg = opts.distill_config()
    n_exp, n_ep = opts.expert_settings(cfg)
    k = fplan.plans[0].latents_per_class
    print(f"CUDA settings: objective {cfg.objective}, {cfg.iterations:,} iterations, unroll {cfg.unroll} "
          f"{cfg.syn_steps} steps x {cfg.unroll_batch} images, MMD {cfg.samples_per_class} decoded + "
          f"{cfg.real_per_class} real per class ({cfg.mmd_chunk} classes a chunk); experts {n_exp} x {n_ep} epochs "
          f"per subtask; teacher {fplan.teacher}")

    step_img, fwd_img, act_img = expert_units(1000, tuple(ds.image_shape))
    plan0 = fplan.plans[0]
    units = distill_units(ds, plan0, cfg)
    print(f"units (GFLOP): expert step {step_img / 1e9:.3f}/image (forward {fwd_img / 1e9:.3f}); "
          f"fit {units['fit_target'] / 1e9:.3f}/target; MTT {units['mtt_decoded'] / 1e9:.3f}/decoded image + "
          f"{units['mtt_image_step'] / 1e9:.3f}/image-step; MMD {units['mmd_sample'] / 1e9:.3f}/decoded sample + "
          f"{units['mmd_real'] / 1e9:.3f}/real image; ConvNet activations saved {act_img / 1e6:.1f} MB/image (fp32)")

    rate = args.tflops * 1e12
    per_class_images = args.images / 1000
    cost: dict[str, float] = {}
    for i, group in enumerate(fplan.groups):
        n = len(group)
        images = per_class_images * n
        experts = n_exp * n_ep * images * step_img
        targets = n * k
        fit_steps = fplan.subtask_options(i).distill_config().fit_iterations  # its share of the single task's fit
        fit = fit_steps * min(cfg.fit_batch, targets) * units["fit_target"]
        mtt = (n * math.ceil(cfg.unroll_batch / n) * units["mtt_decoded"]
               + cfg.syn_steps * cfg.unroll_batch * units["mtt_image_step"]) if "mtt" in cfg.objective else 0.0
        mmd = (n * (cfg.samples_per_class * units["mmd_sample"] + cfg.real_per_class * units["mmd_real"])
               if "mmd" in cfg.objective else 0.0)
        objective = cfg.iterations * (mtt + mmd)
        cost[f"subtask {i}"] = (experts + fit + objective) / rate
        cost[f"subtask {i} experts"] = experts / rate
        print(f"subtask {i} ({n} classes, {images:,.0f} images): experts {experts / 1e15:,.1f} PFLOP, fit "
              f"{fit_steps:,} steps {fit / 1e15:,.2f} PFLOP, objective {cfg.iterations:,} x (MTT "
              f"{mtt / 1e12:.2f} + MMD {mmd / 1e12:.2f} TFLOP) = {objective / 1e15:,.1f} PFLOP; "
              f"{cost[f'subtask {i}'] / 3600:.2f} GPU-h at {args.tflops:g} TFLOPS")
    if fplan.teacher is not None:
        teacher = fplan.teacher["experts"] * fplan.teacher["epochs"] * args.images * step_img
        labels = 1000 * k * (units["mtt_decoded"] / 3 + fwd_img)  # decode a mean image (~1/3 of fwd+bwd), teacher forward
        cost["teacher"] = (teacher + labels) / rate
        print(f"teacher: {fplan.teacher['epochs']} epochs over {args.images:,} images, {teacher / 1e15:,.1f} PFLOP; "
              f"labels {labels / 1e12:.3f} TFLOP; {cost['teacher'] / 3600:.2f} GPU-h")
    total = sum(v for key, v in cost.items() if not key.endswith("experts"))
    wall = wall_seconds(cost, fplan, args.gpus)
    print(f"total {total / 3600:.2f} GPU-h; wall {wall / 3600:.2f} h on {args.gpus} GPUs with the encoder's rank "
          f"schedule (H100: {args.tflops:g} TFLOPS = {100 * args.tflops / H100_PEAK['tf32']:.0f}% of dense TF32 "
          f"peak, {100 * args.tflops / H100_PEAK['bf16']:.1f}% of dense bf16 peak)")
    mem = {"experts (batch 256)": 256 * act_img,
           f"MMD chunk ({cfg.mmd_chunk} classes x {cfg.samples_per_class} decoded)":
               cfg.mmd_chunk * cfg.samples_per_class * act_img,
           f"MTT step ({cfg.unroll_batch} images, double backward ~2x)": 2 * cfg.unroll_batch * act_img}
    print("activation memory per GPU (ConvNet saved tensors only; decoder and allocator slack on top): "
          + ", ".join(f"{k_} {v / 1e9:.1f} GB" for k_, v in mem.items()))


if __name__ == "__main__":
    main()
