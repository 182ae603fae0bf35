"""Under torch.distributed (gloo, CPU, two processes) ranks draw disjoint shards of the same epoch."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from d3codec.decode import D3Dataset
from d3codec.format.io import save

_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from d3codec.decode import D3Dataset
    path, rank, world, init, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    ds = D3Dataset(path, batch_size=4, seed=11, labels="hard")  # rank and world size read automatically
    ds.set_epoch(2)
    xs, ys = zip(*list(ds))
    assert len(xs) == len(ds)
    torch.save({"x": torch.cat(xs), "y": torch.cat(ys), "rank": ds.rank, "world": ds.world_size}, out)
    dist.barrier()
    dist.destroy_process_group()
""")


def _two_ranks(script: str, path: str, tmp_path) -> list[dict]:
    """Run `script` as ranks 0 and 1 of a 2-process gloo group (file rendezvous); their saved results."""
    init = f"file://{tmp_path / 'rendezvous'}"
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", script, path, str(r), "2", init, outs[r]],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    for p in procs:
        output, _ = p.communicate(timeout=120)
        assert p.returncode == 0, output.decode()[-2000:]
    return [torch.load(o) for o in outs]


def test_two_ranks_draw_disjoint_shards_covering_the_epoch(make_d3, tmp_path) -> None:
    path = str(tmp_path / "f.d3")
    save(make_d3("small", num_classes=5, k=2), path)  # epoch: 2 * 5 * 2 = 20 samples, 10 per rank
    got = _two_ranks(_WORKER, path, tmp_path)
    assert [(g["rank"], g["world"]) for g in got] == [(0, 2), (1, 2)]

    single = D3Dataset(path, batch_size=4, seed=11, labels="hard")
    single.set_epoch(2)
    x, y = (torch.cat(t) for t in zip(*list(single)))
    assert len(x) == 20
    for r, g in enumerate(got):  # rank r draws exactly positions [10 r, 10 r + 10) of the epoch
        assert torch.allclose(g["x"], x[10 * r:10 * r + 10], atol=1e-5) and torch.equal(g["y"], y[10 * r:10 * r + 10])
    # no sample is drawn twice: all 20 images are distinct
    flat = torch.cat([g["x"] for g in got]).flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(20) * 1e9).min() > 1e-4


_TWO_EPOCHS = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from d3codec.decode import D3Dataset
    path, rank, world, init, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    ds = D3Dataset(path, batch_size=4, seed=11, labels="hard")
    epochs = []
    for epoch in range(2):  # no set_epoch: each loop over the dataset is the next epoch
        xs, ys = zip(*ds)
        epochs.append({"x": torch.cat(xs), "y": torch.cat(ys)})
    torch.save({"epochs": epochs, "next": ds.epoch}, out)
    dist.barrier()
    dist.destroy_process_group()
