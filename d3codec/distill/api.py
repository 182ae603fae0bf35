"""`encode(dataset, budget, output, options) -> D3File`: plan, train experts, distil, label, write.

The Python form of `d3codec encode`. It takes a class subset and a byte budget (a share, for
federated subtasks) and writes a valid `.d3` file for those classes (its metadata lists exactly
them, in the given order; `provenance["classes"]` keeps their global ids).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence, Union

import torch

from d3codec._paths import check_output_file
from d3codec._version import __version__
from d3codec.decode.decoders import check_device
from d3codec.distill.checkpoint import checkpoint_iteration
from d3codec.distill.cost import Estimate, cached_experts, estimate_single, render_actual, render_single, run_probe
from d3codec.distill.distiller import (OBJECTIVES, DistillConfig, Distiller, budget_latent_cap, cpu_defaults,
                                       default_fit_steps, fit_latent_cap, images_per_class)
from d3codec.distill.experts import ExpertConfig, ensure_experts
from d3codec.distill.labels import (AUTO, MIN_TEACHER_STEPS, LabelStorage, resolve_labels, store_labels,
                                   teacher_labels)
from d3codec.distill.loop import run_loop
from d3codec.distill.paper import compare_with_paper
from d3codec.distill.planner import Plan, plan_budget, store_decoder_state, store_priors
from d3codec.distill.trim import save_within_budget
from d3codec.errors import ConfigError
from d3codec.format.budget import parse_budget
from d3codec.format.io import load
from d3codec.format.types import Budget, D3File, DecoderEntry
from d3codec.models.registry import export_state

Log = Callable[[str], None]


@dataclass
class EncodeOptions:
    """Everything `encode` needs besides the data, the budget and the output path."""

    objective: str = "auto"              # auto: mtt+mmd on CUDA, mmd on CPU (measured: see RESULTS.md)
    iterations: Optional[int] = None     # None: the device's default
    fit_steps: Optional[int] = None      # reconstruction iterations first (0: random init); None: default
    seed: int = 0
    device: str = "cpu"
    classes: Optional[Sequence[int]] = None
    resume: bool = False
    checkpoint_every: int = 100
    dry_run: bool = False
    quiet: bool = False
    weight_dtype: str = "I8"
    latent_dtype: str = "I8"
    labels: str = "auto"                 # auto | soft | hard
    own_class_weight: Union[float, str] = "auto"  # soft labels: own class's weight in the mix, or auto
    latents_per_class: Optional[int] = None
    latent_dim: Optional[int] = None
    width: Optional[int] = None
    num_experts: Optional[int] = None
    expert_epochs: Optional[int] = None
    cache_dir: Optional[str] = None
    overrides: dict[str, Any] = field(default_factory=dict)  # DistillConfig fields
    extra_provenance: dict[str, Any] = field(default_factory=dict)  # added to the file's provenance (federated parts)

    def distill_config(self) -> DistillConfig:
        """The loop settings: the paper's on CUDA, `cpu_defaults` on CPU, then the overrides."""
        cuda = str(self.device).startswith("cuda")
        objective = self.objective if self.objective != "auto" else ("mtt+mmd" if cuda else "mmd")
        if objective not in OBJECTIVES:
            raise ConfigError(f"--objective must be auto or one of {', '.join(OBJECTIVES)}, not {objective!r}")
        cfg = DistillConfig(objective=objective) if cuda else cpu_defaults(objective)
        cfg = replace(cfg, seed=self.seed, **self.overrides)
        if self.iterations is not None:
            cfg = replace(cfg, iterations=self.iterations)
        if self.fit_steps is not None:
            cfg = replace(cfg, fit_steps=self.fit_steps, init="real" if self.fit_steps > 0 else "random")
        cfg.validate()
        return cfg

    def expert_settings(self, cfg: DistillConfig, train_images: Optional[int] = None) -> tuple[int, int]:
        """(experts, epochs): enough epochs for the trajectories MTT samples; with MMD alone on CPU,
        one expert trained for about 250 steps of 256 images (1 epoch of MNIST, 20 of `digits`)."""
        cuda = str(self.device).startswith("cuda")
        needs = cfg.max_start_epoch + cfg.expert_epochs if "mtt" in cfg.objective else 0
        n = self.num_experts or (20 if cuda else (4 if "mtt" in cfg.objective else 1))
        cpu_mmd = min(20, max(1, round(64000 / train_images))) if train_images else 2
        e = self.expert_epochs or max(needs if cuda else min(needs, 6), 3 if cuda else cpu_mmd)
        return n, e


