"""Federated distillation: split the classes into subtasks, distil each on its own (own experts, own
decoder, its share of the budget), in parallel on torch.distributed ranks, then merge.

`plan_federated` fixes everything before any training: the class groups (`contiguous` as in the
paper, or `balanced` by image count), each subtask's seed (derived from the global seed and the
subtask index, never from a rank), K latents and dimension D shared by all subtasks (the merged
priors are one [N, K, D] tensor), the label storage and teacher of the merged file, and the
per-subtask byte share, searched up from budget / subtasks (each part carries a header the merged
file holds once) so that the merged file's size estimate fits the budget. D is the single-task
plan's; K starts at the single-task planner's share of the budget, the search gives each part its
widest decoder, then K grows into what their width steps left.

`encode_federated` runs it: serially, with `nproc` local processes, or under `torchrun` (ranks
from RANK / WORLD_SIZE / LOCAL_RANK, a gloo group only for barriers). Task t (subtasks, then the
teacher when labels are soft) goes to rank t % world. With more ranks than subtasks, rank r also
joins the group of subtask r % K and trains its share of that subtask's experts (expert i goes to
the group's member i % group size) into the shared expert cache; the group's lead (rank s) waits
for its members' done markers in the work folder, then distils. Each finished subtask is written at once,
atomically, as a valid part file in `<output>.parts/`; a rerun of the same command reuses every
part whose run key matches and resumes unfinished subtasks from their checkpoints, so the final
file is the one an uninterrupted run writes. All compute runs with one intra-op thread per process:
that, and seeds that ignore ranks, make serial, torchrun and separate `--subtask` jobs + `merge`
byte-identical on CPU.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from d3codec._version import __version__
from d3codec.encode.api import EncodeOptions, check_output, compute_record, encode, plan_for, smallest_class
from d3codec.encode.classifier import derive_seed
from d3codec.encode.labels import LabelStorage, resolve_labels
from d3codec.encode.merge import RECORD, DataSpec, merge_parts, placeholder_merged, single_thread
from d3codec.encode.planner import (Plan, component_cap, constant_prior_std, default_latents_per_class, estimate_parts,
                                    label_bytes, plan_budget, raw_parts)
from d3codec.errors import BudgetError, ConfigError
from d3codec.format.atomic import write_atomic
from d3codec.format.types import Budget, D3File

Log = Callable[[str], None]

SPLITS = ("contiguous", "balanced")
#: Bumped when the federated plan or part layout changes (part of every run key).
FEDERATED_VERSION = 1
#: Share searches: at most this many planner passes over all subtasks.
_SEARCH_PASSES = 6
#: Bytes of each part kept for the dataset reference `merge` reopens (paths): parts are planned
#: without it, so where the data and caches live never changes what is trained.
DATASET_RESERVE = 512


# ---------------------------------------------------------------- splitting

def split_classes(num_classes: int, subtasks: int, mode: str = "contiguous",
                  counts: Optional[Sequence[int]] = None) -> list[list[int]]:
    """Class ids of each subtask. Group sizes differ by at most one class; `contiguous` takes runs
    of consecutive ids (the paper), `balanced` gives each class, largest first, to the open group
    with the fewest images so far (`counts`: images per class)."""
    if mode not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, not {mode!r}")
    if subtasks < 1:
        raise ConfigError(f"--subtasks must be at least 1, got {subtasks}")
    if num_classes < 2 * subtasks:
        raise ConfigError(f"{num_classes} classes cannot make {subtasks} subtasks of at least 2 classes each "
                          f"(experts need 2); use --subtasks {max(1, num_classes // 2)} or fewer")
    base, extra = divmod(num_classes, subtasks)
    sizes = [base + (1 if i < extra else 0) for i in range(subtasks)]
    if mode == "contiguous":
        starts = np.cumsum([0] + sizes)
        return [list(range(int(starts[i]), int(starts[i + 1]))) for i in range(subtasks)]
    if counts is None or len(counts) != num_classes:
        raise ConfigError("a balanced split needs the image count of every class")
    groups: list[list[int]] = [[] for _ in range(subtasks)]
    load = [0] * subtasks
    for c in sorted(range(num_classes), key=lambda c: (-int(counts[c]), c)):
        open_ = [g for g in range(subtasks) if len(groups[g]) < sizes[g]]
        g = min(open_, key=lambda g: (load[g], len(groups[g]), g))
        groups[g].append(c)
        load[g] += int(counts[c])
    groups = [sorted(g) for g in groups]
    return sorted(groups, key=lambda g: g[0])


def assigned_tasks(num_tasks: int, rank: int, world: int) -> list[int]:
    """Round-robin: the tasks rank `rank` of `world` runs (task t goes to rank t % world)."""
    return [t for t in range(num_tasks) if t % world == rank]


def subtask_seed(seed: int, index: int) -> int:
    """Seed of subtask `index` (its experts, latents, decoder): from the global seed alone."""
    return derive_seed(seed, "federated-subtask", index)


def _ranges(classes: Sequence[int], limit: int = 60) -> str:
    """`0-199` / `0,3,5-9` (cut at `limit` characters)."""
    out: list[str] = []
    run: list[int] = []
    for c in list(classes) + [None]:  # type: ignore[list-item]
        if run and (c is None or c != run[-1] + 1):
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 2 else ",".join(map(str, run)))
            run = []
        if c is not None:
            run.append(c)
    text = ",".join(out)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- planning

@dataclass
class FederatedPlan:
    """Everything a federated run does, fixed before training starts."""

    budget: Budget
    split: str
    groups: list[list[int]]
    seeds: list[int]
    share: int                      # bytes each part may take
    plans: list[Plan]               # each subtask's planner output (at `share`)
    labels: LabelStorage            # of the merged file
    teacher: Optional[dict[str, Any]]
    run: str                        # run key: hash of every setting that shapes the result
    merged_provenance: dict[str, Any]
    bound: int                      # merged file: strict upper bound (or estimate when not guaranteed)
    breakdown: dict[str, int]       # merged file: part -> bytes (bounds, or estimates)
    guaranteed: bool
    num_classes: int
    images: list[int]               # training images per subtask
    data: Optional[DataSpec] = None
    options: EncodeOptions = field(default_factory=EncodeOptions)

    @property
    def subtasks(self) -> int:
        return len(self.groups)

    @property
    def num_tasks(self) -> int:
        """Subtasks, plus the teacher's training when the merged file has soft labels."""
        return self.subtasks + (1 if self.teacher is not None else 0)

    def part_budget(self) -> Budget:
        """What each part may take: its share of the budget."""
        return Budget(bytes=self.share, unit="bytes", ipc=None, spec=str(self.share))

    def planning_budget(self) -> Budget:
        """What each subtask's encode plans for: the share less the dataset reference's reserve."""
        return Budget(bytes=self.share - DATASET_RESERVE, unit="bytes", ipc=None, spec=str(self.share - DATASET_RESERVE))

    def record(self, index: int, share: Optional[int] = None) -> dict[str, Any]:
        """The `federated` provenance record of part `index` (what `merge` reads)."""
        return {"run": self.run, "subtask": index, "subtasks": self.subtasks, "num_classes": self.num_classes,
                "budget": asdict(self.budget), "share": self.share if share is None else share,
                "labels": asdict(self.labels), "teacher": self.teacher,
                "merged": self.merged_provenance}

    def subtask_options(self, index: int, share: Optional[int] = None) -> EncodeOptions:
        """The single-task `encode` options of subtask `index`."""
        return _subtask_options(self.options, self.groups[index], self.seeds[index],
                                self.plans[0].latents_per_class if self.plans else None,
                                self.plans[0].latent_dim if self.plans else None, self.record(index, share),
                                self.plans[index].hparams["width"] if self.plans else None)

    def summary(self) -> str:
        b = self.budget
        lines = [f"federated plan: {self.subtasks} subtasks ({self.split} split) of {self.num_classes:,} classes, "
                 f"budget {b.bytes:,} bytes ({b.spec or b.unit}), run {self.run[:12]}",
                 f"merged file {'at most' if self.guaranteed else 'estimated at'} {self.bound:,} bytes "
                 f"({100.0 * self.bound / b.bytes:.1f}% of budget): "
                 + ", ".join(f"{k} {v:,}" for k, v in self.breakdown.items()),
                 f"labels {self.labels.describe()}"
                 + (f" from a teacher over all classes ({self.teacher['experts']} expert x "
                    f"{self.teacher['epochs']} epochs)" if self.teacher else ""),
                 f"each subtask: at most {self.share:,} bytes (a part's header and dataset reference are held once "
                 "in the merged file)"]
        for i, (g, plan) in enumerate(zip(self.groups, self.plans)):
            parts = ", ".join(f"{k} {v:,}" for k, v in plan.breakdown.items())
            lines.append(f"  subtask {i}: classes {_ranges(g)} ({len(g)} classes, {self.images[i]:,} images); "
                         f"decoder {plan.family} width {plan.hparams.get('width')} ({plan.num_params:,} params, "
                         f"{plan.weight_dtype}), K={plan.latents_per_class}, D={plan.latent_dim}; "
                         f"part {'<=' if plan.guaranteed else '~'} {plan.bound:,} bytes ({parts})")
        return "\n".join(lines)


