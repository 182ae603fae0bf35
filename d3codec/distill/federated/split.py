"""Which classes each subtask distils, which rank runs which task, and each subtask's seed."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from d3codec._seed import derive_seed
from d3codec.errors import ConfigError

SPLITS = ("contiguous", "balanced")


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


def class_ranges(classes: Sequence[int], limit: int = 60) -> str:
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