def check_output(output: Optional[str], *, inputs: Sequence[Optional[str]] = (), resume: Optional[bool] = None) -> None:
    """Before any training: refuse a missing -o, an output that is a folder, sits in a missing or
    unwritable folder, or would replace an input; and (when `resume` is given) an interrupted run's
    checkpoint `<output>.ckpt` that a run without --resume would throw away."""
    if output is None:
        raise ConfigError("give an output file with -o/--output (or use --dry-run)")
    check_output_file(output, inputs)
    ckpt = output + ".ckpt"
    if resume is False and os.path.exists(ckpt):
        at = checkpoint_iteration(ckpt)
        where = f" (stopped at iteration {at})" if at is not None else ""
        raise ConfigError(f"{ckpt} holds an interrupted encode{where}; add --resume to continue it, "
                          f"or delete {ckpt} to start over")


def compute_record(device: str, threads: Optional[int] = None) -> dict[str, Any]:
    """What an encode's bytes depend on besides its data and settings: the torch version, the device,
    the CPU kernels torch dispatches to and its intra-op thread count (CPU reductions split their
    work by thread, so the last bits differ between thread counts). `threads`: the count the
    encode computes with (default: torch's current one)."""
    record: dict[str, Any] = {"torch": torch.__version__, "device": str(device),
                              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                              "threads": torch.get_num_threads() if threads is None else int(threads)}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        try:
            record.update(cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(torch.device(device)))
        except (RuntimeError, AssertionError, ValueError):  # a bad device string: the device check names it
            pass
    return record


def _provenance(options: EncodeOptions, cfg: DistillConfig, classes: Sequence[int], dataset: Any,
                experts: tuple[int, int]) -> dict[str, Any]:
    """What made the file: fixed before training (it counts in the planned header)."""
    prov: dict[str, Any] = {"encoder": f"d3codec {__version__}", "seed": options.seed, "objective": cfg.objective,
                            "iterations": cfg.iterations, "fit_steps": cfg.fit_iterations, "experts": list(experts),
                            "compute": compute_record(options.device)}
    if options.classes is not None:
        prov["classes"] = [int(c) for c in classes]
    if options.own_class_weight:  # auto comes out again where the plan's labels are hard (`plan_for`)
        prov["own_class_weight"] = options.own_class_weight
    prov.update(options.extra_provenance)
    return prov


def with_own_class(storage: LabelStorage, weight: Union[float, str], why_hard: str = "") -> LabelStorage:
    """`storage` with the own-class weight of `--own-class-weight` (the bytes are the same whatever
    the weight, so the plan does not change); `auto` goes to soft labels only; a weight on hard
    labels is an error (`why_hard` says why they are hard, where the user did not ask for it)."""
    if weight == AUTO:
        return storage if storage.kind == "hard" else replace(storage, own=AUTO)
    if not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
        raise ConfigError(f"--own-class-weight must be auto or in 0..1, got {weight!r}")
    if not weight:
        return storage
    if storage.kind == "hard":
        raise ConfigError(f"--own-class-weight mixes the teacher's soft labels with the own class, but the labels "
                          f"are hard{why_hard}; pass --labels soft, or drop --own-class-weight")
    return replace(storage, own=float(weight))


def smallest_class(real: Any) -> int:
    """Images in the smallest class of `real` (K above it would only repeat real images)."""
    return max(1, int(real.class_counts().min()))


def capped_k_warning(dataset: Any, budget: Union[str, int, Budget], options: EncodeOptions,
                     real: Any, plan: Plan) -> Optional[str]:
    """A warning when the smallest class caps K (latents per class) for every class below what the
    budget would give, naming the classes that do it; else None."""
    counts = real.class_counts()
    k = plan.latents_per_class
    if options.latents_per_class is not None or k != smallest_class(real) or int(counts.max()) <= k:
        return None
    uncapped = plan_for(dataset, plan.budget, options, max_latents=int(counts.max()))[0].latents_per_class
    if uncapped <= k:
        return None
    names = real.metadata().class_names
    small = [names[i] for i in range(len(counts)) if counts[i] <= k]
    shown = ", ".join(repr(n) for n in small[:3]) + (f" and {len(small) - 3} more" if len(small) > 3 else "")
    return (f"warning: class {shown} has only {k} training image{'s' if k > 1 else ''}, so every class gets "
            f"K={k} latent components where the budget allows K={uncapped}; add images to it, leave it out "
            "with --classes, or set --latents-per-class")


