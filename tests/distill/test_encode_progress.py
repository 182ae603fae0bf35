"""A batch job's log shows where an encode is: every long step writes progress lines off a terminal."""
from __future__ import annotations

import re
import sys

from click.testing import CliRunner

from d3codec.cli import cli
from d3codec.distill.distiller import Distiller

from many_classes import many_classes_npz


def _encode(tmp_path, data: str, *extra: str):
    args = ["encode", data, "--budget", "1ipc", "-o", str(tmp_path / "out.d3"), "--cache-dir", str(tmp_path / "cache"),
            "--device", "cpu", "--iterations", "2", "--fit-steps", "3", "--experts", "1", "--expert-epochs", "1",
            "--threads", "1", *extra]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_an_encode_off_a_terminal_writes_start_and_end_lines_for_every_long_step(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("D3CODEC_PROGRESS_INTERVAL", "3600")  # only the start and end lines
    res = _encode(tmp_path, many_classes_npz(tmp_path / "many.npz"), "--labels", "soft")
    assert res.exit_code == 0, res.output
    err = res.stderr
    # Soft labels: the log says how well the teacher knows the components it labels.
    assert re.search(r"^labels: the teacher's top class is the component's own for [\d.]+% of the [\d,]+ components",
                     err, re.M), err
    assert re.search(r"^labels: own-class weight (0\.8|0) \(auto: the teacher's agreement is", err, re.M), err
    from d3codec.format.io import load

    assert load(str(tmp_path / "out.d3")).provenance["own_class_weight"] == "auto"
    for step, unit, total in [("decoding many.npz", "img", 300), ("expert 0", "ep", 1), ("fit", "it", 3),
                              ("objective mmd", "it", 2)]:
        start = re.search(rf"^{re.escape(step)}: 0/{total:,} {unit} \(0\.0%\), elapsed", err, re.M)
        end = re.search(rf"^{re.escape(step)}: {total:,}/{total:,} {unit} \(100\.0%\), [^\n]*elapsed \d+s", err, re.M)
        assert start and end, f"no start/end progress line for {step!r} in:\n{err}"
    assert "\r" not in err  # no tqdm bar redraws in a log


def test_quiet_encode_writes_no_progress(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("D3CODEC_PROGRESS_INTERVAL", "0")
    res = _encode(tmp_path, many_classes_npz(tmp_path / "many.npz", classes=10), "-q")
    assert res.exit_code == 0, res.output
    assert not re.search(r"^(fit|objective|expert|decoding)\b.*elapsed", res.stderr, re.M), res.stderr
    from d3codec.format.io import load

    d3 = load(str(tmp_path / "out.d3"))   # hard labels (a 1-epoch teacher): the auto own-class weight is not recorded
    assert d3.labels.kind == "hard" and "own_class_weight" not in d3.provenance


def test_the_fit_progress_starts_after_the_pca_start_of_the_codes(tmp_path, monkeypatch) -> None:
    """The fit's codes start at the targets' principal axes (half a minute at 64 px): that work is
    done before the fit's progress starts, so its rate and ETA time the fit steps alone."""
    pca = Distiller._pca_latents

    def marked(self, *args, **kwargs):
        print("principal axes computed", file=sys.stderr)
        return pca(self, *args, **kwargs)

    monkeypatch.setattr(Distiller, "_pca_latents", marked)
    monkeypatch.setenv("D3CODEC_PROGRESS_INTERVAL", "3600")
    res = _encode(tmp_path, many_classes_npz(tmp_path / "many.npz", classes=10))
    assert res.exit_code == 0, res.output
    err = res.stderr
    start = err.index("fit: 0/3 it")
    assert "principal axes computed" in err[:start] and "principal axes computed" not in err[start:], err


def test_own_class_weight_reaches_the_file_and_refuses_hard_labels(tmp_path) -> None:
    from d3codec.format.io import load

    data = many_classes_npz(tmp_path / "many.npz", classes=10)
    res = _encode(tmp_path, data, "--labels", "soft", "--own-class-weight", "0.8", "-q")
    assert res.exit_code == 0, res.output
    d3 = load(str(tmp_path / "out.d3"))
    probs = d3.labels.probs.dequantize()
    n = probs.shape[0]
    assert bool((probs[range(n), :, range(n)] >= 0.8).all())   # the own class holds at least the weight
    assert d3.provenance["own_class_weight"] == 0.8
    bad = CliRunner().invoke(cli, ["encode", data, "--budget", "1ipc", "-o", str(tmp_path / "h.d3"), "--labels", "hard",
                                   "--own-class-weight", "0.5", "--cache-dir", str(tmp_path / "cache")])
    assert bad.exit_code != 0 and "--own-class-weight" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "h.d3").exists()
    for value in ("2", "often"):
        out = CliRunner().invoke(cli, ["encode", data, "--budget", "1ipc", "-o", str(tmp_path / "h.d3"),
                                       "--own-class-weight", value])
        assert out.exit_code != 0 and "neither auto nor a number in 0..1" in out.output, out.output
    auto = CliRunner().invoke(cli, ["encode", data, "--budget", "1ipc", "--dry-run", "--expert-epochs", "1",
                                    "--own-class-weight", "0.5", "--cache-dir", str(tmp_path / "cache")])
    assert auto.exit_code != 0 and "--labels auto is hard here" in auto.output, auto.output
