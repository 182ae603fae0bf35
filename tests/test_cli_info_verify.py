"""`d3codec info` and `d3codec verify`: what users see, exit codes, and no tracebacks."""
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from d3codec.cli import cli
from d3codec.format import Budget, save
from d3codec.format.testing import random_d3
from d3codec.models import build_decoder, export_state


def _states(n: int = 2):
    """Real `small` decoders for random_d3's default (1, 8, 8) images and dimension 4 (verify builds them)."""
    hp = {"channels": 1, "image_size": 8, "latent_dim": 4, "width": 4}
    return [("small", 1, hp, export_state(build_decoder("small", 1, hp))) for _ in range(n)]


@pytest.fixture()
def d3path(tmp_path):
    path = tmp_path / "x.d3"
    save(random_d3(4, labels="topk", dtype="I8", decoder_states=_states()), path,
         budget=Budget(10_000, "ipc", 2.0, "2ipc"))
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


def _altered(tmp_path, name, *, family="small", version=1, writer="0.1.0", **hparams):
    """A file whose only decoder names `family` v`version` with `hparams` changed; the provenance
    says d3codec `writer` wrote it (None: not recorded)."""
    d3 = random_d3(4, decoder_states=_states(1))
    entry = d3.decoders[0]
    entry.family, entry.version = family, version
    entry.hparams.update(hparams)
    prov = dict(d3.provenance)
    prov.pop("d3codec")
    if writer is not None:
        prov["encoder"] = f"d3codec {writer}"
    path = tmp_path / f"{name}.d3"
    save(d3.replace(provenance=prov), path)
    return path


@pytest.mark.parametrize("name,change,needles", [
    ("evil", {"family": "evil"}, ["decoder 0 (evil v1)", "invalid"]),
    ("v7", {"version": 7}, ["decoder 0 (small v7)", "invalid"]),
    ("norm", {"norm": "weird"}, ["decoder 0 (small v1)", "norm must be one of"]),
    ("slope", {"slope": 5.0}, ["decoder 0 (small v1)", "slope must be a number"]),
    ("width", {"width": -3}, ["decoder 0 (small v1)", "width must be an integer"]),
    ("width8", {"width": 8}, ["decoder 0 (small v1)", "has shape"]),  # valid hparams the weights do not fit
    ("extra", {"dropout": 0.5}, ["unknown hyper-parameter 'dropout'", "invalid"]),
])
def test_verify_builds_every_decoder(tmp_path, name, change, needles):
    """verify refuses what no reader can decode, naming family and version; a file written by this
    d3codec is called invalid, never "install d3codec>=<this version>"; D3Dataset raises a D3Error."""
    from d3codec import D3Dataset
    from d3codec._version import __version__
    from d3codec.errors import D3Error

    path = _altered(tmp_path, name, writer=__version__, **change)
    r = run("verify", path)
    assert r.exit_code == 1 and "Traceback" not in r.output and "ok:" not in r.output
    (line,) = r.output.splitlines()
    assert line.startswith(f"error: {path}: ") and f"d3codec>={__version__}" not in line
    for needle in needles:
        assert needle in line
    with pytest.raises(D3Error):
        next(iter(D3Dataset(str(path), batch_size=4)))


def test_verify_names_the_release_a_newer_writer_needs(tmp_path):
    r = run("verify", _altered(tmp_path, "newer", family="xlarge", writer="9.2.0"))
    assert r.exit_code == 1 and "decoder 0 (xlarge v1)" in r.output and "install d3codec>=9.2.0" in r.output
    r = run("verify", _altered(tmp_path, "unrecorded", family="xlarge", writer=None))
    assert r.exit_code == 1 and "writer not recorded" in r.output and "newer d3codec may" in r.output
