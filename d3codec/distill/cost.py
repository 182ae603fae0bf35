"""What an encode will cost on this machine: a short timed probe, scaled to the plan.

`run_probe` times each phase's unit of work on the device and thread count the encode uses, on a
few classes of the real data: an expert's SGD step on a real batch (per image), a fit step of the
planned decoder (its batch is `fit_batch` whatever the class count) and the fit's start (PCA of
the targets), an objective iteration (MMD: per class, `mmd_chunk_classes` at a time; MTT: a fixed
`unroll_batch` of images whatever the class count) with stand-in experts, and labelling one
component (decode its mean, the teacher's forward). `estimate_single` scales those units to a
single-task plan; `estimate_cost` / `render_estimate` to a federated one (device-hours, and the
wall time over ranks, with their expert sharing).

Peak memory is a model, not a measurement of the run: the process's resident size before the
probe, plus the training images of the classes (the uint8 cache is a memmap that the run reads in
full), plus the per-component state (means, log-variances, their gradients and optimiser moments),
plus the largest phase's working set as the probe sampled it (models, optimisers and activations
at the real batch sizes; MMD's scaled from the probe's classes to one chunk of classes; the fit's
with its PCA at the plan's size). Phases run one after another, so only the largest counts.
"""
from __future__ import annotations

import math
import os
import resource
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from d3codec.distill.classifier import default_augment
from d3codec.distill.distiller import DistillConfig, Distiller, mmd_chunk_classes, mmd_class_count
from d3codec.distill.experts import ExpertConfig, default_experts_dir, experts_key
from d3codec.distill.merge import single_thread
from d3codec.distill.pca import BASIS_IMAGES, working_bytes as pca_working_bytes
from d3codec.distill.planner import Plan
from d3codec.models.convnet import ConvNet, flatten_params, init_params
from d3codec.progress import format_duration

if TYPE_CHECKING:
    from d3codec.distill.federated import FederatedPlan

#: Classes of the data the probe distils (an MMD iteration's cost is linear in the classes).
PROBE_CLASSES = 8
#: Classes the MMD iteration is timed on (its activations grow with them: 64 px, 4 classes, ~1 GB).
OBJECTIVE_CLASSES = 4
#: Fewer classes where K is large: the fit's start (a PCA of the targets) stays about this many rows.
PROBE_TARGETS = 1024
#: Seconds each timed phase of the probe may take after its first (warm-up) step.
PHASE_SECONDS = 1.0


@dataclass
class Probe:
    """Seconds per unit of work, and memory, measured on this machine."""

    device: str
    threads: int
    seconds: float                 # the probe's own wall time
    expert_image: float            # one expert SGD step, per image of its batch
    fit_step: float                # one fit iteration (a batch of `fit_batch` targets)
    fit_start_per_target: float    # the fit's start (targets drawn, PCA codes), per target
    objective_fixed: float         # one objective iteration, the part independent of the classes (MTT)
    objective_per_class: float     # one objective iteration, per class (MMD)
    label_image: float             # one component's soft label (decode its mean, teacher forward)
    classes: int                   # classes the probe ran on (the fit, MTT)
    targets: int                   # fit targets the probe drew (classes x K)
    objective_classes: int         # classes the MMD iteration ran on
    expert_batch: int              # images in the probe's expert batch
    expert_batch_full: int         # images in the encode's expert batch
    rss_before: int                # bytes resident when the probe started
    growth: dict[str, int]         # phase -> most bytes resident above its start


@dataclass
class Estimate:
    """Seconds per phase (`experts`, `fit`, `objective`, `labels`) and peak memory in bytes."""

    seconds: dict[str, float]
    peak_bytes: int
    probe: Probe
    notes: dict[str, str] = field(default_factory=dict)  # phase -> a word on its figure

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