def _subtask_options(options: EncodeOptions, classes: Sequence[int], seed: int, k: Optional[int], d: Optional[int],
                     record: dict[str, Any], width: Optional[int] = None) -> EncodeOptions:
    return replace(options, classes=list(classes), seed=seed, latents_per_class=k, latent_dim=d, labels="hard",
                   width=width or options.width, dry_run=False, resume=True,
                   extra_provenance={**options.extra_provenance, RECORD: record,
                                     "compute": compute_record(options.device, threads=1)})


def _run_key(dataset: Any, budget: Budget, split: str, groups: list[list[int]], seed: int, options: EncodeOptions,
             k: int, d: int, labels: LabelStorage, teacher: Optional[dict[str, Any]]) -> str:
    cfg = options.distill_config()
    text = json.dumps({"v": FEDERATED_VERSION, "d3codec": __version__, "fingerprint": dataset.fingerprint,
                       "budget": budget.bytes, "split": split, "groups": groups, "seed": seed,
                       "config": cfg.to_json(), "experts": list(options.expert_settings(cfg)), "k": k, "d": d,
                       "labels": asdict(labels), "teacher": teacher, "weights": options.weight_dtype,
                       "latents": options.latent_dtype, "width": options.width, "device": str(options.device),
                       "threads": 1}, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def plan_federated(dataset: Any, budget: Union[str, int, Budget], options: EncodeOptions, subtasks: int,
                   split: str = "contiguous", data: Optional[DataSpec] = None) -> FederatedPlan:
    """The whole run's plan (see the module docstring); `BudgetError` when the parts cannot fit,
    naming the smallest budget (in bytes) that plans for these settings."""
    from d3codec.format.budget import parse_budget

    if options.classes is not None:
        raise ConfigError("--classes and --subtasks do not combine; subtasks split all classes of the dataset")
    metadata = dataset.metadata()
    b = budget if isinstance(budget, Budget) else parse_budget(budget, metadata.num_classes, metadata.image_shape)
    try:
        return _plan_federated(dataset, b, options, subtasks, split, data)
    except BudgetError as exc:
        reason = str(exc).split("; raise")[0]

        def works(nbytes: int) -> bool:
            try:
                _plan_federated(dataset, Budget(nbytes, "bytes", None, str(nbytes)), options, subtasks, split, data)
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


def _plan_federated(dataset: Any, b: Budget, options: EncodeOptions, subtasks: int, split: str,
                    data: Optional[DataSpec]) -> FederatedPlan:
    from d3codec.encode.experts import ExpertConfig
    from d3codec.format.io import size_upper_bound

    metadata = dataset.metadata()
    n = metadata.num_classes
    counts = dataset.class_counts()
    groups = split_classes(n, subtasks, split, counts.tolist())
    cfg = options.distill_config()
    n_exp, n_ep = options.expert_settings(cfg)
    max_k = smallest_class(dataset)
    # D and label storage of the merged file: what the single-task plan of all classes picks.
    whole = plan_budget(metadata, b, latents_per_class=options.latents_per_class, latent_dim=options.latent_dim,
                        width=options.width, weight_dtype=options.weight_dtype, latent_dtype=options.latent_dtype,
                        labels=resolve_labels(options.labels, n_ep, len(dataset), ExpertConfig.batch_size),
                        constant_logvar=not cfg.learn_logvar, max_latents_per_class=max_k)
    k, d, labels = whole.latents_per_class, whole.latent_dim, whole.labels
    # K starts where the single-task planner starts (its share of the budget), not where that plan
    # ended: its K filled the bytes one decoder left. The share search below gives each part its
    # widest decoder, then K fills what their width steps left (the single-task rule, for S decoders).
    if options.latents_per_class is None:
        k = min(k, default_latents_per_class(b, n, d, options.latent_dtype, label_bytes(labels, n),
                                                 not cfg.learn_logvar))
    teacher = None if labels.kind == "hard" else {"experts": 1, "epochs": n_ep,
                                                   "seed": derive_seed(options.seed, "federated-teacher")}
    seeds = [subtask_seed(options.seed, i) for i in range(subtasks)]
    # Every input of the final K is in the key. The key (so each part's header) is fixed before the
    # search: a subtask's encode then re-plans its part to the byte, whatever K the search settles on.
    run = _run_key(dataset, b, split, groups, options.seed, options, k, d, labels, teacher)
    merged_prov = {"encoder": f"d3codec {__version__}", "seed": options.seed, "objective": cfg.objective,
                   "iterations": cfg.iterations, "experts": [n_exp, n_ep],
                   "federated": {"subtasks": subtasks, "split": split, "teacher": teacher},
                   "compute": compute_record(options.device, threads=1)}
    fplan = FederatedPlan(budget=b, split=split, groups=groups, seeds=seeds, share=b.bytes // subtasks, plans=[],
                          labels=labels, teacher=teacher, run=run, merged_provenance=merged_prov, bound=0,
                          breakdown={}, guaranteed=True, num_classes=n,
                          images=[int(counts[g].sum()) for g in groups], data=data, options=options)

    def plans_at(share: int, k: int = k, widths: Optional[list[int]] = None) -> list[Plan]:
        if share - DATASET_RESERVE < 1:
            raise BudgetError(f"budget {b.bytes:,} bytes is too small for {subtasks} subtasks: each part gets "
                              f"about {share:,} bytes, less than its smallest decoder needs; raise --budget")
        fplan.share = share
        part = fplan.planning_budget()
        out = []
        for i in range(subtasks):
            sub = _subtask_options(options, groups[i], seeds[i], k, d, fplan.record(i, share),
                                   widths[i] if widths else None)
            try:
                out.append(plan_for(dataset, part, sub)[0])
            except BudgetError:
                raise BudgetError(f"budget {b.bytes:,} bytes is too small for {subtasks} subtasks: each part gets "
                                  f"about {share:,} bytes, less than its smallest decoder needs; raise --budget or "
                                  "use fewer --subtasks") from None
        return out

    def merged_size(plans: list[Plan]) -> tuple[int, dict[str, int], bool]:
        """The strict bound when it fits or every part plan is guaranteed; else the planner's
        estimate; with its bytes per part."""
        pairs = list(zip(groups, plans))
        placeholder = placeholder_merged(metadata, pairs, labels, merged_prov, b)
        bound = size_upper_bound(placeholder)
        if bound <= b.bytes or all(p.guaranteed for p in plans):
            return bound, raw_parts(placeholder, bound), True
        zeros = placeholder_merged(metadata, pairs, labels, merged_prov, b, zeros=True)
        parts = estimate_parts(zeros, **constant_prior_std(zeros, not cfg.learn_logvar))
        return sum(parts.values()), parts, False

    # From budget / subtasks up: each part carries a header the merged file holds once.
    share, cap = b.bytes // subtasks, b.bytes
    best: Optional[tuple[int, list[Plan], int, dict[str, int], bool]] = None
    for _ in range(_SEARCH_PASSES):
        plans = plans_at(share)
        size, parts, strict = merged_size(plans)
        if size <= b.bytes:
            if best is None or share > best[0]:
                best = (share, plans, size, parts, strict)
            slack = (b.bytes - size) // subtasks
            if slack < 8 or share >= cap:
                break
            share = min(cap, share + slack)
        else:
            if best is not None:
                break
            share -= max(1, math.ceil((size - b.bytes) / subtasks))
    if options.latents_per_class is None:
        # More components where the parts' width steps left bytes, or fewer where the merged file's
        # own parts (header, soft labels) left too few.
        share = best[0] if best else fplan.share
        widths = [p.hparams["width"] for p in (best[1] if best else plans)]
        lo, hi = (k, max(k, component_cap(max_k))) if best else (0, k - 1)
        while lo < hi:  # the largest K in (lo, hi] that fits; lo fits already (or is 0)
            mid = (lo + hi + 1) // 2
            try:
                trial = plans_at(share, mid, widths)
            except BudgetError:
                hi = mid - 1
                continue
            size, parts, strict = merged_size(trial)
            if size <= b.bytes:
                best, lo = (share, trial, size, parts, strict), mid
            else:
                hi = mid - 1
    if best is None:
        raise BudgetError(f"budget {b.bytes:,} bytes is too small for {subtasks} subtasks after their shared "
                          f"parts (merged header, labels); raise --budget or use fewer --subtasks")
    fplan.share, fplan.plans, fplan.bound, fplan.breakdown, fplan.guaranteed = best
    fplan.guaranteed = fplan.guaranteed and all(p.guaranteed for p in fplan.plans)
    return fplan


# ---------------------------------------------------------------- sharing a subtask's experts

def subtask_group(index: int, subtasks: int, world: int) -> list[int]:
    """Ranks that train subtask `index`'s experts, its lead (the rank that distils it) first: the
    ranks r with r % subtasks == index when there are more ranks than subtasks, else its one rank."""
    if world > subtasks:
        return list(range(index, world, subtasks))
    return [index % world]


def experts_per_subtask(fplan: FederatedPlan) -> int:
    """How many experts each subtask trains (the same for all: it does not depend on the images)."""
    options = fplan.subtask_options(0)
    return options.expert_settings(options.distill_config())[0]


def expert_owner(fplan: FederatedPlan, index: int, expert: int, world: int) -> int:
    """The rank that trains expert `expert` of subtask `index`: its group's member expert % size."""
    group = subtask_group(index, fplan.subtasks, world)
    return group[expert % len(group)]


def expert_shares(fplan: FederatedPlan, rank: int, world: int) -> list[tuple[int, list[int]]]:
    """(subtask, expert indices) rank `rank` trains for a subtask it shares with other ranks; empty
    with no more ranks than subtasks (each subtask's one rank then trains all its experts)."""
    if world <= fplan.subtasks:
        return []
    index = rank % fplan.subtasks
    mine = [i for i in range(experts_per_subtask(fplan)) if expert_owner(fplan, index, i, world) == rank]
    return [(index, mine)] if mine else []


def _expert_setup(dataset: Any, fplan: FederatedPlan, index: int) -> tuple[Any, list[int]]:
    """Subtask `index`'s expert settings and classes, exactly as its `encode` asks `ensure_experts`
    for them (so experts trained elsewhere land in the folder its distillation reads)."""
    from d3codec.encode.experts import ExpertConfig

    options = fplan.subtask_options(index)
    cfg = options.distill_config()
    real = dataset.subset(fplan.groups[index])
    _, epochs = options.expert_settings(cfg, len(real))
    return ExpertConfig(epochs=epochs, seed=cfg.seed), [int(c) for c in real.classes]


def _marker(workdir: str, index: int, expert: int) -> str:
    """Prefix of the done / failed marker of expert `expert` of subtask `index` (`.done`, `.failed`)."""
    return f"{part_path(workdir, index)}.expert-{expert:04d}"


def _write_marker(path: str, record: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(record).encode())


def clear_expert_markers(workdir: str) -> None:
    """Remove the expert markers of earlier invocations (called once per run, before any rank starts)."""
    if not os.path.isdir(workdir):
        return
    for name in os.listdir(workdir):
        if ".expert-" in name:
            try:
                os.unlink(os.path.join(workdir, name))
            except OSError:
                pass


def train_expert_shares(dataset: Any, fplan: FederatedPlan, workdir: str, rank: int, world: int,
                        device: Optional[str] = None, log: Optional[Log] = None) -> list[tuple[int, int, bool]]:
    """Train this rank's share of the experts of the subtask it shares (see `expert_shares`), one by
    one into the expert cache, each followed by its done marker (a failed one leaves a failed
    marker, so the lead stops waiting). Returns (subtask, expert, trained here: not found cached)."""
    from d3codec.encode.experts import train_experts

    say: Log = log or (lambda s: None if fplan.options.quiet else print(s, file=sys.stderr))
    n = experts_per_subtask(fplan)
    out: list[tuple[int, int, bool]] = []
    for index, mine in expert_shares(fplan, rank, world):
        group = subtask_group(index, fplan.subtasks, world)
        done = finished_part(part_path(workdir, index), fplan.run, index) is not None
        config, classes = _expert_setup(dataset, fplan, index)
        for i in mine:
            record: dict[str, Any] = {"run": fplan.run, "rank": rank, "world": world, "subtask": index, "expert": i}
            try:
                if done:  # the part is finished: nobody needs this expert now
                    folder, trained = "", []
                else:
                    with single_thread():
                        folder, trained = train_experts(dataset, [i], config, classes=classes,
                                                        cache_dir=fplan.options.cache_dir,
                                                        device=device or fplan.options.device,
                                                        progress=not fplan.options.quiet)
            except BaseException as e:
                _write_marker(_marker(workdir, index, i) + ".failed", {**record, "error": f"{type(e).__name__}: {e}"})
                raise
            _write_marker(_marker(workdir, index, i) + ".done", {**record, "folder": folder, "trained": bool(trained)})
            out.append((index, i, bool(trained)))
            what = "part already done" if done else ("trained" if trained else "found cached")
            say(f"subtask {index}: expert {i} of {n} {what} (experts shared by ranks {','.join(map(str, group))})")
    return out


class SharedExpertFailed(RuntimeError):
    """Another rank failed training an expert this rank's subtask waits for (its own error says why)."""


def _wait_for_experts(workdir: str, fplan: FederatedPlan, index: int, shared: dict[int, int], say: Log,
                      poll: float = 0.05) -> None:
    """Wait until every expert of subtask `index` that other ranks train (expert -> rank) has its
    done marker; raise when one has a failed marker. A marker whose folder this rank cannot see
    (a cache not shared by the ranks) only means `encode` trains that expert again, to the same values."""
    pending = dict(shared)
    if pending:
        say(f"subtask {index}: waiting for experts {sorted(pending)} from ranks {sorted(set(pending.values()))}")
    while pending:
        for i, r in sorted(pending.items()):
            prefix = _marker(workdir, index, i)
            if os.path.isfile(prefix + ".failed"):
                with open(prefix + ".failed") as f:
                    error = json.load(f).get("error", "")
                raise SharedExpertFailed(f"rank {r} failed training expert {i} of subtask {index} ({error}); "
                                   "rerun the same command to resume")
            if os.path.isfile(prefix + ".done"):
                with open(prefix + ".done") as f:
                    record = json.load(f)
                del pending[i]
                where = os.path.join(record.get("folder", ""), f"expert_{i:04d}.safetensors")
                if record.get("folder") and not os.path.isfile(where):
                    say(f"subtask {index}: expert {i} from rank {r} is not in this rank's cache ({where}); "
                        "training it here (give the ranks one shared --cache-dir to avoid this)")
                else:
                    say(f"subtask {index}: expert {i} from rank {r}")
        if pending:
            time.sleep(poll)


# ---------------------------------------------------------------- running

def part_path(workdir: str, index: int) -> str:
    return os.path.join(workdir, f"part-{index:03d}.d3")


def finished_part(path: str, run: str, index: int) -> Optional[D3File]:
    """The part at `path` when it is a complete part of this run's subtask `index`, else None."""
    from d3codec.format.io import load

    if not os.path.isfile(path):
        return None
    try:
        d3 = load(path)
    except ConfigError:
        raise
    except Exception:  # damaged or foreign file: redo the subtask
        return None
    record = d3.provenance.get(RECORD)
    if isinstance(record, dict) and record.get("run") == run and record.get("subtask") == index:
        return d3
    return None


def run_subtask(dataset: Any, fplan: FederatedPlan, index: int, path: str, *, device: Optional[str] = None,
                log: Optional[Log] = None, shared: Optional[dict[int, int]] = None) -> D3File:
    """Distil subtask `index` into the part file `path` (atomic), unless it is already there.

    Resumes from its checkpoint when an earlier run of the same plan stopped inside this subtask;
    leftovers of another run (noted in `path.run`) are discarded. `shared` (expert -> rank): the
    experts other ranks train, waited for (their markers beside `path`) before distilling.
    """
    say: Log = log or (lambda s: None if fplan.options.quiet else print(s, file=sys.stderr))
    done = finished_part(path, fplan.run, index)
    if done is not None:
        say(f"subtask {index}: already done ({path})")
        return done
    marker, trained = path + ".run", path + ".trained.d3"
    stale = os.path.isfile(marker) and open(marker).read().strip() != fplan.run
    if stale or not os.path.isfile(marker):
        for old in (trained, trained + ".ckpt"):  # another run's leftovers
            if stale and os.path.exists(old):
                say(f"subtask {index}: removing {old}, left by a run with other settings (this run's key differs)")
            try:
                os.unlink(old)
            except OSError:
                pass
        tmp = f"{marker}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(fplan.run + "\n")
        os.replace(tmp, marker)
    options = fplan.subtask_options(index)
    if device is not None:
        options = replace(options, device=device)
    say(f"subtask {index}: {len(fplan.groups[index])} classes ({_ranges(fplan.groups[index])}), "
        f"at most {fplan.share:,} bytes -> {path}")
    if finished_part(trained, fplan.run, index) is None:  # else: stopped between training and the final write
        _wait_for_experts(os.path.dirname(os.path.abspath(path)), fplan, index, shared or {}, say)
        with single_thread():
            encode(dataset, fplan.planning_budget(), trained, options, log=say)
    d3 = _add_dataset_reference(trained, path, fplan, say)
    for extra in (trained, marker):
        try:
            os.unlink(extra)
        except OSError:
            pass
    return d3


def _add_dataset_reference(trained: str, path: str, fplan: FederatedPlan, say: Log) -> D3File:
    """Write the finished part at `path` (atomic): the trained file plus, in the reserve it was
    planned without, the dataset reference merge reopens for the labels (left out if it is too long)."""
    from d3codec.format.errors import OverBudgetError
    from d3codec.format.io import load, save

    d3 = load(trained, memory_map=False)
    record = dict(d3.provenance[RECORD])
    if fplan.data is not None and len(json.dumps(fplan.data.to_json())) < DATASET_RESERVE - 64:
        record["dataset"] = fplan.data.to_json()
    try:
        save(d3.replace(provenance={**d3.provenance, RECORD: record}), path, fplan.part_budget())
    except OverBudgetError:
        record.pop("dataset", None)
        save(d3.replace(provenance={**d3.provenance, RECORD: record}), path, fplan.part_budget())
    if "dataset" not in record:
        say(f"{path}: no room for the dataset reference; pass --dataset to d3codec merge")
    return load(path)


def run_teacher(dataset: Any, fplan: FederatedPlan, device: Optional[str] = None) -> None:
    """Train (or find cached) the merged file's teacher over all classes, as `merge` will ask for it."""
    from d3codec.encode.experts import ensure_experts

    if fplan.teacher is None:
        return
    cache_dir = fplan.data.cache_dir if fplan.data else fplan.options.cache_dir
    with single_thread():
        ensure_experts(dataset, num_experts=fplan.teacher["experts"], epochs=fplan.teacher["epochs"],
                       seed=fplan.teacher["seed"], cache_dir=cache_dir, device=device or fplan.options.device,
                       progress=not fplan.options.quiet)


def run_tasks(dataset: Any, fplan: FederatedPlan, workdir: str, rank: int, world: int,
              device: Optional[str] = None, log: Optional[Log] = None) -> list[int]:
    """Run this rank's work: first its share of a shared subtask's experts (more ranks than
    subtasks), then its tasks (round-robin over subtasks, then the teacher); returns the tasks."""
    train_expert_shares(dataset, fplan, workdir, rank, world, device, log)
    tasks = assigned_tasks(fplan.num_tasks, rank, world)
    n = experts_per_subtask(fplan)
    for t in tasks:
        if t < fplan.subtasks:
            shared = {i: r for i in range(n) if (r := expert_owner(fplan, t, i, world)) != rank}
            run_subtask(dataset, fplan, t, part_path(workdir, t), device=device, log=log, shared=shared)
        else:
            run_teacher(dataset, fplan, device)
    return tasks


def ranks_with_work(fplan: FederatedPlan, world: int) -> list[int]:
    """The ranks of `world` that have anything to do (a task or a share of some subtask's experts)."""
    return [r for r in range(world) if assigned_tasks(fplan.num_tasks, r, world) or expert_shares(fplan, r, world)]


def _rank_device(device: str, local_rank: int) -> str:
    """`cuda` -> `cuda:<local rank>` (one GPU per process); anything else unchanged."""
    return f"cuda:{local_rank}" if device == "cuda" else device


def _process_job(data: DataSpec, fplan: FederatedPlan, workdir: str, rank: int, world: int) -> list[int]:
    """One local process of `--nproc` (spawned: reopens the dataset from the cache)."""
    torch.set_num_threads(1)
    dataset = data.open("train")
    prefix = f"[process {rank}] "
    say = None if fplan.options.quiet else (lambda s: print(prefix + s.replace("\n", "\n" + prefix), file=sys.stderr))
    return run_tasks(dataset, fplan, workdir, rank, world, _rank_device(fplan.options.device, rank), log=say)


def torchrun_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} / WORLD_SIZE={world} do not fit together; run under torchrun")
    return rank, world, local


