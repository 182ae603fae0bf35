"""Writing within the budget: a file over its estimate keeps fewer components instead of failing."""
from __future__ import annotations

import pytest
import torch

from d3codec.distill.trim import fit_components, save_within_budget, trim_components
from d3codec.format.errors import OverBudgetError
from d3codec.format.io import encoded_size, load
from d3codec.format.testing import random_d3
from d3codec.format.types import Budget


@pytest.mark.parametrize("kind,labels,mixture", [("diag", "dense", False), ("lowrank", "topk", True),
                                                 ("full", "hard", False)])
@pytest.mark.parametrize("dtype,per_channel", [("F32", False), ("I8", False), ("I8", True)])
def test_trim_keeps_the_first_components_of_every_class(kind: str, labels: str, mixture: bool, dtype: str,
                                                        per_channel: bool) -> None:
    d3 = random_d3(1, latents_per_class=5, kind=kind, labels=labels, mixture=mixture, dtype=dtype,
                   per_channel=per_channel)
    cut = trim_components(d3, 3)
    assert cut.priors.latents_per_class == 3
    for name in ("mean", "logvar", "factor", "cholesky", "weights"):
        full, part = getattr(d3.priors, name), getattr(cut.priors, name)
        assert (full is None) == (part is None)
        if full is not None:
            assert torch.equal(part.dequantize(), full.dequantize()[:, :3])
    for name in ("probs", "indices", "values"):
        full, part = getattr(d3.labels, name), getattr(cut.labels, name)
        if full is not None:
            assert torch.equal(part.dequantize(), full.dequantize()[:, :3])
    encoded_size(cut)  # still a valid file
    with pytest.raises(ValueError):
        trim_components(d3, 0)


def test_an_over_budget_file_keeps_the_most_components_that_fit(tmp_path) -> None:
    d3 = random_d3(2, num_classes=4, latents_per_class=40, dim=16, labels="dense", dtype="F32")
    full = encoded_size(d3)
    budget = Budget(bytes=full - 1500, unit="bytes")
    fitted = fit_components(d3, budget)
    k = fitted.priors.latents_per_class
    assert 1 <= k < 40
    assert encoded_size(fitted, budget) <= budget.bytes
    assert encoded_size(trim_components(d3, k + 1), budget) > budget.bytes  # the most that fit
    said: list[str] = []
    size, saved = save_within_budget(d3, str(tmp_path / "a.d3"), budget, said.append)
    assert size <= budget.bytes and saved.priors.latents_per_class == k
    assert load(tmp_path / "a.d3").priors.latents_per_class == k
    assert said and f"kept {k} of 40" in said[0]


def test_a_file_that_fits_is_saved_as_it_is(tmp_path) -> None:
    d3 = random_d3(3, latents_per_class=6, labels="dense")
    budget = Budget(bytes=encoded_size(d3) + 200, unit="bytes")
    size, saved = save_within_budget(d3, str(tmp_path / "b.d3"), budget)
    assert saved is d3 and size == encoded_size(d3, budget)


def test_a_file_over_even_with_one_component_is_refused(tmp_path) -> None:
    d3 = random_d3(4, latents_per_class=3, labels="dense")
    budget = Budget(bytes=200, unit="bytes")
    with pytest.raises(OverBudgetError, match="over the budget"):
        save_within_budget(d3, str(tmp_path / "c.d3"), budget)
    assert not (tmp_path / "c.d3").exists()
