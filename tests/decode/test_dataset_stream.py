"""The order in which `D3Dataset` walks a file's components across epochs."""
from __future__ import annotations

from collections import Counter


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
