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
