"""`plan_federated`: the federated plan, searched before any training.

The merged file's D and label storage are the single-task plan's of all classes, except that
`--labels auto` means soft labels from the teacher over all classes, trained for at least
`MIN_TEACHER_STEPS` steps (`teacher_epochs`): a subtask's decoder and components see only its
classes, so the labels are all that relates classes of different subtasks (without them a student
trained on the file confuses classes across subtasks: benchmarks/RESULTS.md, "Federated").
K starts at the single-task planner's share of the budget. Each part then gets a byte share,
searched up from budget / subtasks (each part carries a header the merged file holds once) until
the merged file's size estimate fits the budget: the search gives each part its widest decoder.
Then K grows into what their width steps left (or shrinks where the merged file's own parts left
too few). Every step is a named function of the unsearched plan and a trial; none changes the
plan it is given. A subtask's work (fit steps, expert epochs, iterations) is its share of the
single task's at the searched K (`plan.subtask_work`), not what its byte share would plan alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Union

from d3codec._version import __version__
from d3codec.distill.api import EncodeOptions, compute_record, plan_for, smallest_class, with_own_class
from d3codec.distill.distiller import budget_latent_cap
from d3codec.distill.federated.plan import DATASET_RESERVE, FederatedPlan, planning_budget, run_key
from d3codec.distill.federated.split import split_classes, subtask_seed
from d3codec.distill.experts import ExpertConfig
from d3codec.distill.labels import MIN_TEACHER_STEPS, LabelStorage, steps_per_epoch
from d3codec.distill.merge import DataSpec, placeholder_merged
from d3codec.distill.planner import (Plan, component_cap, constant_prior_std, default_latents_per_class, estimate_parts,
                                    label_bytes, plan_budget, raw_parts)
from d3codec.errors import BudgetError, ConfigError
from d3codec.format.budget import parse_budget
from d3codec.format.io import size_upper_bound
from d3codec.format.types import Budget

#: Share searches: at most this many planner passes over all subtasks.
SEARCH_PASSES = 6


@dataclass
class Trial:
    """One point of the search: each part's plan at byte share `share` and the merged file's size."""

    share: int
    plans: list[Plan]
    size: int                       # strict bound when `strict`, else the planner's estimate
    breakdown: dict[str, int]       # merged file: part -> bytes
    strict: bool


@dataclass(frozen=True)
class Layout:
    """The merged file's shape the search starts from: K (latents per class), D, label storage,
    and the largest K the data allows (its smallest class)."""

    k: int
    d: int
    labels: LabelStorage
    max_k: int


def plan_federated(dataset: Any, budget: Union[str, int, Budget], options: EncodeOptions, subtasks: int,
                   split: str = "contiguous", data: Optional[DataSpec] = None) -> FederatedPlan:
    """The whole run's plan (see the module docstring); `BudgetError` when the parts cannot fit,
    naming the smallest budget (in bytes) that plans for these settings."""
    if options.classes is not None:
        raise ConfigError("--classes and --subtasks do not combine; subtasks split all classes of the dataset")
    metadata = dataset.metadata()
    b = budget if isinstance(budget, Budget) else parse_budget(budget, metadata.num_classes, metadata.image_shape)
    try:
        return searched_plan(dataset, b, options, subtasks, split, data)
    except BudgetError as exc:
        reason = str(exc).split("; raise")[0]

        def works(nbytes: int) -> bool:
            try:
                searched_plan(dataset, Budget(nbytes, "bytes", None, str(nbytes)), options, subtasks, split, data)
            except BudgetError:
                return False
            return True

        need = smallest_working(works, b.bytes, tolerance=0.02)  # each try is a whole plan: to 2%
        if need is None:
            raise
        raise BudgetError(f"{reason}; {need:,} bytes works with {subtasks} subtasks (within 2% of the smallest "
                          f"budget that does): raise --budget to {need:,}, or use fewer --subtasks") from None


def smallest_working(works: Callable[[int], bool], fails: int, limit: int = 1 << 40,
                     tolerance: float = 0.0) -> Optional[int]:
    """An n > `fails` with `works(n)` within `tolerance` (a fraction) of the smallest one (doubling,
    then bisection; `works` is taken to be monotone), or None when nothing up to `limit` works."""
    lo, hi = fails, max(2 * fails, 1)
    while not works(hi):
        if hi >= limit:
            return None
        lo, hi = hi, 2 * hi
    while hi - lo > max(1, int(tolerance * hi)):
        mid = (lo + hi) // 2
        if works(mid):
            hi = mid
        else:
            lo = mid
    return hi


def searched_plan(dataset: Any, b: Budget, options: EncodeOptions, subtasks: int, split: str,
                  data: Optional[DataSpec]) -> FederatedPlan:
    """The plan at budget `b`: the unsearched plan, its share searched, then its K; `BudgetError`
    when nothing fits."""
    fplan, layout = unsearched_plan(dataset, b, options, subtasks, split, data)
    best, last = search_share(dataset, fplan, layout)
    if options.latents_per_class is None:
        best = search_latents(dataset, fplan, layout, best, last)
    if best is None:
        raise BudgetError(f"budget {b.bytes:,} bytes is too small for {subtasks} subtasks after their shared "
                          f"parts (merged header, labels); raise --budget or use fewer --subtasks")
    return replace(fplan, share=best.share, plans=best.plans, bound=best.size, breakdown=best.breakdown,
                   guaranteed=best.strict and all(p.guaranteed for p in best.plans))


def merged_layout(dataset: Any, b: Budget, options: EncodeOptions) -> Layout:
    """D and labels are what the single-task plan of all classes picks; K starts where the
    single-task planner starts (its share of the budget), not where that plan ended: its K filled
    the bytes one decoder left, and the parts have S decoders."""
    metadata = dataset.metadata()
    cfg = options.distill_config()
    max_k = smallest_class(dataset)
    if cfg.init == "real":  # the single-task rule: K where the capped fit sees every target often enough
        max_k = min(max_k, budget_latent_cap(b.bytes, metadata.num_classes, metadata.image_shape, cfg))
    whole = plan_budget(metadata, b, latents_per_class=options.latents_per_class, latent_dim=options.latent_dim,
                        width=options.width, weight_dtype=options.weight_dtype, latent_dtype=options.latent_dtype,
                        labels=options.labels,  # auto: soft, the teacher trains long enough (teacher_epochs)
                        constant_logvar=not cfg.learn_logvar, max_latents_per_class=max_k)
    k, d, labels = whole.latents_per_class, whole.latent_dim, with_own_class(whole.labels, options.own_class_weight)
    if options.latents_per_class is None:
        k = min(k, default_latents_per_class(b, metadata.num_classes, d, options.latent_dtype,
                                             label_bytes(labels, metadata.num_classes), not cfg.learn_logvar))
    return Layout(k=k, d=d, labels=labels, max_k=max_k)


def teacher_epochs(options: EncodeOptions, epochs: int, train_images: int) -> int:
    """Epochs of the teacher over all classes: the experts' `epochs`, raised until it trains
    `MIN_TEACHER_STEPS` SGD steps (its labels are what relates classes of different subtasks, and
    a one-epoch teacher's cost points: benchmarks/RESULTS.md, "Federated"); `--expert-epochs` as given."""
    if options.expert_epochs:
        return epochs
    return max(epochs, math.ceil(MIN_TEACHER_STEPS / steps_per_epoch(train_images, ExpertConfig.batch_size)))


def unsearched_plan(dataset: Any, b: Budget, options: EncodeOptions, subtasks: int, split: str,
                    data: Optional[DataSpec]) -> tuple[FederatedPlan, Layout]:
    """The plan with everything fixed but the share (budget / subtasks here) and the part plans
    (none yet): class groups, seeds, labels, teacher, run key, merged provenance; and its layout."""
    n = dataset.metadata().num_classes
    counts = dataset.class_counts()
    groups = split_classes(n, subtasks, split, counts.tolist())
    layout = merged_layout(dataset, b, options)
    cfg = options.distill_config()
    n_exp, n_ep = options.expert_settings(cfg)
    epochs = teacher_epochs(options, n_ep, len(dataset))
    # The teacher is the single-task encode's expert 0 at the same epochs and seed (same cache key),
    # so a single-task run with --expert-epochs E has already trained it, and the other way round.
    teacher = None if layout.labels.kind == "hard" else {"experts": 1, "epochs": epochs, "seed": options.seed}
    seeds = [subtask_seed(options.seed, i) for i in range(subtasks)]
    # Every input of the final K is in the key. The key (so each part's header) is fixed before the
    # search: a subtask's encode then re-plans its part to the byte, whatever K the search settles on.
    run = run_key(dataset, b, split, groups, options.seed, options, layout.k, layout.d, layout.labels, teacher)
    merged_prov = {"encoder": f"d3codec {__version__}", "seed": options.seed, "objective": cfg.objective,
                   "iterations": cfg.iterations, "experts": [n_exp, n_ep],
                   "federated": {"subtasks": subtasks, "split": split, "teacher": teacher},
                   "compute": compute_record(options.device, threads=1)}
    if options.own_class_weight and teacher is not None:
        merged_prov["own_class_weight"] = options.own_class_weight
    fplan = FederatedPlan(budget=b, split=split, groups=groups, seeds=seeds, share=b.bytes // subtasks, plans=[],
                          labels=layout.labels, teacher=teacher, run=run, merged_provenance=merged_prov, bound=0,
                          breakdown={}, guaranteed=True, num_classes=n,
                          images=[int(counts[g].sum()) for g in groups],
                          image_shape=tuple(int(x) for x in dataset.metadata().image_shape), data=data, options=options)
    return fplan, layout


def part_plans(dataset: Any, fplan: FederatedPlan, share: int, k: int, d: int,
               widths: Optional[list[int]] = None) -> list[Plan]:
    """Each subtask's single-task plan at byte share `share` with K=`k`, D=`d` (and decoder
    `widths`, when given); `BudgetError` when a part cannot hold its smallest decoder."""
    b, subtasks = fplan.budget, fplan.subtasks
    if share - DATASET_RESERVE < 1:
        raise BudgetError(f"budget {b.bytes:,} bytes is too small for {subtasks} subtasks: each part gets "
                          f"about {share:,} bytes, less than its smallest decoder needs; raise --budget")
    part = planning_budget(share)
    out = []
    for i in range(subtasks):
        sub = fplan.subtask_options(i, share, k, d, widths[i] if widths else None)
        try:
            out.append(plan_for(dataset, part, sub)[0])
        except BudgetError:
            raise BudgetError(f"budget {b.bytes:,} bytes is too small for {subtasks} subtasks: each part gets "
                              f"about {share:,} bytes, less than its smallest decoder needs; raise --budget or "
                              "use fewer --subtasks") from None
    return out


def merged_size(dataset: Any, fplan: FederatedPlan, share: int, plans: list[Plan]) -> Trial:
    """The merged file of these part plans: its strict bound when that fits or every part plan is
    guaranteed, else the planner's estimate; with its bytes per part."""
    metadata, b = dataset.metadata(), fplan.budget
    pairs = list(zip(fplan.groups, plans))
    placeholder = placeholder_merged(metadata, pairs, fplan.labels, fplan.merged_provenance, b)
    bound = size_upper_bound(placeholder)
    if bound <= b.bytes or all(p.guaranteed for p in plans):
        return Trial(share, plans, bound, raw_parts(placeholder, bound), True)
    zeros = placeholder_merged(metadata, pairs, fplan.labels, fplan.merged_provenance, b, zeros=True)
    parts = estimate_parts(zeros, **constant_prior_std(zeros, not fplan.options.distill_config().learn_logvar))
    return Trial(share, plans, sum(parts.values()), parts, False)


def search_share(dataset: Any, fplan: FederatedPlan, layout: Layout) -> tuple[Optional[Trial], Trial]:
    """(the largest share whose merged file fits, or None; the last share tried) at K=`layout.k`.
    From budget / subtasks up by the slack the fitting trial left, or down by the excess of one
    that did not, for at most `SEARCH_PASSES` trials."""
    b, subtasks = fplan.budget.bytes, fplan.subtasks
    share, cap = b // subtasks, b
    best: Optional[Trial] = None
    for _ in range(SEARCH_PASSES):
        trial = merged_size(dataset, fplan, share, part_plans(dataset, fplan, share, layout.k, layout.d))
        if trial.size <= b:
            if best is None or share > best.share:
                best = trial
            slack = (b - trial.size) // subtasks
            if slack < 8 or share >= cap:
                break
            share = min(cap, share + slack)
        else:
            if best is not None:
                break
            share -= max(1, math.ceil((trial.size - b) / subtasks))
    return best, trial


def search_latents(dataset: Any, fplan: FederatedPlan, layout: Layout, best: Optional[Trial],
                   last: Trial) -> Optional[Trial]:
    """The trial with the largest K that fits at the searched share and decoder widths: more
    components where the parts' width steps left bytes (above `layout.k`, up to the data's cap),
    or fewer where the merged file's own parts (header, soft labels) left too few (when no share
    fitted at `layout.k`); `best` when no other K fits."""
    start = best or last
    widths = [p.hparams["width"] for p in start.plans]
    lo, hi = (layout.k, max(layout.k, component_cap(layout.max_k))) if best else (0, layout.k - 1)
    while lo < hi:  # the largest K in (lo, hi] that fits; lo fits already (or is 0)
        mid = (lo + hi + 1) // 2
        try:
            plans = part_plans(dataset, fplan, start.share, mid, layout.d, widths)
        except BudgetError:
            hi = mid - 1
            continue
        trial = merged_size(dataset, fplan, start.share, plans)
        if trial.size <= fplan.budget.bytes:
            best, lo = trial, mid
        else:
            hi = mid - 1
    return best
