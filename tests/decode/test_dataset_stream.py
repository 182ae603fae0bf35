"""The order in which `D3Dataset` walks a file's components across epochs."""
from __future__ import annotations

from collections import Counter

import pytest


def test_epochs_shorter_than_a_round_still_cover_every_component_in_turn(make_d3) -> None:
    """`epoch_size` below (or not a multiple of) a round: consecutive epochs walk the rounds, so
    every class, component, mean image and random draw comes once per round (a short epoch must
    not keep drawing the first slots of a round)."""
    from d3codec.decode.dataset import D3Dataset

    d3 = make_d3("small", kind="diag")
    probe = D3Dataset(d3, batch_size=8, seed=0)
    size = 7 if probe.round % 7 else 11  # an epoch size that is not a whole number of rounds
    ds = D3Dataset(d3, batch_size=size, epoch_size=size, seed=0)
    keys: list[tuple[int, int, bool]] = []
    e = 0
    while len(keys) < 4 * ds.round:
        draw = ds.latents(0, size, e)
        keys += list(zip(draw.classes.tolist(), draw.comps.tolist(), draw.random.tolist()))
        e += 1
    seen = Counter(keys[:4 * ds.round])
    assert len(seen) == ds.round and set(seen.values()) == {4}


def test_the_step_based_pattern_gives_full_batches_that_cover_every_component(make_d3) -> None:
    """What D3Dataset's docstring recommends for N optimizer steps: `epoch_size=batch_size,
    endless=True`. Every batch is full, and 3 rounds' worth of steps draw every slot 3 times."""
    from d3codec.decode.dataset import D3Dataset

    d3 = make_d3("small", num_classes=4, k=2)  # a mixed round: 16 slots; batches of 12 are not a round
    ds = D3Dataset(d3, batch_size=12, epoch_size=12, endless=True, seed=3, labels="hard")
    batches = [x for _, (x, _) in zip(range(4), ds)]
    assert [len(x) for x in batches] == [12] * 4
    keys = []
    for e in range(4):  # the same positions the four batches were drawn from
        draw = ds.latents(0, 12, e)
        keys += list(zip(draw.classes.tolist(), draw.comps.tolist(), draw.random.tolist()))
    seen = Counter(keys)
    assert len(seen) == ds.round == 16 and set(seen.values()) == {3}


def test_the_stream_object_is_the_datasets_order_and_knows_no_batches_size_in_its_draws(make_d3) -> None:
    """`Stream` alone gives what `D3Dataset` draws: the same latents, whatever the batch split,
    and its ranks' batches tile each shard in order."""
    import torch

    from d3codec.decode.dataset import D3Dataset
    from d3codec.decode.sampling import PriorTensors
    from d3codec.decode.stream import Stream

    d3 = make_d3("small", num_classes=3, k=2, mixture=True)
    ds = D3Dataset(d3, batch_size=4, seed=5, device="cpu")
    stream = Stream(PriorTensors.from_priors(d3.priors, "cpu"), torch.device("cpu"), seed=5, mode="mixed",
                    batch_size=4)
    whole = stream.draw(0, 12, epoch=2)
    parts = [stream.draw(s, e, epoch=2) for s, e in [(0, 5), (5, 6), (6, 12)]]
    for field in ("classes", "comps", "random", "z"):
        assert torch.equal(getattr(whole, field), torch.cat([getattr(p, field) for p in parts]))
        assert torch.equal(getattr(whole, field), getattr(ds.latents(0, 12, 2), field))
    assert stream.round == ds.round == 12 and stream.sizes(1) == (12, 12) and stream.sizes(2) == (12, 6)
    assert stream.batches(0, 1) == [(0, 4), (4, 8), (8, 12)]
    assert stream.batches(1, 2) == [(6, 10), (10, 12)] and stream.num_batches(2) == 2


@pytest.mark.parametrize("kwargs", [{}, {"drop_last": True}, {"epoch_size": 7}, {"epoch_size": 7, "drop_last": True},
                                    {"rank": 1, "world_size": 3}, {"rank": 2, "world_size": 3, "drop_last": True},
                                    {"epoch_size": 2, "drop_last": True}])
def test_len_and_indexing_agree(make_d3, kwargs: dict) -> None:
    """`ds[i]` takes exactly the indices of `range(len(ds))` (and -len .. -1), and an epoch of
    iteration yields `len(ds)` batches."""
    from d3codec.decode.dataset import D3Dataset

    ds = D3Dataset(make_d3("small", num_classes=4, k=2), batch_size=3, seed=1, device="cpu", **kwargs)
    n = len(ds)
    assert n == len(list(ds))
    for i in (*range(n), *range(-n, 0)):
        assert len(ds[i][0]) in (1, 2, 3)
    for bad in (n, -n - 1):
        with pytest.raises(IndexError, match=f"this rank yields {n} batches per epoch"):
            ds[bad]


def test_an_endless_stream_without_a_batch_is_an_error_not_a_hang(make_d3) -> None:
    from d3codec.decode.dataset import D3Dataset
    from d3codec.errors import ConfigError

    ds = D3Dataset(make_d3("small"), batch_size=8, epoch_size=4, drop_last=True, endless=True, device="cpu")
    with pytest.raises(ConfigError, match="yields no batches.*raise epoch_size or lower batch_size"):
        next(iter(ds))
    with pytest.raises(IndexError, match="endless"):
        ds[0]
