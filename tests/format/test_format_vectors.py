"""Golden vectors: files written by format 1.0 keep loading, with the same `info --json` output.

A change that breaks reading old files fails here. Only the read side is checked: zstd output
may change between zstandard versions, so freshly written bytes are never compared to these.
"""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from d3codec.cli import cli
from d3codec.format import load

VECTORS = Path(__file__).resolve().parents[2] / "spec" / "vectors"
FILES = sorted(VECTORS.glob("*.d3"))


def test_there_are_enough_vectors():
    assert len(FILES) >= 3
    files = [load(f) for f in FILES]
    assert {len(f.decoders) > 1 for f in files} == {True, False}
    assert {(f.labels.kind, f.labels.layout) for f in files} >= {("hard", None), ("soft", "topk")}
    assert {f.priors.kind for f in files} >= {"diag", "lowrank"}
    dtypes = {s.dtype for f in files for d in f.decoders for s in d.weights.values()}
    assert {"F32", "I8"} <= dtypes
    assert any(s.quantized and s.axis is not None for f in files for d in f.decoders for s in d.weights.values())


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_vector_info_json_is_unchanged(path):
    result = CliRunner().invoke(cli, ["info", "--json", str(path)])
    assert result.exit_code == 0, result.output
    expected = json.loads((path.parent / f"{path.stem}.info.json").read_text())
    assert json.loads(result.output) == expected
    assert sum(expected["breakdown"].values()) == expected["file_bytes"] == path.stat().st_size


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_vector_dequantises_to_finite_floats(path):
    d3 = load(path)
    for s in [d3.priors.mean, *(w for d in d3.decoders for w in d.weights.values())]:
        x = s.dequantize()
        assert x.isfinite().all()
