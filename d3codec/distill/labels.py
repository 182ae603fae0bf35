"""Soft labels of latent components: a teacher's softmax on each component's mean image, stored compactly.

As in the paper, one probability vector (temperature 1) per component. Storage choices (the planner
picks one, the bytes count in the budget): `hard` (no tensor), `dense` probabilities in F16 or U8,
or `topk` (the k largest probabilities and their class ids; the rest of the mass is spread evenly
over the other classes when read, see `format.types.Labels`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

import torch

from d3codec.format.types import Labels, Stored

#: SGD steps a teacher needs before `--labels auto` stores its soft labels. The CPU default's
#: teacher (one expert, about one epoch: 120-250 steps) is short of it, and the components' own
#: classes beat its soft labels on every dataset measured (MNIST 96.61% vs 94.54%, CIFAR-10 1ipc
#: 43.56% vs 42.16%, 10ipc 51.80% vs 43.22%: benchmarks/RESULTS.md). The paper's experts (50 epochs)
#: are far above it.
MIN_TEACHER_STEPS = 1000

#: `--own-class-weight auto`: a teacher whose top class is the component's own for fewer than this
#: share of the components labels them with `AUTO_OWN_WEIGHT` of their own class mixed in, else alone.
#: Measured bracket (benchmarks/RESULTS.md): at 11-12% (Tiny-ImageNet-100) W = 0.8 gains 1.4-1.9
#: points over the teacher alone; at 44% (CIFAR-10) it loses 8.2.
AUTO_OWN_AGREEMENT = 0.25
AUTO_OWN_WEIGHT = 0.8
AUTO = "auto"


@dataclass(frozen=True)
class LabelStorage:
    """How labels are stored: kind `hard`, `dense` or `topk`; `k` for topk; `dtype` of the values;
    `own`: the weight of each component's own class mixed into the teacher's probabilities, or
    `"auto"` (`own_weight` picks it from the teacher's agreement when the labels are made)."""

    kind: str = "hard"
    k: int = 0
    dtype: str = "U8"
    own: Union[float, str] = 0.0

    def describe(self) -> str:
        if self.kind == "hard":
            return "hard (class of the component, 0 bytes)"
        if self.own == AUTO:
            mixed = f", own class mixed in at {AUTO_OWN_WEIGHT:g} if the teacher agrees under {AUTO_OWN_AGREEMENT:.0%}"
        else:
            mixed = f", {self.own:g} x own class + {1 - self.own:g} x teacher" if self.own else ""
        if self.kind == "dense":
            return f"soft dense {self.dtype}{mixed}"
        return f"soft top-{self.k} ({self.dtype} values){mixed}"


def index_dtype(num_classes: int) -> str:
    """Smallest integer storage dtype holding class ids below `num_classes`."""
    if num_classes <= 256:
        return "U8"
    if num_classes <= 32768:
        return "I16"
    return "I32"


def placeholder_labels(storage: LabelStorage, num_classes: int, k_per_class: int) -> Labels:
    """Labels of the right names, dtypes and shapes (values irrelevant), for size planning."""
    if storage.kind == "hard":
        return Labels(kind="hard")
    probs = torch.full((num_classes, k_per_class, num_classes), 1.0 / num_classes)
    return store_labels(probs, storage)


def store_labels(probs: torch.Tensor, storage: LabelStorage) -> Labels:
    """`probs` [N, K, classes] (rows sum to 1) stored as `storage` says."""
    if storage.kind == "hard":
        return Labels(kind="hard")
    if storage.kind == "dense":
        return Labels(kind="soft", layout="dense", probs=_store_probs(probs, storage.dtype))
    if storage.kind != "topk":
        raise ValueError(f"unknown label storage {storage.kind!r}")
    k = min(storage.k, probs.shape[-1])
    values, indices = torch.topk(probs, k, dim=-1)
    return Labels(kind="soft", layout="topk", indices=Stored.encode(indices, index_dtype(probs.shape[-1])),
                  values=_store_probs(values, storage.dtype))


def _store_probs(p: torch.Tensor, dtype: str) -> Stored:
    """Probabilities in [0, 1]: U8 with the fixed scale 1/255 (exact 0 and 1), else a float dtype."""
    if dtype == "U8":
        raw = torch.round(p.clamp(0, 1) * 255).to(torch.uint8).contiguous()
        return Stored(raw, scale=(1.0 / 255.0,), zero_point=(0,), axis=None)
    return Stored.encode(p, dtype)


@torch.no_grad()
def teacher_probs_of_batches(teacher: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[torch.Tensor],
                             n: int, k: int) -> torch.Tensor:
    """Softmax of `teacher` on mean images given as batches in component order (class-major), so that
    no more than one batch of images is ever held: [N, K, classes] on the CPU."""
    out = [torch.softmax(teacher(x).float(), dim=-1).cpu() for x in batches]
    return torch.cat(out).reshape(n, k, -1)


def agreement(probs: torch.Tensor) -> tuple[float, float]:
    """(share of components whose top class is their own, mean probability of the own class) of
    `probs` [N, K, classes], row n the components of class n."""
    n, k, c = probs.shape
    own = torch.arange(n).view(n, 1, 1).expand(n, k, 1)
    agree = float((probs.argmax(dim=-1, keepdim=True) == own).float().mean())
    return agree, float(probs.gather(-1, own).mean())


def teacher_agreement(probs: torch.Tensor) -> str:
    """How well the teacher knows the components it labels, as a log line (see `agreement`).
    A teacher near chance there gives labels near uniform."""
    n, k, c = probs.shape
    agree, p_own = agreement(probs)
    return (f"labels: the teacher's top class is the component's own for {100 * agree:.1f}% of the {n * k:,} "
            f"components (mean probability of the own class {p_own:.3f}; chance {1 / c:.3f})")


def own_weight(own: Union[float, str], probs: torch.Tensor) -> float:
    """The own-class weight to mix into `probs`: `own` itself, or for `"auto"` `AUTO_OWN_WEIGHT` when
    the teacher's top class is the component's own for under `AUTO_OWN_AGREEMENT` of them, else 0."""
    if own != AUTO:
        return float(own)
    return AUTO_OWN_WEIGHT if agreement(probs)[0] < AUTO_OWN_AGREEMENT else 0.0


def mix_own_class(probs: torch.Tensor, own: float) -> torch.Tensor:
    """`own` x each component's own class + (1 - `own`) x `probs` [N, K, classes] (row n: class n's
    components): a student trained on it minimises `own` x its hard-label loss + (1 - `own`) x its
    loss on the teacher's labels, the classic distillation mix."""
    if not 0.0 <= own <= 1.0:
        raise ValueError(f"the own-class weight must be in [0, 1], got {own}")
    if own == 0.0:
        return probs
    n = probs.shape[0]
    onehot = torch.zeros_like(probs)
    onehot[torch.arange(n), :, torch.arange(n)] = 1.0
    return own * onehot + (1.0 - own) * probs


def teacher_labels(teacher: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[torch.Tensor], n: int, k: int,
                   storage: LabelStorage, log: Optional[Callable[[str], None]] = None) -> Labels:
    """The components' soft labels as `storage` says: `teacher`'s softmax on their mean images
    (`batches`, class-major), mixed with their own class by `storage.own` (`own_weight`); `log`
    gets how well the teacher knows them (`teacher_agreement`, before the mix) and an auto weight."""
    probs = teacher_probs_of_batches(teacher, batches, n, k)
    weight = own_weight(storage.own, probs)
    if log is not None:
        log(teacher_agreement(probs))
        if storage.own == AUTO:
            why = "under" if weight else "at least"
            log(f"labels: own-class weight {weight:g} (auto: the teacher's agreement is {why} "
                f"{AUTO_OWN_AGREEMENT:.0%})")
    return store_labels(mix_own_class(probs, weight), storage)


def steps_per_epoch(train_images: int, batch_size: int) -> int:
    """SGD steps of one teacher epoch over `train_images` in batches of `batch_size` (the last one partial)."""
    return max(1, math.ceil(train_images / batch_size))


def resolve_labels(labels: str, teacher_epochs: int, train_images: int, batch_size: int) -> str:
    """`--labels auto` made concrete: `auto` (soft, hard only where soft cannot fit) when the teacher
    trains for at least `MIN_TEACHER_STEPS` SGD steps of `batch_size` (the experts' batch), else
    `hard`; `soft` and `hard` stay as given."""
    if labels != "auto":
        return labels
    return "auto" if teacher_epochs * steps_per_epoch(train_images, batch_size) >= MIN_TEACHER_STEPS else "hard"
