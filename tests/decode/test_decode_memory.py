"""Decode-time memory follows the stored priors, not float32 copies of them: `PriorTensors` keeps
each table in its stored dtype and dequantises only the rows a batch draws."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from d3codec.decode import D3Dataset
from d3codec.decode.sampling import StoredRows
from d3codec.format.io import save
from d3codec.format.types import Labels, Priors, Stored


class _Undequantisable(Stored):
    """A stored table that fails the test if anything dequantises it whole."""

    def dequantize(self) -> torch.Tensor:
        pytest.fail(f"a whole {tuple(self.raw.shape)} prior table was dequantised")


@pytest.mark.parametrize("axis", [None, 0, 1, 2])
def test_rows_dequantise_exactly_as_the_whole_table(axis) -> None:
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    for stored in (Stored.encode(x, "I8", axis=axis), Stored.encode(x, "U8", axis=axis), Stored.encode(x, "F16")):
        rows = StoredRows(stored, torch.device("cpu"))
        classes, comps = torch.tensor([2, 0, 2, 1]), torch.tensor([4, 0, 1, 4])
        assert torch.equal(rows.rows(classes, comps), stored.dequantize()[classes, comps])
        assert torch.equal(rows.full(), stored.dequantize())


def test_priors_stay_in_their_stored_dtype_and_no_table_is_dequantised_whole(make_d3) -> None:
    for kind in ("diag", "lowrank", "full"):
        d3 = make_d3("small", kind=kind, dtype="I8")
        want = next(iter(D3Dataset(d3, batch_size=8, seed=1, mode="random")))
        p = d3.priors
        for name in ("mean", "logvar", "factor", "cholesky"):
            t = getattr(p, name)
            if t is not None:  # this file's prior tables refuse to be dequantised whole
                setattr(p, name, _Undequantisable(t.raw, t.scale, t.zero_point, t.axis))
        ds = D3Dataset(d3, batch_size=8, seed=1, mode="random")
        got = next(iter(ds))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        pt = ds.priors
        tables = [pt.mean_rows, pt.logvar_rows, pt.factor_rows, pt.cholesky_rows]
        assert all(t.raw.dtype == torch.int8 for t in tables if t is not None)
        assert pt.mean_rows.raw.data_ptr() == p.mean.raw.data_ptr()  # on CPU: the file's own tensor


_PEAK = textwrap.dedent("""
    import resource, sys
    from d3codec.decode import D3Dataset
    from d3codec.format.io import load
    d3 = load(sys.argv[1])
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ds = D3Dataset(d3, batch_size=64, mode="mean", labels="hard")
    x, y = next(iter(ds))
    assert x.shape[0] == 64
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - loaded) // 1024)
""")


def test_a_file_of_millions_of_int8_components_decodes_in_memory_near_its_stored_size(make_d3, tmp_path) -> None:
    """10 x 500,000 x 8 int8 zeros (a few KB on disk, 40 MB per table in memory): float32 copies
    of the mean and std tables alone would add 320 MB, their dequantisation temporaries more.
    Decoding a batch adds the round's permutation (int32, 20 MB) and the batch."""
    d3 = make_d3("small", num_classes=10, k=2, dim=8)
    zeros = torch.zeros(10, 500_000, 8, dtype=torch.int8)
    priors = Priors("diag", mean=Stored(zeros, scale=(0.1,), zero_point=(0,)),
                    logvar=Stored(zeros.clone(), scale=(0.1,), zero_point=(0,)))
    path = tmp_path / "wide.d3"
    save(d3.replace(priors=priors, labels=Labels()), path)
    proc = subprocess.run([sys.executable, "-c", _PEAK, str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grown_mb = int(proc.stdout.split()[-1])
    assert grown_mb < 120, f"decoding grew the peak memory by {grown_mb} MB over the loaded file"
