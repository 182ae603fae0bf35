"""More ranks than subtasks: which rank trains which expert of a subtask it shares with others.

Rank r joins the group of subtask r % subtasks; expert i of a subtask goes to its group's member
i % group size, trained into the shared expert cache and followed by a done marker (`markers`);
the group's lead (rank s) distils once all its experts are marked.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Optional

from d3codec.distill.experts import ExpertConfig, train_experts
from d3codec.distill.federated.markers import finished_part, mark_done, mark_failed, part_path
from d3codec.distill.federated.plan import FederatedPlan
from d3codec.distill.federated.split import assigned_tasks
from d3codec.distill.merge import single_thread

Log = Callable[[str], None]


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


def ranks_with_work(fplan: FederatedPlan, world: int) -> list[int]:
    """The ranks of `world` that have anything to do (a task or a share of some subtask's experts)."""
    return [r for r in range(world) if assigned_tasks(fplan.num_tasks, r, world) or expert_shares(fplan, r, world)]


def _expert_setup(dataset: Any, fplan: FederatedPlan, index: int) -> tuple[Any, list[int]]:
    """Subtask `index`'s expert settings and classes, exactly as its `encode` asks `ensure_experts`
    for them (so experts trained elsewhere land in the folder its distillation reads)."""
    options = fplan.subtask_options(index)
    cfg = options.distill_config()
    real = dataset.subset(fplan.groups[index])
    _, epochs = options.expert_settings(cfg, len(real))
    return ExpertConfig(epochs=epochs, seed=cfg.seed), [int(c) for c in real.classes]


def train_expert_shares(dataset: Any, fplan: FederatedPlan, workdir: str, rank: int, world: int,
                        device: Optional[str] = None, log: Optional[Log] = None) -> list[tuple[int, int, bool]]:
    """Train this rank's share of the experts of the subtask it shares (see `expert_shares`), one by
    one into the expert cache, each followed by its done marker (a failed one leaves a failed
    marker, so the lead stops waiting). Returns (subtask, expert, trained here: not found cached)."""
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
                mark_failed(workdir, index, i, {**record, "error": f"{type(e).__name__}: {e}"})
                raise
            mark_done(workdir, index, i, {**record, "folder": folder, "trained": bool(trained)})
            out.append((index, i, bool(trained)))
            what = "part already done" if done else ("trained" if trained else "found cached")
            say(f"subtask {index}: expert {i} of {n} {what} (experts shared by ranks {','.join(map(str, group))})")
    return out
