"""Planning a federated run: class splits, round-robin ranks, budget shares that make the merged
file fit, seeds that ignore ranks, the dry run's printed plan and estimate, and clear errors."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from d3codec.cli import cli
from d3codec.data import open_dataset
from d3codec.distill.api import EncodeOptions
from d3codec.distill.federated import (DATASET_RESERVE, assigned_tasks, plan_federated, split_classes,
                                      subtask_seed)
from d3codec.distill.merge import placeholder_merged
from d3codec.errors import BudgetError, ConfigError
from d3codec.format.io import size_upper_bound


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return open_dataset("digits", cache_dir=str(tmp_path_factory.mktemp("cache")), progress=False)


def test_contiguous_split_is_runs_of_ids_differing_by_at_most_one() -> None:
    groups = split_classes(1000, 5)
    assert groups[0] == list(range(200)) and groups[4] == list(range(800, 1000))
    assert [len(g) for g in split_classes(10, 3)] == [4, 3, 3]
    assert sum(split_classes(10, 3), []) == list(range(10))


def test_balanced_split_balances_image_counts() -> None:
    counts = [100] * 4 + [10] * 8                      # big classes first: contiguous puts them together
    contiguous = split_classes(12, 2, "contiguous", counts)
    balanced = split_classes(12, 2, "balanced", counts)
    load = lambda groups: [sum(counts[c] for c in g) for g in groups]  # noqa: E731
    assert load(contiguous) == [420, 60]
    assert load(balanced) == [240, 240]
    assert sorted(sum(balanced, [])) == list(range(12)) and [len(g) for g in balanced] == [6, 6]


def test_split_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="--subtasks 2 or fewer"):
        split_classes(5, 3)
    with pytest.raises(ConfigError, match="--split"):
        split_classes(10, 2, "random")
    with pytest.raises(ConfigError, match="at least 1"):
        split_classes(10, 0)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_round_robin_runs_every_task_exactly_once(world: int) -> None:
    tasks = sorted(t for r in range(world) for t in assigned_tasks(6, r, world))
    assert tasks == list(range(6))
    assert assigned_tasks(6, 1, 2) == [1, 3, 5]


def test_subtask_seeds_differ_and_depend_only_on_seed_and_index() -> None:
    seeds = [subtask_seed(0, i) for i in range(5)]
    assert len(set(seeds)) == 5 and seeds == [subtask_seed(0, i) for i in range(5)]
    assert subtask_seed(1, 0) != seeds[0]


@pytest.mark.parametrize("budget,subtasks", [("10ipc", 2), ("20ipc", 3), ("50ipc", 5), ("200KB", 4)])
def test_merged_file_bound_fits_the_budget(digits, budget: str, subtasks: int) -> None:
    fplan = plan_federated(digits, budget, EncodeOptions(iterations=2), subtasks)
    assert fplan.bound <= fplan.budget.bytes
    assert all(p.bound <= fplan.share - DATASET_RESERVE for p in fplan.plans)
    assert len({(p.latents_per_class, p.latent_dim) for p in fplan.plans}) == 1  # one [N, K, D] prior tensor
    if fplan.guaranteed:
        placeholder = placeholder_merged(digits.metadata(), list(zip(fplan.groups, fplan.plans)), fplan.labels,
                                         fplan.merged_provenance, fplan.budget)
        assert size_upper_bound(placeholder) == fplan.bound



def test_merged_file_plans_like_one_encode_with_a_decoder_per_subtask(digits) -> None:
    """D is what one encode of all classes would plan (counting the bytes the same way: the CPU
    defaults keep log-variances constant, so they compress away); K starts at the single-task
    planner's share of the budget, each part gets its widest decoder, and more components fill
    what their width steps left."""
    from d3codec.distill.api import plan_for
    from d3codec.distill.planner import default_latents_per_class, label_bytes

    options = EncodeOptions(iterations=2)
    for budget in ("10ipc", "20ipc"):
        single = plan_for(digits, budget, EncodeOptions(iterations=2, labels="soft"))[0]  # federated auto: soft
        fplan = plan_federated(digits, budget, options, 2)
        (k, d), = {(p.latents_per_class, p.latent_dim) for p in fplan.plans}
        assert d == single.latent_dim
        assert k >= default_latents_per_class(fplan.budget, 10, d, "I8", label_bytes(fplan.labels, 10), True)
        assert fplan.bound >= 0.9 * fplan.budget.bytes  # the parts' width steps leave no tenth unused
        for i, part in enumerate(fplan.plans):  # each subtask's encode re-plans its part to the byte
            assert plan_for(digits, fplan.planning_budget(), fplan.subtask_options(i))[0] == part
    fixed = plan_federated(digits, "10ipc", EncodeOptions(iterations=2, latents_per_class=40), 2)
    assert {p.latents_per_class for p in fixed.plans} == {40}


def test_impossible_budget_and_bad_combinations_are_clear_errors(digits) -> None:
    with pytest.raises(BudgetError, match="too small for 3 subtasks"):
        plan_federated(digits, "1ipc", EncodeOptions(), 3)
    with pytest.raises(ConfigError, match="--classes"):
        plan_federated(digits, "10ipc", EncodeOptions(classes=[0, 1, 2]), 2)
    runner = CliRunner()
    result = runner.invoke(cli, ["encode", "digits", "--budget", "10ipc", "--subtask", "1", "-o", "x.d3"])
    assert result.exit_code == 1 and "add --subtasks" in result.output
    result = runner.invoke(cli, ["encode", "digits", "--budget", "10ipc", "--subtasks", "2", "--threads", "2",
                                 "-o", "x.d3"])
    assert result.exit_code == 1 and "--nproc" in result.output


def test_dry_run_prints_subtasks_budgets_and_an_estimate(tmp_path) -> None:
    result = CliRunner().invoke(cli, ["encode", "digits", "--budget", "20ipc", "--subtasks", "3", "--dry-run",
                                      "--iterations", "100", "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "federated plan: 3 subtasks (contiguous split) of 10 classes" in out
    for i, classes in enumerate(["0-3", "4-6", "7-9"]):
        assert f"subtask {i}: classes {classes}" in out
    assert "each subtask: at most" in out and "priors" in out and "decoder small" in out
    assert "CPU-process-hours" in out and "s per distillation iteration" in out
    assert not list(tmp_path.glob("*.d3"))


def test_estimate_counts_the_classes_one_mmd_update_draws(digits, monkeypatch) -> None:
    """The printed seconds per iteration and the totals both count `mmd_classes` per update, not
    every class of the subtask (a CPU update draws a few)."""
    import d3codec.distill.cost as cost

    probe = cost.Probe(device="cpu", threads=1, seconds=0.1, expert_image=0.0, fit_step=0.0,
                       fit_start_per_target=0.0, objective_fixed=0.5, objective_per_class=2.0, label_image=0.0,
                       classes=2, targets=2, objective_classes=2, expert_batch=1, expert_batch_full=1,
                       rss_before=0, growth={})
    monkeypatch.setattr(cost, "run_probe", lambda *a, **k: probe)
    options = EncodeOptions(iterations=10, fit_steps=0, overrides={"mmd_classes": 3})
    fplan = plan_federated(digits, "10ipc", options, 2)
    assert len(fplan.groups[0]) == 5
    out = cost.estimate_cost(digits, fplan)
    assert out["seconds_per_iteration"] == pytest.approx(0.5 + 3 * 2.0)
    assert out["subtask 0"] == pytest.approx(10 * (0.5 + 3 * 2.0))


def test_auto_labels_are_soft_for_subtasks_even_where_single_task_is_hard(digits) -> None:
    """A single-task CPU encode keeps hard labels (its one-epoch teacher is short), a federated one
    takes the teacher's soft labels: they alone relate classes of different subtasks."""
    from d3codec.distill.api import plan_for

    options = EncodeOptions(iterations=2)
    assert plan_for(digits, "10ipc", options)[0].labels.kind == "hard"
    fplan = plan_federated(digits, "10ipc", options, 2)
    assert fplan.labels.kind in ("dense", "topk")
    assert fplan.teacher is not None and fplan.num_tasks == 3
    assert plan_federated(digits, "10ipc", EncodeOptions(iterations=2, labels="hard"), 2).labels.kind == "hard"