def encode_federated(data: Optional[DataSpec], budget: Union[str, int, Budget], output: Optional[str],
                     options: Optional[EncodeOptions] = None, *, subtasks: int, split: str = "contiguous",
                     subtask: Optional[int] = None, nproc: int = 1, dataset: Any = None,
                     log: Optional[Log] = None) -> Union[D3File, FederatedPlan, None]:
    """Distil the dataset as `subtasks` subtasks and merge them into `output` (see module docstring).

    `subtask=i`: only subtask i, written as the part file `output` (for batch-cluster jobs; merge
    the parts with `merge_parts`). `nproc`: local processes. Under torchrun every rank calls this;
    rank 0 merges and returns the file, the others return None. `dry_run` returns the plan after
    printing it with a compute estimate from a short timed probe.
    """
    options = options or EncodeOptions()
    say: Log = log or (lambda s: None if options.quiet else print(s, file=sys.stderr))
    if dataset is None:
        if data is None:
            raise ConfigError("give the dataset (an ImageDataset or a DataSpec)")
        dataset = data.open("train", progress=not options.quiet)
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    rank, world, local_rank = torchrun_env()
    if world > 1 and nproc > 1:
        raise ConfigError("--nproc is for local runs; under torchrun the ranks are the processes (drop --nproc)")
    if subtask is not None and not 0 <= subtask < subtasks:
        raise ConfigError(f"--subtask must be in 0..{subtasks - 1} for --subtasks {subtasks}, got {subtask}")
    with single_thread():
        fplan = plan_federated(dataset, budget, options, subtasks, split, data)
    if rank == 0:
        say(fplan.summary())
    if options.dry_run:
        if rank == 0:
            from d3codec.encode.cost import estimate_cost, render_estimate

            say(render_estimate(estimate_cost(dataset, fplan), fplan, max(world, nproc)))
        return fplan
    check_output(output)
    if subtask is not None:
        if world > 1:
            raise ConfigError("--subtask runs one subtask in one process; run it without torchrun")
        return run_subtask(dataset, fplan, subtask, output, log=say)
    workdir = os.path.abspath(output) + ".parts"
    os.makedirs(workdir, exist_ok=True)
    if world > 1:
        return _run_torchrun(dataset, fplan, workdir, output, rank, world, local_rank, say)
    if nproc > 1:
        if data is None:
            raise ConfigError("--nproc needs a dataset reference (DataSpec) the processes can reopen")
        _run_local_processes(data, fplan, workdir, nproc)
    else:
        run_tasks(dataset, fplan, workdir, 0, 1, log=say)
    return _merge_and_clean(dataset, fplan, workdir, output, say)


