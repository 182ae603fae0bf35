"""`FederatedPlan`: everything a federated run does, fixed before training; each subtask's encode
options and the run key that names the run (every setting that shapes its bytes)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional, Sequence

from d3codec._version import __version__
from d3codec.distill.api import EncodeOptions, compute_record
from d3codec.distill.distiller import default_fit_steps, images_per_class
from d3codec.distill.federated.split import class_ranges
from d3codec.distill.labels import LabelStorage
from d3codec.distill.merge import RECORD, DataSpec
from d3codec.distill.planner import Plan
from d3codec.format.types import Budget

#: Bumped when the federated plan or part layout changes (part of every run key).
FEDERATED_VERSION = 2
#: Bytes of each part kept for the dataset reference `merge` reopens (paths): parts are planned
#: without it, so where the data and caches live never changes what is trained.
DATASET_RESERVE = 512


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
    image_shape: tuple[int, ...]    # (C, H, W) of the data
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
        return planning_budget(self.share)

    def record(self, index: int, share: Optional[int] = None) -> dict[str, Any]:
        """The `federated` provenance record of part `index` (what `merge` reads)."""
        return {"run": self.run, "subtask": index, "subtasks": self.subtasks, "num_classes": self.num_classes,
                "budget": asdict(self.budget), "share": self.share if share is None else share,
                "labels": asdict(self.labels), "teacher": self.teacher,
                "merged": self.merged_provenance}

    @property
    def teacher_cache_dir(self) -> Optional[str]:
        """The expert cache the teacher is trained into and found in (the data's, where given)."""
        return self.data.cache_dir if self.data else self.options.cache_dir

    def subtask_options(self, index: int, share: Optional[int] = None, k: Optional[int] = None,
                        d: Optional[int] = None, width: Optional[int] = None) -> EncodeOptions:
        """The single-task `encode` options of subtask `index`: K, D and the decoder width are the
        searched plan's unless given (the search's trials give them), its work `subtask_work`."""
        k = k if k is not None else (self.plans[0].latents_per_class if self.plans else None)
        d = d if d is not None else (self.plans[0].latent_dim if self.plans else None)
        width = width if width is not None else (self.plans[index].hparams["width"] if self.plans else None)
        group = self.groups[index]
        work = subtask_work(self.options, len(group), self.num_classes, sum(self.images), self.image_shape,
                            self.budget.bytes, k)
        return subtask_options(self.options, group, self.seeds[index], k, d, self.record(index, share), width, work)

    def summary(self) -> str:
        b = self.budget
        lines = [f"federated plan: {self.subtasks} subtasks ({self.split} split) of {self.num_classes:,} classes, "
                 f"budget {b.bytes:,} bytes ({b.spec or b.unit}), run {self.run[:12]}",
                 f"merged file {'at most' if self.guaranteed else 'estimated at'} {self.bound:,} bytes "
                 f"({100.0 * self.bound / b.bytes:.1f}% of budget): "
                 + ", ".join(f"{k} {v:,}" for k, v in self.breakdown.items()),
                 "labels " + (f"from a teacher over all classes ({self.teacher['experts']} expert x "
                              f"{self.teacher['epochs']} epochs): " if self.teacher else "") + self.labels.describe(),
                 f"each subtask: at most {self.share:,} bytes (a part's header and dataset reference are held once "
                 "in the merged file)"]
        for i, (g, plan) in enumerate(zip(self.groups, self.plans)):
            parts = ", ".join(f"{k} {v:,}" for k, v in plan.breakdown.items())
            options = self.subtask_options(i)
            cfg = options.distill_config()
            experts, epochs = options.expert_settings(cfg, self.images[i])
            lines.append(f"  subtask {i}: classes {class_ranges(g)} ({len(g)} classes, {self.images[i]:,} images); "
                         f"decoder {plan.family} width {plan.hparams.get('width')} ({plan.num_params:,} params, "
                         f"{plan.weight_dtype}), K={plan.latents_per_class}, D={plan.latent_dim}; "
                         f"part {'<=' if plan.guaranteed else '~'} {plan.bound:,} bytes ({parts}); "
                         f"{experts} expert x {epochs} epochs, {cfg.fit_iterations:,} fit steps, "
                         f"{cfg.iterations:,} iterations")
        return "\n".join(lines)


def planning_budget(share: int) -> Budget:
    """What a subtask's encode plans for at byte share `share`: the share less the dataset reserve."""
    return Budget(bytes=share - DATASET_RESERVE, unit="bytes", ipc=None, spec=str(share - DATASET_RESERVE))


def subtask_work(options: EncodeOptions, classes: int, num_classes: int, train_images: int,
                 image_shape: Sequence[int], budget_bytes: int, k: Optional[int]) -> dict[str, int]:
    """The default work of a subtask of `classes` of the run's `num_classes` classes, as
    `EncodeOptions` fields: its share of what the single task of all classes at K=`k` would do, so
    S subtasks do about one task's work between them. The fit: the single task's steps times the
    share, but at least the floor every decoder gets (`DistillConfig.fit_steps`: a decoder trained
    for less fits worse, RESULTS.md "Subtasks that do their share"); the experts: the single task's epochs, over the subtask's
    images; the objective: as many draws of each class as the single task's. What the user set
    (--fit-steps, --expert-epochs, --iterations) passes unchanged."""
    cfg = options.distill_config()
    share = classes / max(1, num_classes)
    work: dict[str, int] = {}
    if options.fit_steps is None and "fit_steps" not in options.overrides and cfg.init == "real" and k:
        ipc = images_per_class(budget_bytes, num_classes, image_shape)
        whole = default_fit_steps(num_classes * k, cfg, image_shape, ipc)
        work["fit_steps"] = max(cfg.fit_steps, round(share * whole))
    if options.expert_epochs is None:
        work["expert_epochs"] = options.expert_settings(cfg, train_images)[1]
    if options.iterations is None and "iterations" not in options.overrides and cfg.iterations:
        drawn = lambda n: min(n, cfg.mmd_classes or n)  # noqa: E731  classes an MMD update draws
        work["iterations"] = max(1, round(cfg.iterations * share * drawn(num_classes) / drawn(classes)))
    return work


def subtask_options(options: EncodeOptions, classes: Sequence[int], seed: int, k: Optional[int], d: Optional[int],
                    record: dict[str, Any], width: Optional[int] = None,
                    work: Optional[dict[str, int]] = None) -> EncodeOptions:
    """The run's options narrowed to one subtask: its classes, seed, the shared K and D, hard labels
    (the merged file's labels come from the teacher), one thread, its `federated` record and its
    `work` (fit steps, expert epochs, iterations: `subtask_work`)."""
    return replace(options, classes=list(classes), seed=seed, latents_per_class=k, latent_dim=d, labels="hard",
                   own_class_weight=0.0, width=width or options.width, dry_run=False, resume=True,
                   extra_provenance={**options.extra_provenance, RECORD: record,
                                     "compute": compute_record(options.device, threads=1)},
                   **(work or {}))


def run_key(dataset: Any, budget: Budget, split: str, groups: list[list[int]], seed: int, options: EncodeOptions,
            k: int, d: int, labels: LabelStorage, teacher: Optional[dict[str, Any]]) -> str:
    """Hash of every setting that shapes the run's bytes (a rerun reuses parts whose key matches)."""
    cfg = options.distill_config()
    text = json.dumps({"v": FEDERATED_VERSION, "d3codec": __version__, "fingerprint": dataset.fingerprint,
                       "budget": budget.bytes, "split": split, "groups": groups, "seed": seed,
                       "config": cfg.to_json(), "experts": list(options.expert_settings(cfg)), "k": k, "d": d,
                       "labels": asdict(labels), "teacher": teacher, "weights": options.weight_dtype,
                       "latents": options.latent_dtype, "width": options.width, "device": str(options.device),
                       "threads": 1}, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
