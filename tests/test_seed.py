"""`d3codec._seed.derive_seed`: the one seed derivation every stream uses, pinned (a change to it
would change every file and every decoded stream for a given seed)."""
from __future__ import annotations

from d3codec._seed import derive_seed


def test_derived_seeds_are_pinned_63_bit_values() -> None:
    assert derive_seed(0, "perm") == 4683980098436970936
    assert derive_seed(3, 1, "draws", 0) == 3058195061447686933
    assert derive_seed(7, "export", 2, 5) == 7798798841235697714
    assert all(0 <= derive_seed(s, "x") < 2 ** 63 for s in range(100))


def test_parts_are_told_apart_and_every_caller_shares_the_function() -> None:
    from d3codec.decode import export, stream
    from d3codec.distill import experts
    from d3codec.distill.federated import split

    assert derive_seed(1, 2) != derive_seed(2, 1) and derive_seed(1, "a") != derive_seed(1, "b")
    assert {stream.derive_seed, export.derive_seed, split.derive_seed, experts.derive_seed} == {derive_seed}