def fit_cap_note(plan: Plan, cfg: DistillConfig, real: Any, options: EncodeOptions) -> Optional[str]:
    """A line saying why K is below the class size, when the fit's length capped it; else None."""
    if options.latents_per_class is not None or cfg.init != "real":
        return None
    n, k = len(real.classes), plan.latents_per_class
    if k != budget_latent_cap(plan.budget.bytes, n, real.metadata().image_shape, cfg) or k >= smallest_class(real):
        return None
    views = cfg.fit_iterations * cfg.fit_batch // max(1, n * k)
    return (f"K={k}: the {cfg.fit_iterations}-step fit shows each of the {n * k:,} targets about {views} times; "
            "more components would each be seen too few times (--latents-per-class overrides)")


def plan_for(dataset: Any, budget: Union[str, int, Budget], options: EncodeOptions, *,
             max_latents: Optional[int] = None) -> tuple[Plan, DistillConfig, Any, dict[str, Any]]:
    """Resolve classes, budget and settings: the plan, the loop config, the class view, the provenance.
    K is at most `max_latents` (default: the smallest class's images)."""
    all_classes = list(dataset.classes)
    classes = all_classes if options.classes is None else [int(c) for c in options.classes]
    real = dataset if options.classes is None else dataset.subset(classes)
    metadata = real.metadata()
    if isinstance(budget, Budget):
        b = budget
    else:
        b = parse_budget(budget, metadata.num_classes, metadata.image_shape)
    cfg = options.distill_config()
    experts = options.expert_settings(cfg, len(real))
    labels = resolve_labels(options.labels, experts[1], len(real), ExpertConfig.batch_size)
    max_k = smallest_class(real) if max_latents is None else max_latents
    ipc = images_per_class(b.bytes, len(classes), metadata.image_shape)
    if cfg.init == "real":
        max_k = min(max_k, fit_latent_cap(len(classes), metadata.image_shape, cfg, ipc))

    def plan_with(cfg: DistillConfig) -> tuple[Plan, dict[str, Any]]:
        prov = _provenance(options, cfg, classes, dataset, experts)
        return plan_budget(metadata, b, provenance=prov, latents_per_class=options.latents_per_class,
                           latent_dim=options.latent_dim, width=options.width, weight_dtype=options.weight_dtype,
                           latent_dtype=options.latent_dtype, labels=labels, constant_logvar=not cfg.learn_logvar,
                           max_latents_per_class=max_k), prov

    plan, prov = plan_with(cfg)
    if options.fit_steps is None and "fit_steps" not in options.overrides and cfg.init == "real":
        steps = default_fit_steps(len(classes) * plan.latents_per_class, cfg, metadata.image_shape, ipc)
        if steps != cfg.fit_steps:  # the provenance records the fit: plan again with it
            cfg = replace(cfg, fit_steps=steps)
            plan, prov = plan_with(cfg)
    why = (f" (--labels auto is hard here: the teacher's {experts[1]} epoch(s) are under {MIN_TEACHER_STEPS:,} SGD "
           "steps)" if options.labels == "auto" and labels == "hard" else "")
    if plan.labels.kind == "hard" and prov.get("own_class_weight") == AUTO:
        del prov["own_class_weight"]  # only shrinks the planned header
    return replace(plan, labels=with_own_class(plan.labels, options.own_class_weight, why)), cfg, real, prov


