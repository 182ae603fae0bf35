"""Merge federated parts into one `.d3` file: every decoder, the class-to-decoder map, all priors,
then soft labels over all classes from one teacher (the paper's global labelling step), mixed with
each component's own class as the parts record (`--own-class-weight`, auto by default).

A part is a valid `.d3` file of one subtask's classes whose provenance holds a `federated` record
(written by `distill.federated`): the run key (a hash of every setting that shapes the result),
subtask index and count, the total class count, the whole budget and this subtask's share of it,
the label storage and teacher of the merged file, the merged file's provenance, and how to reopen
the dataset. `merge_parts` refuses parts that do not fit together, each kind of misfit with its own
error class and a one-line message naming the part. Merging is deterministic: the same parts give
the same bytes, whichever process merges them.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from d3codec.data import open_dataset
from d3codec.decode.decoders import mean_image_batches
from d3codec.distill.experts import ensure_experts
from d3codec.distill.labels import LabelStorage, placeholder_labels, teacher_labels
from d3codec.distill.planner import Plan, decoder_shapes, store_decoder_state, store_priors
from d3codec.distill.trim import save_within_budget
from d3codec.errors import BudgetError, ConfigError
from d3codec.format.io import load
from d3codec.format.types import PRIOR_TENSORS, Budget, D3File, DecoderEntry, Labels, Metadata, Priors, Stored

Log = Callable[[str], None]

#: Key of the subtask record in a part's provenance.
RECORD = "federated"


# ---------------------------------------------------------------- errors

class PartError(ConfigError):
    """Parts that cannot be merged into one file (base class; each misfit has its own subclass)."""


class NotAPartError(PartError):
    """A `.d3` file without a subtask record (not written by a federated encode)."""


class FormatVersionMismatchError(PartError):
    """Parts written in different `.d3` format versions."""


class FingerprintMismatchError(PartError):
    """Parts (or the dataset given for labelling) from different data."""


class RunMismatchError(PartError):
    """Parts of runs with different settings (budget, seed, subtask count, split, training settings)."""


class ClassOverlapError(PartError):
    """Two parts draw the same class (the same subtask given twice, or parts of different splits)."""


class MissingClassesError(PartError):
    """Some classes have no part (a subtask not yet encoded or not given)."""


class PartOverBudgetError(PartError, BudgetError):
    """A part larger than its share of the budget (so the merged file could not fit)."""


# ---------------------------------------------------------------- dataset reference

@dataclass(frozen=True)
class DataSpec:
    """How to (re)open a dataset: what `d3codec encode DATASET --data-dir ... --resolution ...` got."""

    spec: str
    data_dir: Optional[str] = None
    resolution: Optional[int] = None
    skip_bad_images: bool = False
    cache_dir: Optional[str] = None

    @staticmethod
    def of(spec: str, data_dir: Optional[str] = None, resolution: Optional[int] = None,
           skip_bad_images: bool = False, cache_dir: Optional[str] = None) -> "DataSpec":
        """A spec whose paths are absolute, so a merge run elsewhere finds the same data."""
        absolute = lambda p: os.path.abspath(p) if p and os.path.exists(p) else p  # noqa: E731
        return DataSpec(absolute(spec), absolute(data_dir), resolution, skip_bad_images,
                        os.path.abspath(cache_dir) if cache_dir else None)

    def open(self, split: str = "train", progress: bool = False) -> Any:
        return open_dataset(self.spec, data_dir=self.data_dir, split=split, resolution=self.resolution,
                            skip_bad_images=self.skip_bad_images, cache_dir=self.cache_dir, progress=progress)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Compute with one intra-op thread: CPU results then do not depend on how many processes share
    the machine (torch's reductions differ in the last bits between thread counts)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------- the merged structure

def merge_priors(parts: Sequence[tuple[Sequence[int], Priors]], num_classes: int) -> Priors:
    """Priors of all classes [N, K, D...], each part's rows placed at its global class ids.

    Unquantised tensors, and quantised ones that share one scale and zero point (latent means on
    `store_priors`' grid), are copied raw (exact); other quantised ones are re-quantised over the whole.
    """
    first = parts[0][1]
    out: dict[str, Optional[Stored]] = {}
    for name in PRIOR_TENSORS:
        items = [(classes, getattr(p, name)) for classes, p in parts]
        if all(s is None for _, s in items):
            out[name] = None
            continue
        if any(s is None for _, s in items):
            raise RunMismatchError(f"some parts store priors.{name} and some do not; re-encode them with one command")
        ref = items[0][1]
        shared = len({(s.dtype, s.scale, s.zero_point, s.axis) for _, s in items}) == 1 and ref.axis is None
        values = [s.raw if shared else s.dequantize() for _, s in items]
        whole = torch.zeros((num_classes, *values[0].shape[1:]), dtype=values[0].dtype)
        for (classes, _), v in zip(items, values):
            whole[torch.tensor(list(classes), dtype=torch.long)] = v
        out[name] = replace(ref, raw=whole.contiguous()) if shared else Stored.encode(whole, ref.dtype, axis=ref.axis)
    return Priors(kind=first.kind, **out)  # type: ignore[arg-type]


def placeholder_merged(metadata: Metadata, subtasks: Sequence[tuple[Sequence[int], Plan]], labels: LabelStorage,
                       provenance: dict[str, Any], budget: Budget, zeros: bool = False) -> D3File:
    """A merged file of the planned structure, for `size_upper_bound` (smooth values: only the
    structure counts) or, with `zeros`, for `estimate_trained_size` (all-zero values)."""
    n = metadata.num_classes
    plan0 = subtasks[0][1]
    k, d = plan0.latents_per_class, plan0.latent_dim

    def values(shape: Sequence[int]) -> torch.Tensor:
        count = math.prod(shape)
        flat = torch.zeros(count) if zeros else torch.linspace(-1, 1, count)
        return flat.reshape(tuple(shape))

    decoders = []
    for classes, plan in subtasks:
        shapes = decoder_shapes(plan.family, plan.version, plan.hparams)
        state = {name: (torch.zeros(s, dtype=dt) if not dt.is_floating_point else values(s))
                 for name, (s, dt) in shapes.items()}
        decoders.append(DecoderEntry(plan.family, plan.version, plan.hparams, [int(c) for c in classes],
                                     store_decoder_state(state, plan.weight_dtype)))
    z = values((n, k, d))
    return D3File(metadata=metadata, priors=store_priors(z, z, plan0.latent_dtype), decoders=decoders,
                  labels=placeholder_labels(labels, n, k), budget=budget, provenance=provenance)


# ---------------------------------------------------------------- checking parts

@dataclass
class _Part:
    path: str
    d3: D3File
    record: dict[str, Any]

    @property
    def classes(self) -> list[int]:
        return [int(c) for c in self.d3.provenance.get("classes", [])]

    @property
    def index(self) -> int:
        return int(self.record["subtask"])


def _read_parts(paths: Sequence[str]) -> list[_Part]:
    if not paths:
        raise ConfigError("give the part files to merge, e.g. d3codec merge part-*.d3 -o out.d3")
    parts = []
    for path in paths:
        d3 = load(path)
        record = d3.provenance.get(RECORD)
        if not isinstance(record, dict) or "run" not in record or "classes" not in d3.provenance \
                or len(d3.decoders) != 1:
            raise NotAPartError(f"{path} is not a subtask part (no federated record); make parts with "
                                "d3codec encode ... --subtasks K --subtask i")
        parts.append(_Part(str(path), d3, record))
    return parts


def check_parts(parts: Sequence[_Part]) -> None:
    """Refuse parts that do not make one file: format version, data, budget share, run, classes."""
    first = parts[0]
    for p in parts[1:]:
        if p.d3.format_version != first.d3.format_version:
            v, v0 = (".".join(map(str, x.d3.format_version)) for x in (p, first))
            raise FormatVersionMismatchError(f"{p.path} is .d3 format {v} but {first.path} is {v0}; "
                                             "re-encode the parts with one d3codec version")
    for p in parts[1:]:
        if p.d3.metadata.fingerprint != first.d3.metadata.fingerprint:
            raise FingerprintMismatchError(
                f"{p.path} was encoded from other data (fingerprint {p.d3.metadata.fingerprint}) than {first.path} "
                f"({first.d3.metadata.fingerprint}); merge only parts of one dataset")
    for p in parts:
        share = int(p.record["share"])
        size = p.d3.file_bytes or 0
        declared = p.d3.budget.bytes if p.d3.budget is not None else size
        if size > share or declared > share:
            raise PartOverBudgetError(
                f"{p.path} is {size:,} bytes (budget {declared:,}), over its share of {share:,} bytes of the "
                f"{int(p.record['budget']['bytes']):,}-byte budget; re-encode subtask {p.index} with the same command")
    for p in parts[1:]:
        if p.record["run"] != first.record["run"]:
            raise RunMismatchError(f"{p.path} comes from a run with other settings (budget, seed, subtasks, split or "
                                   f"training options) than {first.path}; re-encode it with the same command")
    owner: dict[int, _Part] = {}
    for p in parts:
        for c in p.classes:
            if c in owner:
                raise ClassOverlapError(f"{p.path} and {owner[c].path} both hold class {c} (subtask {p.index}); "
                                        "give each subtask's part once")
            owner[c] = p
    total = int(first.record["num_classes"])
    missing = [c for c in range(total) if c not in owner]
    if missing:
        have = sorted({p.index for p in parts})
        absent = [i for i in range(int(first.record["subtasks"])) if i not in have]
        raise MissingClassesError(f"{len(missing)} classes (first {missing[:5]}) have no part: subtask(s) "
                                  f"{absent[:8]} missing among the given parts (first {first.path}); encode them "
                                  "with --subtask i and merge all parts")


# ---------------------------------------------------------------- merging

def _merged_metadata(parts: Sequence[_Part]) -> Metadata:
    m0 = parts[0].d3.metadata
    total = int(parts[0].record["num_classes"])
    names = [""] * total
    for p in parts:
        for name, c in zip(p.d3.metadata.class_names, p.classes):
            names[c] = name
    return Metadata(name=m0.name, num_classes=total, class_names=names, image_shape=tuple(m0.image_shape),
                    mean=tuple(m0.mean), std=tuple(m0.std), value_range=tuple(m0.value_range),
                    fingerprint=m0.fingerprint)


def global_labels(d3: D3File, storage: LabelStorage, teacher_spec: dict[str, Any], dataset: Any,
                  device: str = "cpu", cache_dir: Optional[str] = None, progress: bool = False,
                  log: Optional[Callable[[str], None]] = None) -> Labels:
    """Soft labels over all classes: a teacher trained on the whole dataset (cached by the experts
    API, trained now if missing) applied to every component's mean image, mixed with the own class
    as `storage` says; `log` gets how well the teacher knows the components and an auto weight."""
    if dataset.fingerprint != d3.metadata.fingerprint:
        raise FingerprintMismatchError(f"dataset {dataset.name} (fingerprint {dataset.fingerprint}) is not the one the "
                                       f"parts were encoded from ({d3.metadata.fingerprint}); pass the original data "
                                       "with --dataset/--data-dir")
    experts = ensure_experts(dataset, num_experts=int(teacher_spec["experts"]), epochs=int(teacher_spec["epochs"]),
                             seed=int(teacher_spec["seed"]), cache_dir=cache_dir, device=device,
                             progress=progress)
    teacher = experts.teacher(device=device)
    # The teacher sees what it was trained on: the file's normalised space (not [0, 1] pixels).
    batches = mean_image_batches(d3, device, space="normalized", batch_size=512)
    return teacher_labels(teacher, batches, d3.priors.num_classes, d3.priors.latents_per_class, storage, log)


def merged_provenance(parts: Sequence[_Part]) -> dict[str, Any]:
    """The merged file's provenance: the run's, with the `compute` (torch version, CPU capability,
    threads) its parts were encoded with: one record when they agree, else one per part in subtask order."""
    prov = dict(parts[0].record["merged"])
    computes = [p.d3.provenance.get("compute") for p in parts]
    if any(c is not None for c in computes):
        prov["compute"] = computes[0] if all(c == computes[0] for c in computes) else computes
    return prov


def merge_parts(paths: Sequence[str], output: str, *, dataset: Any = None, data: Optional[DataSpec] = None,
                device: str = "cpu", quiet: bool = False, log: Optional[Log] = None) -> D3File:
    """Merge subtask parts into one `.d3` file at `output` (written atomically) and return it.

    Soft labels need the data (for the teacher): `dataset` (an `ImageDataset`), else `data`, else
    the reference the parts recorded. Refuses misfit parts with a `PartError` subclass.
    """
    say: Log = log or (lambda s: None if quiet else print(s, file=sys.stderr))
    parts = _read_parts(paths)
    check_parts(parts)
    parts.sort(key=lambda p: p.index)
    record = parts[0].record
    metadata = _merged_metadata(parts)
    priors = merge_priors([(p.classes, p.d3.priors) for p in parts], metadata.num_classes)
    decoders = [DecoderEntry(p.d3.decoders[0].family, p.d3.decoders[0].version, dict(p.d3.decoders[0].hparams),
                             p.classes, dict(p.d3.decoders[0].weights)) for p in parts]
    budget = Budget(**record["budget"])
    d3 = D3File(metadata=metadata, priors=priors, decoders=decoders, labels=Labels(kind="hard"), budget=budget,
                provenance=merged_provenance(parts))
    storage = LabelStorage(**record["labels"])
    if storage.kind != "hard":
        spec = data or (DataSpec(**record["dataset"]) if record.get("dataset") else None)
        if dataset is None:
            if spec is None:
                raise ConfigError("soft labels need the dataset the parts were encoded from; pass --dataset")
            dataset = spec.open("train", progress=not quiet)
        say(f"labelling {metadata.num_classes} classes x {priors.latents_per_class} latents with a teacher "
            "over all classes")
        with single_thread():
            d3.labels = global_labels(d3, storage, record["teacher"], dataset, device,
                                      cache_dir=spec.cache_dir if spec else None, progress=not quiet, log=say)
    size, d3 = save_within_budget(d3, output, budget, say)
    say(f"wrote {output}: {size:,} bytes ({100.0 * size / budget.bytes:.1f}% of the budget), "
        f"{len(parts)} decoders, {metadata.num_classes} classes")
    return load(output)
