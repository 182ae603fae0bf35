"""The D3 paper's configurations for ImageNet-1K at 64x64 (Qin et al., arXiv 2403.00999; summarised
in the project's reference notes), printed beside a plan of the same budget so a user sees how
this encoder spends the bytes the paper spent.

The paper counts storage in float32 scalars; `Nipc` budgets count the same way (N images per
class of float32 pixels), so its totals compare with a plan's bytes at 4 bytes per scalar.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from d3codec.distill.labels import LabelStorage
from d3codec.distill.planner import Plan
from d3codec.format.types import Budget

#: The dataset and image shape the paper's figures are for.
PAPER_CLASSES, PAPER_SHAPE = 1000, (3, 64, 64)


@dataclass(frozen=True)
class PaperConfig:
    """One row of the paper's ImageNet-1K configurations."""

    ipc: int
    subtasks: int
    classes_per_subtask: int
    latents_per_class: int
    latent_dim: int
    decoder: str
    params_per_decoder: int
    scalars: int            # latents + decoders + soft labels, float32 scalars
    iterations: int

    @property
    def float32_bytes(self) -> int:
        return 4 * self.scalars


#: IPC-equivalent budget -> the paper's configuration for it.
IMAGENET_64: dict[int, PaperConfig] = {
    1: PaperConfig(1, 5, 200, 1, 64, "small (k=256)", 789_187, 5_073_935, 10_000),
    2: PaperConfig(2, 2, 500, 2, 2048, "medium (linear input)", 5_774_691, 21_741_382, 10_000),
    10: PaperConfig(10, 5, 200, 10, 4096, "large (no linear input)", 6_308_547, 123_462_735, 8_000),
}


def paper_config(num_classes: int, budget: Budget) -> Optional[PaperConfig]:
    """The paper's configuration for a budget of 1, 2 or 10 ipc over 1,000 classes, else None."""
    if num_classes != PAPER_CLASSES or budget.unit != "ipc" or budget.ipc is None:
        return None
    return IMAGENET_64.get(int(budget.ipc)) if float(budget.ipc).is_integer() else None


def _decoders(plans: Sequence[Plan]) -> str:
    """`small width 512 (788,611 params, I8)`, or each distinct decoder when the parts differ."""
    seen = dict.fromkeys(f"{p.family} width {p.hparams.get('width')} ({p.num_params:,} params, {p.weight_dtype})"
                         for p in plans)
    return " / ".join(seen)


def compare_with_paper(budget: Budget, num_classes: int, image_shape: Sequence[int], plans: Sequence[Plan],
                       groups: Sequence[int], labels: LabelStorage, bound: int, guaranteed: bool) -> Optional[str]:
    """Two lines (three when the images are not 64x64): the paper's configuration at this budget and
    this plan in the same terms (`groups`: classes per subtask, one entry for a single task); None
    when the paper has no configuration for this budget."""
    cfg = paper_config(num_classes, budget)
    if cfg is None:
        return None
    share = 100.0 * cfg.float32_bytes / budget.bytes
    lines = [f"paper (D3, ImageNet-1K at 64x64, {cfg.ipc} IPC): {cfg.subtasks} subtasks x "
             f"{cfg.classes_per_subtask} classes, K={cfg.latents_per_class}, D={cfg.latent_dim}, decoder "
             f"{cfg.decoder} ({cfg.params_per_decoder:,} params each, float32), soft labels, "
             f"{cfg.iterations:,} iterations; {cfg.scalars:,} scalars = {cfg.float32_bytes:,} bytes "
             f"({share:.1f}% of this budget)"]
    sizes = sorted(set(groups))
    per = f"{sizes[0]:,}" if len(sizes) == 1 else f"{sizes[0]:,}-{sizes[-1]:,}"
    tasks = f"{len(groups)} subtasks x {per} classes" if len(groups) > 1 else f"1 task of {per} classes"
    p = plans[0]
    lines.append(f"this plan: {tasks}, K={p.latents_per_class}, D={p.latent_dim}, decoder {_decoders(plans)}, "
                 f"labels {labels.describe()}; "
                 f"{'at most' if guaranteed else 'about'} {bound:,} bytes ({100.0 * bound / budget.bytes:.1f}% "
                 "of this budget)")
    if tuple(image_shape) != PAPER_SHAPE:
        c, h, w = image_shape
        lines.append(f"(the paper's figures are for 64x64 RGB images; this data is {c}x{h}x{w}, so the budget "
                     "and the byte counts differ in scale)")
    return "\n".join(lines)