class _ProbeExperts:
    """Stand-in experts for the timing probe: random ConvNet parameters, no training needed."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, epochs: int, seed: int,
                 width: int = 128, depth: Optional[int] = None) -> None:

        self._shape, self._classes, self._width, self._depth = image_shape, num_classes, width, depth
        self._flat = flatten_params(init_params(self.build_model(), torch.Generator().manual_seed(seed))).detach()
        self.num_experts, self.num_epochs = 1, epochs

    def build_model(self) -> Any:

        c, h, w = self._shape
        return ConvNet(c, self._classes, (h, w), width=self._width, depth=self._depth)

    def flat_at(self, i: int, epoch: int) -> torch.Tensor:
        return self._flat


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def rss_now() -> int:
    """Bytes resident now (Linux /proc); elsewhere the process peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return peak_rss()


def peak_rss() -> int:
    """The process's peak resident bytes so far (`getrusage`: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class _PeakSampler:
    """The most bytes resident above the start while active: a thread reads the resident size
    every few milliseconds (the CPU allocator returns big blocks, so each phase is seen alone)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.start, self.peak = interval, 0, 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "_PeakSampler":
        self.start = self.peak = rss_now()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_now())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_now())

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.start)


def _timed(step: Callable[[], Any], device: str, budget: float = PHASE_SECONDS, most: int = 3,
           again: bool = False) -> tuple[float, float]:
    """(seconds of the first call, mean seconds of the calls after it): more calls while the phase
    is under `budget` seconds, at most `most`. A first call over `budget` is taken as the measure
    (its one-off costs are small beside it) unless `again` (the first call has a start of its own)."""
    t0 = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - t0
    if first > budget and not again:
        return first, first
    runs, start = 0, time.perf_counter()
    while runs < 1 or (runs < most and time.perf_counter() - start < budget):
        step()
        runs += 1
    _sync(device)
    return first, (time.perf_counter() - start) / runs


