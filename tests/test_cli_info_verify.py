"""`d3codec info` and `d3codec verify`: what users see, exit codes, and no tracebacks."""
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from d3codec.cli import cli
from d3codec.format import Budget, save
from d3codec.format.testing import random_d3


@pytest.fixture()
def d3path(tmp_path):
    path = tmp_path / "x.d3"
    save(random_d3(4, decoders=2, labels="topk", dtype="I8"), path, budget=Budget(10_000, "ipc", 2.0, "2ipc"))
    return path


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_info_summary_breakdown_adds_up(d3path):
    r = run("info", d3path)
    assert r.exit_code == 0
    size = d3path.stat().st_size
    lines = r.output.splitlines()
    parts = lines[lines.index("bytes") + 1 : -1]
    assert [p.split()[0] for p in parts] == ["header", "priors", "decoder.0", "decoder.1", "labels", "other"]
    assert sum(int(p.split()[1].replace(",", "")) for p in parts) == size
    assert lines[-1].split()[1] == f"{size:,}"
    assert "10,000 bytes (2ipc)" in r.output and "% used" in r.output
    assert "top-2" in r.output and "decoder.1 small v1" in r.output


def test_info_json(d3path):
    r = run("info", "--json", d3path)
    assert r.exit_code == 0
    info = json.loads(r.output)
    for key in ("format_version", "file_bytes", "budget_bytes", "breakdown", "num_classes", "image_shape",
                "latents_per_class", "decoders", "labels"):
        assert key in info
    assert info["format_version"] == "1.0" and info["budget_bytes"] == 10_000
    assert sum(info["breakdown"].values()) == info["file_bytes"] == d3path.stat().st_size
    assert info["budget_used"] == pytest.approx(info["file_bytes"] / 10_000)
    assert len(info["decoders"]) == 2 and info["labels"]["k"] == 2


def test_verify_good_and_bad(d3path, tmp_path):
    bad = tmp_path / "bad.d3"
    data = bytearray(d3path.read_bytes())
    data[100] ^= 1
    bad.write_bytes(bytes(data))
    cut = tmp_path / "cut.d3"
    cut.write_bytes(d3path.read_bytes()[:50])
    r = run("verify", d3path)
    assert r.exit_code == 0 and "ok:" in r.output
    r = run("verify", d3path, bad, cut, tmp_path / "missing.d3")
    assert r.exit_code == 1
    errors = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3
    assert errors[0].startswith(f"error: {bad}: ") and "CRC" in errors[0]
    assert errors[1].startswith(f"error: {cut}: ") and "cut short" in errors[1]
    assert errors[2].startswith(f"error: {tmp_path / 'missing.d3'}: ") and "no such file" in errors[2]
    assert "Traceback" not in r.output


def test_info_bad_inputs_are_one_line(tmp_path):
    r = run("info", tmp_path / "nope.d3")
    assert r.exit_code == 1 and r.output.startswith("error: ") and r.output.count("\n") == 1
    (tmp_path / "text.d3").write_text("hello, not a d3 file\n" * 3)
    r = run("info", tmp_path / "text.d3")
    assert r.exit_code == 1 and "not a .d3 file" in r.output
    assert run("verify").exit_code == 2  # usage error
    assert run("info").exit_code == 2


def test_python_dash_m_verify_stderr(d3path, tmp_path):
    bad = tmp_path / "bad.d3"
    bad.write_bytes(b"\x89D3F\r\n\x1a\n" + bytes(40))
    r = subprocess.run([sys.executable, "-m", "d3codec", "verify", str(d3path), str(bad)], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(f"error: {bad}: ")
    assert f"ok: {d3path}" in r.stdout and "Traceback" not in r.stderr
