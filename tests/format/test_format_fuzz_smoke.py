"""The fuzz harness runs (a short, fixed-seed run here; run fuzz/fuzz_load.py by hand for longer)."""
import importlib.util
from pathlib import Path


def test_fuzz_harness_short_run():
    path = Path(__file__).resolve().parents[2] / "fuzz" / "fuzz_load.py"
    spec = importlib.util.spec_from_file_location("fuzz_load", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.run(seconds=0, examples=1500, seed=1) == 0