""")


def test_ranks_advance_epochs_in_step_with_disjoint_shards(make_d3, tmp_path) -> None:
    path = str(tmp_path / "f.d3")
    save(make_d3("small", num_classes=5, k=2), path)  # epoch: 20 samples, 10 per rank
    got = _two_ranks(_TWO_EPOCHS, path, tmp_path)
    assert [g["next"] for g in got] == [2, 2]
    single = D3Dataset(path, batch_size=4, seed=11, labels="hard")
    for e in range(2):  # rank r's e-th loop is positions [10 r, 10 r + 10) of epoch e
        x, y = (torch.cat(t) for t in zip(*single))
        for r, g in enumerate(got):
            mine = g["epochs"][e]
            assert torch.equal(mine["y"], y[10 * r:10 * r + 10]) and torch.allclose(mine["x"], x[10 * r:10 * r + 10], atol=1e-5)
        flat = torch.cat([g["epochs"][e]["x"] for g in got]).flatten(1)
        assert torch.cdist(flat, flat).add(torch.eye(20) * 1e9).min() > 1e-4  # disjoint shards
    assert not torch.allclose(got[0]["epochs"][0]["x"], got[0]["epochs"][1]["x"])  # fresh draws


_BUILT_BEFORE_INIT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from torch.utils.data import DataLoader
    from d3codec.decode import D3Dataset
    path, rank, world, init, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    ds = D3Dataset(path, batch_size=10, seed=11, labels="hard")  # before the process group exists
    assert (ds.rank, ds.world_size) == (0, 1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    xs, ys = zip(*list(ds))
    # a spawned worker unpickles the dataset in a process without the process group
    ds.set_epoch(0)  # the epoch just drawn again (a new iteration would draw the next one)
    spawned = list(DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="spawn"))
    torch.save({"x": torch.cat(xs), "y": torch.cat(ys), "rank": ds.rank, "world": ds.world_size,
                "epoch_size": ds.epoch_size, "len": len(ds), "sizes": [len(x) for x in xs],
                "spawned_x": torch.cat([x for x, _ in spawned]), "spawned_y": torch.cat([y for _, y in spawned])}, out)
    dist.barrier()
    dist.destroy_process_group()
""")


def test_a_dataset_built_before_init_process_group_uses_the_final_world_size(make_d3, tmp_path) -> None:
    """The default epoch size depends on the world size (whole rounds that fill one batch on every
    rank). It is resolved when the stream is used, like the rank, so building the dataset before
    `init_process_group` gives the same epoch and shards as building it after; a DataLoader worker
    started by spawn (no process group of its own) draws its rank's shard too."""
    path = str(tmp_path / "f.d3")
    save(make_d3("small", num_classes=4, k=2), path)  # a mixed round: 2 * 4 * 2 = 16 samples
    got = _two_ranks(_BUILT_BEFORE_INIT, path, tmp_path)
    # 2 ranks x batch 10 need 20 samples: two rounds (32), 16 per rank, batches of 10 and 6
    # (a world size frozen at construction, 1, gives one round: 8 per rank in one batch of 8)
    assert [(g["rank"], g["world"], g["epoch_size"], g["len"], g["sizes"]) for g in got] == \
        [(0, 2, 32, 2, [10, 6]), (1, 2, 32, 2, [10, 6])]
    for r, g in enumerate(got):  # exactly what an explicit rank and world size draw
        ref = D3Dataset(path, batch_size=10, seed=11, labels="hard", rank=r, world_size=2)
        x, y = (torch.cat(t) for t in zip(*list(ref)))
        assert torch.allclose(g["x"], x, atol=1e-5) and torch.equal(g["y"], y)
        # which shard the worker drew: labels exactly, images within float rounding (another process)
        assert torch.equal(g["spawned_y"], g["y"]) and torch.allclose(g["spawned_x"], g["x"], atol=1e-5), \
            f"rank {r}'s spawned DataLoader worker drew another shard"


def test_explicit_rank_pads_the_last_shard_like_distributed_sampler(make_d3) -> None:
    d3 = make_d3("small", num_classes=5, k=1)  # 10 samples per epoch over 3 ranks: shards of 4
    full = D3Dataset(d3, batch_size=4, seed=0, labels="hard")
    parts = [D3Dataset(d3, batch_size=3, seed=0, labels="hard", rank=r, world_size=3) for r in range(3)]
    assert [len(p) for p in parts] == [2, 2, 2] and all(p.shard_size == 4 for p in parts)
    xs = [torch.cat([x for x, _ in p]) for p in parts]
    ref = full.latents(0, 12).z  # positions 10 and 11 wrap around to slots of positions 0 and 1
    got = torch.cat([p.latents(4 * r, 4 * r + 4, epoch=0).z for r, p in enumerate(parts)])
    assert torch.equal(got, ref)
    assert torch.equal(full.latents(10, 12).classes, full.latents(0, 2).classes)
    assert sum(len(x) for x in xs) == 12