def encode(dataset: Any, budget: Union[str, int, Budget], output: Optional[str],
           options: Optional[EncodeOptions] = None, log: Optional[Log] = None) -> Union[D3File, Plan]:
    """Distil `dataset` (an `ImageDataset` train split) into a `.d3` file at `output`.

    Returns the written `D3File` (as `load` would read it), or the `Plan` with `dry_run`.
    """
    options = options or EncodeOptions()
    say: Log = log or (lambda s: None if options.quiet else print(s, file=sys.stderr))
    check_device(options.device)
    plan, cfg, real, prov = plan_for(dataset, budget, options)
    note = capped_k_warning(dataset, budget, options, real, plan)
    if note:
        (log or (lambda s: print(s, file=sys.stderr)))(note)  # shown with --quiet too
    say(plan.summary())
    why = fit_cap_note(plan, cfg, real, options)
    if why:
        say(why)
    paper = compare_with_paper(plan.budget, len(real.classes), tuple(real.image_shape), [plan], [len(real.classes)],
                               plan.labels, plan.bound, plan.guaranteed)
    if paper:
        say(paper)
    say(f"{cfg.fit_iterations} fit iterations (K real images per class), then objective {cfg.objective}, "
        f"{cfg.iterations} iterations; seed {cfg.seed}, device {options.device}")
    if not options.dry_run:
        check_output(output, resume=options.resume)
    estimate = None if options.quiet else estimate_encode(dataset, plan, cfg, real, options)
    if estimate is not None:
        say(render_single(estimate))
    if options.dry_run:
        return plan
    torch.manual_seed(cfg.seed)  # nothing should use the global RNG; this pins anything that does

    seconds: dict[str, float] = {}
    started = time.perf_counter()
    n_exp, n_ep = options.expert_settings(cfg, len(real))
    say(f"experts: {n_exp} x {n_ep} epochs (cached after the first run)")
    experts = ensure_experts(dataset, num_experts=n_exp, epochs=n_ep,
                             classes=None if options.classes is None else real.classes,
                             seed=cfg.seed, cache_dir=options.cache_dir, device=options.device,
                             progress=not options.quiet)
    seconds["experts"] = time.perf_counter() - started
    distiller = Distiller(plan, real.metadata(), real, experts, cfg, device=options.device)
    run_loop(distiller, output + ".ckpt", plan, resume=options.resume,
             checkpoint_every=options.checkpoint_every, quiet=options.quiet, seconds=seconds)
    started = time.perf_counter()
    d3 = export(distiller, plan, real, experts, prov, device=options.device, log=say)
    seconds["labels"] = time.perf_counter() - started  # with the decoder's fold into its stored form
    started = time.perf_counter()
    size, _ = save_within_budget(d3, output, plan.budget, say)
    try:
        os.unlink(output + ".ckpt")
    except OSError:
        pass
    seconds["write"] = time.perf_counter() - started
    say(f"wrote {output}: {size:,} bytes ({100.0 * size / plan.budget.bytes:.1f}% of the budget)")
    say(render_actual(seconds, estimate))  # printed only: a file never holds wall times
    return load(output)


def estimate_encode(dataset: Any, plan: Plan, cfg: DistillConfig, real: Any, options: EncodeOptions) -> Estimate:
    """The `cost.Estimate` of this encode on this machine, from a short timed probe of `real`
    with the plan's decoder and settings (experts already in the cache count 0 s)."""
    n_exp, n_ep = options.expert_settings(cfg, len(real))
    classes = None if options.classes is None else list(real.classes)
    soft = plan.labels.kind != "hard"
    probe = run_probe(real, plan, cfg, options.device, epochs=n_ep, labels=soft)
    return estimate_single(probe, plan, cfg, classes=len(real.classes), train_images=len(real),
                           image_shape=tuple(real.image_shape), experts=n_exp, epochs=n_ep,
                           cached_experts=cached_experts(dataset, classes, n_exp, n_ep, cfg.seed, options.cache_dir),
                           soft_labels=soft)


@torch.no_grad()
def export(distiller: Distiller, plan: Plan, real: Any, experts: Any, provenance: dict[str, Any],
           device: str = "cpu", log: Optional[Log] = None) -> D3File:
    """The trained state as a `D3File`: eval-form decoder, priors, labels, in the planned dtypes;
    `log` gets how well the teacher knows the components, for soft labels."""
    distiller.freeze_if_needed()  # the folded, stored-form decoder from here on
    if plan.labels.kind == "hard":
        labels = store_labels(torch.zeros(0), plan.labels)
    else:
        teacher = experts.teacher(device=device)
        n, k = distiller.mean.shape[:2]
        labels = teacher_labels(teacher, distiller.mean_image_batches(), n, k, plan.labels, log)
    state = export_state(distiller.decoder)
    weights = store_decoder_state({k: v.detach().cpu() for k, v in state.items()}, plan.weight_dtype)
    classes = list(range(len(real.classes)))
    metadata = real.metadata()
    priors = store_priors(distiller.mean.detach().cpu(), distiller.logvar.detach().cpu(), plan.latent_dtype)
    return D3File(metadata=metadata, priors=priors,
                  decoders=[DecoderEntry(plan.family, plan.version, plan.hparams, classes, weights)],
                  labels=labels, budget=plan.budget, provenance=provenance)
