"""Soft labels of latent components: a teacher's softmax on each component's mean image, stored compactly.

As in the paper, one probability vector (temperature 1) per component. Storage choices (the planner
picks one, the bytes count in the budget): `hard` (no tensor), `dense` probabilities in F16 or U8,
or `topk` (the k largest probabilities and their class ids; the rest of the mass is spread evenly
over the other classes when read, see `format.types.Labels`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from d3codec.format.types import Labels, Stored

#: `--labels auto` stores hard labels when the teacher's most likely class is the component's own
#: class for at least this share of the components. Measured on CPU-default files: MNIST 0.91-0.92
#: and digits 0.93 (hard labels win there by 1.7-2.1 points), CIFAR-10 0.26-0.34 (soft labels win
#: by 2.3-4.3): a teacher that nearly always agrees adds its noise, one that does not carries what
#: the classes share.
HARD_LABEL_AGREEMENT = 0.85


@dataclass(frozen=True)
class LabelStorage:
    """How labels are stored: kind `hard`, `dense` or `topk`; `k` for topk; `dtype` of the values."""

    kind: str = "hard"
    k: int = 0
    dtype: str = "U8"

    def describe(self) -> str:
        if self.kind == "hard":
            return "hard (class of the component, 0 bytes)"
        if self.kind == "dense":
            return f"soft dense {self.dtype}"
        return f"soft top-{self.k} ({self.dtype} values)"


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


def class_agreement(probs: torch.Tensor) -> float:
    """Share of components whose most likely class under `probs` [N, K, classes] is their own class n."""
    n, k = probs.shape[:2]
    own = torch.arange(n).view(n, 1).expand(n, k)
    return float((probs.argmax(-1) == own).float().mean())


def auto_storage(probs: torch.Tensor, soft: LabelStorage) -> tuple[LabelStorage, float]:
    """`--labels auto` after training: hard when the teacher agrees with the components' classes
    on `HARD_LABEL_AGREEMENT` of them, else `soft`; returns (storage, agreement)."""
    agree = class_agreement(probs)
    return (LabelStorage("hard") if agree >= HARD_LABEL_AGREEMENT else soft), agree