def test_teacher_trains_at_least_min_teacher_steps_unless_epochs_are_given(digits) -> None:
    from d3codec.distill.experts import ExpertConfig
    from d3codec.distill.federated.search import teacher_epochs
    from d3codec.distill.labels import MIN_TEACHER_STEPS

    steps = -(-len(digits) // ExpertConfig.batch_size)
    fplan = plan_federated(digits, "10ipc", EncodeOptions(iterations=2), 2)
    assert fplan.teacher["epochs"] * steps >= MIN_TEACHER_STEPS > (fplan.teacher["epochs"] - 1) * steps
    assert teacher_epochs(EncodeOptions(), 2, 45_000) == 6  # CIFAR-10's train split: 176 steps an epoch
    assert teacher_epochs(EncodeOptions(), 2, 1_281_167) == 2  # ImageNet: the experts' epochs already suffice
    given = plan_federated(digits, "10ipc", EncodeOptions(iterations=2, expert_epochs=3), 2)
    assert given.teacher["epochs"] == 3


def test_teacher_is_the_single_task_expert_of_the_same_epochs_and_seed(digits, tmp_path) -> None:
    """The teacher over all classes shares its cache entry with a single-task encode's expert 0 of the
    same epochs and seed: whichever run trains it first, the other reuses it."""
    from d3codec.distill.cost import cached_experts
    from d3codec.distill.federated.run import run_teacher

    cache = str(tmp_path)
    fplan = plan_federated(digits, "10ipc", EncodeOptions(iterations=2, seed=3, expert_epochs=1, cache_dir=cache,
                                                          quiet=True), 2)
    assert fplan.teacher == {"experts": 1, "epochs": 1, "seed": 3}
    assert cached_experts(digits, None, 1, 1, 3, cache) == 0
    run_teacher(digits, fplan)
    assert cached_experts(digits, None, 1, 1, 3, cache) == 1   # what the single-task encode looks up
    assert cached_experts(digits, None, 1, 1, 4, cache) == 0


def test_estimate_leaves_out_experts_and_a_teacher_found_cached(digits, tmp_path, monkeypatch) -> None:
    """A rerun (or a run after a single-task encode) reuses cached experts: the dry run's hours
    must not count training them again, and it says what it found."""
    import d3codec.distill.cost as cost
    from d3codec.distill.experts import train_experts
    from d3codec.distill.federated.run import run_teacher
    from d3codec.distill.federated.sharing import _expert_setup

    probe = cost.Probe(device="cpu", threads=1, seconds=0.1, expert_image=1.0, fit_step=0.0,
                       fit_start_per_target=0.0, objective_fixed=0.0, objective_per_class=0.0, label_image=0.0,
                       classes=2, targets=2, objective_classes=2, expert_batch=1, expert_batch_full=1,
                       rss_before=0, growth={})
    monkeypatch.setattr(cost, "run_probe", lambda *a, **k: probe)
    fplan = plan_federated(digits, "10ipc", EncodeOptions(iterations=2, fit_steps=0, expert_epochs=1, num_experts=1,
                                                          cache_dir=str(tmp_path), quiet=True), 2)
    before = cost.estimate_cost(digits, fplan)
    assert before["teacher"] == pytest.approx(len(digits)) and before["subtask 0"] == pytest.approx(fplan.images[0])
    assert "found cached" not in cost.render_estimate(before, fplan, 1)
    run_teacher(digits, fplan)
    config, classes = _expert_setup(digits, fplan, 0)
    train_experts(digits, [0], config, classes=classes, cache_dir=str(tmp_path), progress=False)
    after = cost.estimate_cost(digits, fplan)
    assert after["teacher"] == 0.0 and after["subtask 0"] == 0.0
    assert after["subtask 1"] == pytest.approx(fplan.images[1])
    line = cost.render_estimate(after, fplan, 1)
    assert "(subtasks + teacher; 1 subtask expert(s) and the teacher found cached, not counted)" in line


def test_own_class_weight_travels_to_the_merge_in_the_parts_record(digits) -> None:
    """`merge` rebuilds the labels from the parts' record alone (jobs + merge give the same file):
    the weight is in it, the subtasks themselves stay hard, and it is part of the run key."""
    from d3codec.distill.labels import LabelStorage

    fplan = plan_federated(digits, "10ipc", EncodeOptions(iterations=2, own_class_weight=0.8), 2)
    assert fplan.labels.own == 0.8 and fplan.merged_provenance["own_class_weight"] == 0.8
    assert LabelStorage(**fplan.record(0)["labels"]).own == 0.8
    assert fplan.subtask_options(0).own_class_weight == 0.0 and fplan.subtask_options(0).labels == "hard"
    default = plan_federated(digits, "10ipc", EncodeOptions(iterations=2), 2)
    assert default.run != fplan.run and default.labels.own == "auto"   # auto: picked at the merge, from the teacher
    assert LabelStorage(**default.record(0)["labels"]).own == "auto" == default.merged_provenance["own_class_weight"]
    with pytest.raises(ConfigError, match="own-class-weight"):
        plan_federated(digits, "10ipc", EncodeOptions(iterations=2, labels="hard", own_class_weight=0.8), 2)


def test_subtasks_share_the_single_task_work_between_them(digits) -> None:
    """S subtasks do about one single task's work between them, not S times it: the fit's steps
    split by class share down to the floor every decoder gets, the experts keep the single task's
    epochs over fewer images, and the objective draws each class as often as the single task
    does; what the user sets passes unchanged."""
    from d3codec.distill.api import plan_for
    from d3codec.distill.federated.plan import subtask_work

    # CIFAR-10 1ipc, one subtask of two: the 1,000-step floor of the fit (not the 1,000 x 1.07
    # a 65 KB share alone plans), 1 epoch over its 22,500 images (alone it would take 3 to see
    # 64,000), 100 iterations each drawing all its 5 classes.
    assert subtask_work(EncodeOptions(), 5, 10, 45_000, (3, 32, 32), 122_880, 142) == {
        "fit_steps": 1000, "expert_epochs": 1, "iterations": 100}
    # Where the single task's fit is over the floor (10ipc, 20,000 targets: 7,813 steps), half each.
    assert subtask_work(EncodeOptions(), 5, 10, 45_000, (3, 32, 32), 1_228_800, 2000)["fit_steps"] == 3906
    # Tiny-ImageNet-100 1ipc: the floor (1,520 before, from its share's bytes), updates of 10 classes of 50.
    assert subtask_work(EncodeOptions(), 50, 100, 45_000, (3, 64, 64), 4_915_200, 128) == {
        "fit_steps": 1000, "expert_epochs": 1, "iterations": 50}
    given = EncodeOptions(fit_steps=300, expert_epochs=2, iterations=40)
    assert subtask_work(given, 50, 100, 45_000, (3, 64, 64), 4_915_200, 128) == {}

    options = EncodeOptions(overrides={"mmd_classes": 2})
    fplan = plan_federated(digits, "10ipc", options, 3)
    k = fplan.plans[0].latents_per_class
    single = plan_for(digits, "10ipc", EncodeOptions(overrides={"mmd_classes": 2}, latents_per_class=k))[1]
    subs = [fplan.subtask_options(i).distill_config() for i in range(3)]
    assert all(c.fit_steps == max(1000, round(single.fit_steps * len(g) / 10)) for c, g in zip(subs, fplan.groups))
    draws = lambda c, n: c.iterations * min(n, c.mmd_classes) / n  # noqa: E731  per class
    assert all(draws(c, len(g)) == pytest.approx(draws(single, 10), rel=0.05) for c, g in zip(subs, fplan.groups))
    assert "fit steps" in fplan.summary()