def run_probe(real: Any, plan: "Plan", cfg: "DistillConfig", device: str = "cpu", *, expert_batch: int = 256,
              expert_width: int = 128, expert_depth: Optional[int] = None, epochs: int = 1,
              labels: bool = False) -> Probe:
    """Time the units of `Probe` on at most `PROBE_CLASSES` classes of `real` (the class view the
    encode distils), with the planned decoder and settings, on `device` and torch's current thread
    count, and sample each phase's memory. Seeded and self-contained: it trains nothing the encode
    keeps and writes nothing."""

    started = time.perf_counter()
    rss_before = rss_now()
    n = min(PROBE_CLASSES, len(real.classes), max(2, PROBE_TARGETS // max(1, plan.latents_per_class)))
    sub = real.subset(list(real.classes)[:n])
    meta = sub.metadata()
    experts = _ProbeExperts(sub.image_shape, n, max(epochs, 1), 0, expert_width, expert_depth)
    growth: dict[str, int] = {}

    # Expert training: one SGD step on a real, augmented batch of the experts' size.
    with _PeakSampler() as mem:
        c, h, w = sub.image_shape
        net = ConvNet(c, n, (h, w), width=expert_width, depth=expert_depth)
        init_params(net, torch.Generator().manual_seed(0))
        net.to(device)
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        aug = default_augment()
        batch = min(expert_batch, len(sub))
        idx = torch.randperm(len(sub), generator=torch.Generator().manual_seed(0))[:batch].numpy()
        x, y = sub.batch(idx, device), sub.label_tensor(idx, device)

        def expert_step() -> None:
            loss = torch.nn.functional.cross_entropy(net(aug(x, torch.Generator().manual_seed(1))), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        _, per_step = _timed(expert_step, device)
        expert_image = per_step / batch
        del net, opt, x, y
    growth["experts"] = mem.growth

    fit_step = fit_start = 0.0
    targets = n * plan.latents_per_class
    if cfg.fit_iterations > 0:
        with _PeakSampler() as mem:
            fit = Distiller(plan, meta, sub, experts, replace(cfg, iterations=0, fit_steps=max(cfg.fit_iterations, 4)),
                            device=device)
            first, fit_step = _timed(fit.step, device, again=True)
            fit_start = max(0.0, first - fit_step) / max(1, targets)
            del fit
        growth["fit"] = mem.growth

    fixed = per_class = 0.0
    label_image = 0.0
    m = min(n, OBJECTIVE_CLASSES)
    objective = replace(cfg, init="random", fit_steps=0, iterations=max(cfg.iterations, 4), final_fraction=0.0)
    if cfg.iterations > 0:
        if "mtt" in cfg.objective:
            with _PeakSampler() as mem:
                mtt = Distiller(plan, meta, sub, experts, replace(objective, objective="mtt"), device=device)
                _, fixed = _timed(mtt.step, device)
                del mtt
            growth["mtt"] = mem.growth
        if "mmd" in cfg.objective:
            with _PeakSampler() as mem:
                few = sub.subset(list(sub.classes)[:m]) if m < n else sub
                mmd = Distiller(plan, few.metadata(), few, experts, replace(objective, objective="mmd"), device=device)
                _, per_iteration = _timed(mmd.step, device)
                per_class = per_iteration / m
                del mmd
            growth["mmd"] = mem.growth
    if labels:
        with _PeakSampler() as mem:
            label = Distiller(plan, meta, sub, experts, objective, device=device)
            teacher = experts.build_model().to(device).eval()
            z = torch.randn(min(256, max(1, targets)), plan.latent_dim, generator=torch.Generator().manual_seed(2))

            @torch.no_grad()
            def label_step() -> None:
                torch.softmax(teacher(label.decode(z.to(device))), dim=-1)

            _, per_batch = _timed(label_step, device)
            label_image = per_batch / len(z)
            del label, teacher
        growth["labels"] = mem.growth
    return Probe(device=str(device), threads=torch.get_num_threads(), seconds=time.perf_counter() - started,
                 expert_image=expert_image, fit_step=fit_step, fit_start_per_target=fit_start,
                 objective_fixed=fixed, objective_per_class=per_class, label_image=label_image, classes=n,
                 targets=targets, objective_classes=m, expert_batch=batch, expert_batch_full=expert_batch,
                 rss_before=rss_before, growth=growth)


def estimate_memory(probe: Probe, plan: "Plan", cfg: "DistillConfig", classes: int, train_images: int,
                    image_shape: tuple[int, int, int]) -> int:
    """Peak resident bytes of the encode (the model in the module docstring)."""
    pixels = math.prod(image_shape)
    data = train_images * pixels                                    # uint8 cache, read in full
    k, d = plan.latents_per_class, plan.latent_dim
    state = classes * k * d * 4 * 6                                 # means, log-vars, grads, moments
    targets = classes * k
    pca = max(0, pca_working_bytes(min(BASIS_IMAGES, targets), pixels)
              - pca_working_bytes(min(BASIS_IMAGES, probe.targets), pixels))  # beyond the probe's own
    # Activations grow with the batch: the encode's batches where the probe's were smaller.
    scale = {"experts": min(probe.expert_batch_full, train_images) / max(1, probe.expert_batch),
             "fit": min(cfg.fit_batch, targets) / max(1, min(cfg.fit_batch, probe.targets)),
             "mmd": (min(mmd_chunk_classes(cfg, image_shape), mmd_class_count(cfg, classes))
                     / max(1, probe.objective_classes))}
    g = {k: int(v * max(1.0, scale.get(k, 1.0))) for k, v in probe.growth.items()}
    if "fit" in g:
        g["fit"] += pca
    return int(probe.rss_before + data + state + max(g.values(), default=0))


def estimate_single(probe: Probe, plan: "Plan", cfg: "DistillConfig", *, classes: int, train_images: int,
                    image_shape: tuple[int, int, int], experts: int, epochs: int, cached_experts: int = 0,
                    soft_labels: bool = False) -> Estimate:
    """Seconds per phase of a single-task encode of `classes` classes and `train_images` images:
    experts (the uncached ones, each `epochs` passes), fit, objective, labels; and peak memory."""
    targets = classes * plan.latents_per_class
    seconds = {
        "experts": max(0, experts - cached_experts) * epochs * train_images * probe.expert_image,
        "fit": (cfg.fit_iterations * probe.fit_step + targets * probe.fit_start_per_target
                if cfg.fit_iterations > 0 else 0.0),
        "objective": cfg.iterations * (probe.objective_fixed + mmd_class_count(cfg, classes) * probe.objective_per_class),
        "labels": targets * probe.label_image if soft_labels else 0.0,
    }
    notes = {"experts": f"{cached_experts} of {experts} experts cached"} if cached_experts else {}
    return Estimate(seconds, estimate_memory(probe, plan, cfg, classes, train_images, image_shape), probe, notes)


def cached_experts(dataset: Any, classes: Optional[list[int]], num_experts: int, epochs: int, seed: int,
                   cache_dir: Optional[str]) -> int:
    """How many of the first `num_experts` experts the encode asks for are already in the cache."""

    chosen = list(dataset.classes) if classes is None else [int(c) for c in classes]
    folder = os.path.join(default_experts_dir(cache_dir),
                          experts_key(dataset.fingerprint, chosen, dataset.image_shape,
                                      ExpertConfig(epochs=epochs, seed=seed)))
    return sum(os.path.isfile(os.path.join(folder, f"expert_{i:04d}.safetensors")) for i in range(num_experts))


def format_bytes(n: float) -> str:
    """`850 MB`, `1.9 GB` (decimal units)."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def render_single(est: Estimate) -> str:
    """One line: each phase, the total, the peak memory, and what the probe ran on."""
    p = est.probe
    parts = ", ".join(f"{k} {format_duration(v)}" + (f" ({est.notes[k]})" if k in est.notes else "")
                      for k, v in est.seconds.items())
    return (f"estimate on this machine ({p.device}, {p.threads} thread{'s' if p.threads != 1 else ''}, from a "
            f"{p.seconds:.0f} s probe): {parts}; total about {format_duration(est.total)}; "
            f"peak memory about {format_bytes(est.peak_bytes)}")


def render_actual(actual: dict[str, float], est: Optional[Estimate]) -> str:
    """`took 24m10s (estimate 26m): experts 3m01s (3m10s), ...`: the run against the estimate."""
    total = sum(actual.values())
    if est is None:
        return f"took {format_duration(total)}: " + ", ".join(f"{k} {format_duration(v)}" for k, v in actual.items())
    parts = ", ".join(f"{k} {format_duration(v)}"
                      + (f" ({format_duration(est.seconds[k])})" if k in est.seconds else "")
                      for k, v in actual.items())
    return (f"took {format_duration(total)} (estimate {format_duration(est.total)}); per phase, "
            f"actual (estimate): {parts}; peak memory {format_bytes(peak_rss())} "
            f"(estimate {format_bytes(est.peak_bytes)})")


# ---------------------------------------------------------------- federated


def estimate_cost(dataset: Any, fplan: "FederatedPlan") -> dict[str, float]:
    """Seconds of compute per subtask (experts, fit, objective) and for the teacher (training and
    labels), from one probe on subtask 0's classes with one thread (as each federated process
    computes), plus `peak_bytes` of one process."""

    options = fplan.subtask_options(0)
    cfg = options.distill_config()
    real0 = dataset.subset(fplan.groups[0])
    _, epochs0 = options.expert_settings(cfg, len(real0))
    with single_thread():
        probe = run_probe(real0, fplan.plans[0], cfg, options.device, epochs=epochs0,
                          labels=fplan.teacher is not None)
    per_iteration = probe.objective_fixed + mmd_class_count(cfg, len(fplan.groups[0])) * probe.objective_per_class
    out: dict[str, float] = {"seconds_per_iteration": per_iteration if cfg.iterations else 0.0,
        "seconds_per_fit_step": probe.fit_step, "seconds_per_expert_image": probe.expert_image,
        "probe_seconds": probe.seconds}
    peak = 0
    for i, group in enumerate(fplan.groups):
        opts = fplan.subtask_options(i)
        c = opts.distill_config()
        n_exp, n_ep = opts.expert_settings(c, fplan.images[i])
        cached = cached_experts(dataset, group, n_exp, n_ep, c.seed, opts.cache_dir)
        est = estimate_single(probe, fplan.plans[i], c, classes=len(group), train_images=fplan.images[i],
                              image_shape=dataset.image_shape, experts=n_exp, epochs=n_ep, cached_experts=cached)
        out[f"subtask {i}"] = est.total
        out[f"subtask {i} experts"] = est.seconds["experts"]
        out["cached experts"] = out.get("cached experts", 0) + cached
        peak = max(peak, est.peak_bytes)
    if fplan.teacher is not None:
        images = sum(fplan.images)
        components = fplan.num_classes * fplan.plans[0].latents_per_class
        t = fplan.teacher
        out["cached teacher"] = cached_experts(dataset, None, t["experts"], t["epochs"], t["seed"],
                                               fplan.teacher_cache_dir)
        out["teacher"] = ((t["experts"] - out["cached teacher"]) * t["epochs"] * images * probe.expert_image
                          + components * probe.label_image)
    out["peak_bytes"] = float(peak)
    return out


def wall_seconds(cost: dict[str, float], fplan: "FederatedPlan", ranks: int) -> float:
    """Wall time of the run on `ranks` ranks: each rank trains its expert shares, then runs its
    tasks in order; a shared subtask's lead distils once its whole group has trained its shares."""
    # local: the federated package imports this module (its dry run's estimate)
    from d3codec.distill.federated import assigned_tasks, expert_shares, experts_per_subtask, subtask_group

    n = experts_per_subtask(fplan)
    per_expert = lambda s: cost.get(f"subtask {s} experts", 0.0) / n  # noqa: E731
    finish = [sum(len(mine) * per_expert(s) for s, mine in expert_shares(fplan, r, ranks)) for r in range(ranks)]
    ready = list(finish)
    for r in range(ranks):
        for t in assigned_tasks(fplan.num_tasks, r, ranks):
            if t >= fplan.subtasks:
                finish[r] += cost.get("teacher", 0.0)
            elif ranks > fplan.subtasks:  # its experts come from phase one
                group = subtask_group(t, fplan.subtasks, ranks)
                finish[r] = max(finish[r], *(ready[g] for g in group)) + cost[f"subtask {t}"] - n * per_expert(t)
            else:
                finish[r] += cost[f"subtask {t}"]
    return max(finish)


def render_estimate(cost: dict[str, float], fplan: "FederatedPlan", ranks: int) -> str:
    """The federated dry run's estimate: device-hours in all, the wall time with `ranks` processes,
    and one process's peak memory."""
    device = str(fplan.options.device)
    kind = "GPU" if device.startswith("cuda") else "CPU-process"
    tasks = [cost[f"subtask {i}"] for i in range(fplan.subtasks)] + ([cost["teacher"]] if "teacher" in cost else [])
    total = sum(tasks)
    wall = wall_seconds(cost, fplan, max(1, ranks))
    memory = f"; peak memory about {format_bytes(cost['peak_bytes'])} per process" if "peak_bytes" in cost else ""
    cached = [f"{int(cost['cached experts'])} subtask expert(s)"] if cost.get("cached experts") else []
    cached += ["the teacher"] if cost.get("cached teacher") else []
    found = f"; {' and '.join(cached)} found cached, not counted" if cached else ""
    fit = (f"{cost['seconds_per_fit_step']:.3f} s per fit step, " if "seconds_per_fit_step" in cost else "")
    return (f"estimate from a timed probe on {device}: {fit}{cost['seconds_per_iteration']:.3f} s per distillation "
            f"iteration (subtask 0), {1e3 * cost['seconds_per_expert_image']:.3f} ms per expert training image; "
            f"about {total / 3600:.2f} {kind}-hours in all (subtasks + teacher{found}), "
            f"{wall / 3600:.2f} h wall with {ranks} process(es){memory}")