def _merge_and_clean(dataset: Any, fplan: FederatedPlan, workdir: str, output: str, say: Log) -> D3File:
    paths = [part_path(workdir, i) for i in range(fplan.subtasks)]
    d3 = merge_parts(paths, output, dataset=dataset, data=fplan.data, device=fplan.options.device,
                     quiet=fplan.options.quiet, log=say)
    for p in paths:
        for extra in (p, p + ".run", p + ".trained.d3", p + ".trained.d3.ckpt"):
            try:
                os.unlink(extra)
            except OSError:
                pass
    clear_expert_markers(workdir)
    try:
        os.rmdir(workdir)
    except OSError:
        pass  # something else lives there: leave it
    return d3


def _run_local_processes(data: DataSpec, fplan: FederatedPlan, workdir: str, nproc: int) -> None:
    """`nproc` local ranks as spawned processes (only those with work are started), process r
    running tasks r, r + nproc, ... and its share of experts; the first error is re-raised here."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    world = nproc if nproc > fplan.subtasks else min(nproc, fplan.num_tasks)
    ranks = ranks_with_work(fplan, world)
    clear_expert_markers(workdir)
    with ProcessPoolExecutor(max_workers=len(ranks), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_process_job, data, fplan, workdir, r, world) for r in ranks]
        wait(futures, return_when=FIRST_EXCEPTION)
        pool.shutdown(wait=True, cancel_futures=True)  # the others finish what they are doing
    errors = [e for e in (f.exception() for f in futures if not f.cancelled()) if e is not None]
    # A lead that stopped waiting for a failed expert reports the member's error, not its own.
    for e in sorted(errors, key=lambda e: isinstance(e, SharedExpertFailed)):
        raise e


def _run_torchrun(dataset: Any, fplan: FederatedPlan, workdir: str, output: str, rank: int, world: int,
                  local_rank: int, say: Log) -> Optional[D3File]:
    """Under torchrun: this rank's tasks, a barrier, then rank 0 merges."""
    import datetime

    import torch.distributed as dist

    own_group = not dist.is_initialized()
    if own_group:
        # Subtasks can take hours; a dead rank makes torchrun stop the others, so wait long.
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    prefix = f"[rank {rank}] "
    rank_say: Log = lambda s: say(prefix + s.replace("\n", "\n" + prefix))  # noqa: E731
    try:
        if rank == 0:
            clear_expert_markers(workdir)  # earlier invocations' markers: before any rank writes one
        dist.barrier()
        run_tasks(dataset, fplan, workdir, rank, world, _rank_device(fplan.options.device, local_rank), log=rank_say)
        dist.barrier()
        result = _merge_and_clean(dataset, fplan, workdir, output, say) if rank == 0 else None
        dist.barrier()
        return result
    finally:
        if own_group:
            dist.destroy_process_group()
