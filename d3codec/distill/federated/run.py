"""Running a federated plan: this rank's tasks, serially, in `--nproc` local processes or under
`torchrun`, then the merge of the parts.

Ranks come from RANK / WORLD_SIZE / LOCAL_RANK under torchrun (a gloo group only for barriers).
Task t (subtasks, then the teacher when labels are soft) goes to rank t % world; with more ranks
than subtasks the ranks first train their shares of a subtask's experts (`sharing`). Each finished
subtask is written at once, atomically, as a valid part file in `<output>.parts/`; a rerun of the
same command reuses every part whose run key matches and resumes unfinished subtasks from their
checkpoints, so the final file is the one an uninterrupted run writes. All compute runs with one
intra-op thread per process: that, and seeds that ignore ranks, make serial, torchrun and separate
`--subtask` jobs + `merge` byte-identical on CPU.
"""
from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import replace
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist

from d3codec._process import die_with_parent
from d3codec.distill.api import EncodeOptions, check_output, encode
from d3codec.distill.cost import estimate_cost, render_estimate, wall_seconds
from d3codec.distill.experts import ensure_experts
from d3codec.distill.federated.markers import (SharedExpertFailed, clear_expert_markers, finished_part, part_path,
                                              wait_for_experts)
from d3codec.distill.federated.plan import DATASET_RESERVE, FederatedPlan
from d3codec.distill.federated.search import plan_federated
from d3codec.distill.federated.sharing import (expert_owner, experts_per_subtask, ranks_with_work,
                                              train_expert_shares)
from d3codec.distill.federated.split import assigned_tasks, class_ranges
from d3codec.distill.merge import RECORD, DataSpec, merge_parts, single_thread
from d3codec.distill.paper import compare_with_paper
from d3codec.errors import ConfigError
from d3codec.format.errors import OverBudgetError
from d3codec.format.io import load, save
from d3codec.format.types import Budget, D3File
from d3codec.progress import format_duration

Log = Callable[[str], None]


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
    say(f"subtask {index}: {len(fplan.groups[index])} classes ({class_ranges(fplan.groups[index])}), "
        f"at most {fplan.share:,} bytes -> {path}")
    if finished_part(trained, fplan.run, index) is None:  # else: stopped between training and the final write
        wait_for_experts(os.path.dirname(os.path.abspath(path)), index, shared or {}, say)
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
    if fplan.teacher is None:
        return
    with single_thread():
        ensure_experts(dataset, num_experts=fplan.teacher["experts"], epochs=fplan.teacher["epochs"],
                       seed=fplan.teacher["seed"], cache_dir=fplan.teacher_cache_dir, device=device or fplan.options.device,
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
        paper = compare_with_paper(fplan.budget, fplan.num_classes, tuple(dataset.image_shape), fplan.plans,
                                   [len(g) for g in fplan.groups], fplan.labels, fplan.bound, fplan.guaranteed)
        if paper:
            say(paper)
    if options.dry_run:
        if rank == 0:
            say(render_estimate(estimate_cost(dataset, fplan), fplan, max(world, nproc)))
        return fplan
    check_output(output)
    if subtask is not None:
        if world > 1:
            raise ConfigError("--subtask runs one subtask in one process; run it without torchrun")
        return run_subtask(dataset, fplan, subtask, output, log=say)
    if nproc > 1 and data is None:
        raise ConfigError("--nproc needs a dataset reference (DataSpec) the processes can reopen")
    ranks = max(world, nproc)
    estimate = None
    if rank == 0 and not options.quiet:  # as a single-task encode: the estimate first, the run against it last
        cost = estimate_cost(dataset, fplan)
        say(render_estimate(cost, fplan, ranks))
        estimate = wall_seconds(cost, fplan, ranks)
    started = time.perf_counter()
    workdir = os.path.abspath(output) + ".parts"
    os.makedirs(workdir, exist_ok=True)
    if world > 1:
        result = _run_torchrun(dataset, fplan, workdir, output, rank, world, local_rank, say)
    else:
        if nproc > 1:
            _run_local_processes(data, fplan, workdir, nproc)
        else:
            run_tasks(dataset, fplan, workdir, 0, 1, log=say)
        result = _merge_and_clean(dataset, fplan, workdir, output, say)
    if estimate is not None:
        say(f"federated run took {format_duration(time.perf_counter() - started)} with {ranks} process(es) "
            f"(estimate {format_duration(estimate)})")
    return result


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
    world = nproc if nproc > fplan.subtasks else min(nproc, fplan.num_tasks)
    ranks = ranks_with_work(fplan, world)
    clear_expert_markers(workdir)
    with ProcessPoolExecutor(max_workers=len(ranks), mp_context=multiprocessing.get_context("spawn"),
                             initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
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
