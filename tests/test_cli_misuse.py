"""Misuse as a new user tries it: inputs are never overwritten, an interrupted run's checkpoint is
never thrown away, unwritable or absurd outputs are refused before any work, and every mistake
gets one `error:` line, never a traceback."""
from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import d3codec._paths
from d3codec.cli import cli
from d3codec.distill import distiller
from d3codec.format import save
from d3codec.format.testing import random_d3
from d3codec.models import build_decoder, export_state


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_error_line(result, *needles: str) -> None:
    """Exit 1 with exactly one `error: ...` line that contains every needle, and no traceback."""
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (AssertionError, RuntimeError))
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


def _npz(path, n: int = 40, size: int = 8, classes: int = 4) -> str:
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 255, (n, size, size), dtype=np.uint8), y=np.arange(n) % classes)
    return str(path)


def _decodable_d3(path) -> str:
    hp = {"channels": 1, "image_size": 8, "latent_dim": 4, "width": 4}
    save(random_d3(0, decoder_states=[("small", 1, hp, export_state(build_decoder("small", 1, hp)))]), path)
    return str(path)


def _datasets(cache: str) -> list[str]:
    root = os.path.join(cache, "datasets")
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


# ---- inputs are never overwritten ----

def test_encode_refuses_to_overwrite_its_input(tmp_path, cache) -> None:
    src = _npz(tmp_path / "inp.npz")
    before = open(src, "rb").read()
    one_error_line(run("encode", src, "--budget", "2ipc", "-o", src, "--cache-dir", cache),
                   "is the input", "choose another -o")
    assert open(src, "rb").read() == before


def test_encode_refuses_to_overwrite_a_file_of_its_image_folder(tmp_path, cache) -> None:
    for c in range(2):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / "imgs" / f"c{c}" / f"{i}.png")
    victim = tmp_path / "imgs" / "c0" / "0.png"
    before = victim.read_bytes()
    one_error_line(run("encode", tmp_path / "imgs", "--budget", "1ipc", "-o", victim, "--cache-dir", cache),
                   "is a file inside the input")
    assert victim.read_bytes() == before


def test_merge_and_sample_refuse_to_overwrite_their_inputs(tmp_path) -> None:
    part = _decodable_d3(tmp_path / "p0.d3")
    other = _decodable_d3(tmp_path / "p1.d3")
    before = open(part, "rb").read()
    one_error_line(run("merge", part, other, "-o", part), "is the input")
    as_png = tmp_path / "f.png"  # a .d3 file under an image name: sample must not replace it
    os.replace(other, as_png)
    one_error_line(run("sample", as_png, "-o", as_png), "is the input")
    assert open(part, "rb").read() == before and as_png.stat().st_size > 0


# ---- an interrupted run's checkpoint is kept; --resume says where it continues ----

def test_a_rerun_without_resume_keeps_the_checkpoint_and_resume_says_where(tmp_path, cache, monkeypatch) -> None:
    out = tmp_path / "d.d3"
    args = ["encode", "digits", "--budget", "1ipc", "-o", out, "--cache-dir", cache, "--iterations", "3",
            "--fit-steps", "3", "--checkpoint-every", "2", "--expert-epochs", "1"]
    real_step = distiller.Distiller.step

    def crash_at_4(self):
        if self.iteration == 4:
            raise RuntimeError("simulated crash")
        return real_step(self)

    monkeypatch.setattr(distiller.Distiller, "step", crash_at_4)
    assert isinstance(run(*args).exception, RuntimeError)
    ckpt = tmp_path / "d.d3.ckpt"
    saved = ckpt.read_bytes()
    monkeypatch.setattr(distiller.Distiller, "step", real_step)
    one_error_line(run(*args), "--resume", f"delete {ckpt}", "iteration 4")
    assert ckpt.read_bytes() == saved and not out.exists()
    result = run(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming from iteration 4 of 6" in result.output
    assert out.exists() and not ckpt.exists()


# ---- outputs that cannot be written are found before any work ----

def test_an_unwritable_output_folder_is_refused_before_the_data_is_read(tmp_path, monkeypatch) -> None:
    blocked = tmp_path / "ro"
    blocked.mkdir()
    real_mkstemp = tempfile.mkstemp

    def no_writes_in_blocked(*args, **kw):
        if os.path.samefile(kw.get("dir", "."), blocked):
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, **kw)

    monkeypatch.setattr(d3codec._paths.tempfile, "mkstemp", no_writes_in_blocked)
    cache = tmp_path / "cache"
    one_error_line(run("encode", "digits", "--budget", "1ipc", "-o", blocked / "d.d3", "--cache-dir", cache),
                   "cannot write to folder", "Permission denied")
    assert _datasets(str(cache)) == []  # nothing was decoded
    one_error_line(run("sample", _decodable_d3(tmp_path / "f.d3"), "-o", blocked / "g.png"), "cannot write")
    assert not list(blocked.iterdir())


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(tmp_path) -> None:
    blocked = tmp_path / "ro"
    blocked.mkdir()
    blocked.chmod(0o555)
    try:
        one_error_line(run("sample", _decodable_d3(tmp_path / "f.d3"), "-o", blocked / "g.png"), "cannot write")
        one_error_line(run("encode", "digits", "--budget", "1ipc", "-o", blocked / "d.d3",
                           "--cache-dir", tmp_path / "cache"), "cannot write to folder")
    finally:
        blocked.chmod(0o755)


# ---- resolutions no decoder draws; temp files of killed builds ----

def test_a_resolution_no_decoder_draws_is_refused_before_decoding(tmp_path) -> None:
    src = _npz(tmp_path / "inp.npz")
    cache = str(tmp_path / "cache")
    one_error_line(run("encode", src, "--budget", "1ipc", "--resolution", "100000", "--dry-run",
                       "--cache-dir", cache), "--resolution 100000", "4..1024")
    assert _datasets(cache) == []
    big = _npz(tmp_path / "big.npz", n=4, size=1100, classes=2)
    one_error_line(run("encode", big, "--budget", "1ipc", "--dry-run", "--cache-dir", cache),
                   "1100x1100 images", "--resolution")
    assert [e for e in _datasets(cache) if ".tmp-" in e] == []


def test_the_cache_removes_builds_left_by_killed_processes(tmp_path) -> None:
    from d3codec.data import open_dataset

    root = tmp_path / "datasets"
    root.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = "".join(ch for ch in socket.gethostname() if ch.isalnum() or ch in "-_") or "host"
    stale = root / f".abc-def.tmp-{host}-{dead.pid}"
    live = root / f".abc-ghi.tmp-{host}-{os.getpid()}"
    other_host = root / f".abc-jkl.tmp-elsewhere-{dead.pid}"
    for d in (stale, live, other_host):
        d.mkdir()
        (d / "images.u8").write_bytes(b"\0" * 16)
    open_dataset(_npz(tmp_path / "a.npz"), cache_dir=str(tmp_path), progress=False)
    assert not stale.exists() and live.exists() and other_host.exists()


# ---- tracebacks that became one-line errors ----

@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("args", [
    ["encode", "digits", "--budget", "1ipc", "--device", "cuda", "-o", "{tmp}/d.d3"],
    ["encode", "digits", "--budget", "1ipc", "--device", "tpu", "--dry-run"],
    ["encode", "digits", "--budget", "1ipc", "--device", "tpu", "-o", "{tmp}/d.d3"],
    ["experts", "digits", "--device", "cuda"],
    ["experts", "digits", "--device", "tpu"],
])
def test_devices_that_are_not_there_are_one_line_errors(args, tmp_path) -> None:
    cache = tmp_path / "cache"
    one_error_line(run(*[a.format(tmp=tmp_path) for a in args], "--cache-dir", cache), "device")
    assert _datasets(str(cache)) == []


def test_sample_misuse_is_one_line_errors_and_the_suffix_names_the_format(tmp_path) -> None:
    f = _decodable_d3(tmp_path / "f.d3")
    one_error_line(run("sample", f, "-o", tmp_path), "is a folder")
    one_error_line(run("sample", f, "-n", "100000", "--scale", "50", "-o", tmp_path / "big.png"), "megapixel limit")
    one_error_line(run("sample", f, "-o", tmp_path / "grid.xyz"), "image format", ".png")
    assert not (tmp_path / "big.png").exists() and not (tmp_path / "grid.xyz").exists()
    for name, fmt in (("grid.jpg", "JPEG"), ("grid.png", "PNG"), ("grid.webp", "WEBP")):
        assert run("sample", f, "-o", tmp_path / name).exit_code == 0
        with Image.open(tmp_path / name) as img:
            assert img.format == fmt


def test_eval_resnet18_on_images_too_small_for_it_is_one_line_error(tmp_path, cache) -> None:
    f = _decodable_d3(tmp_path / "f.d3")  # 3 classes of 8 x 8: the test set must match first
    one_error_line(run("eval", f, "--test", _npz(tmp_path / "t.npz", n=30, classes=3), "--model", "resnet18",
                       "--cache-dir", cache, "-q"), "resnet18", "8 x 8", "--model convnet")


def test_resnet18_counts_flops_on_the_smallest_images_it_takes() -> None:
    from d3codec.evaluate.recipe import build_model, forward_flops

    model = build_model("resnet18", (1, 9, 9), 3, torch.Generator().manual_seed(0))
    assert model.training and forward_flops(model, (1, 9, 9)) > 0 and model.training


# ---- silent surprises are said ----

def test_a_class_with_one_image_that_caps_k_is_named(tmp_path, cache) -> None:
    rng = np.random.default_rng(0)
    src = tmp_path / "one.npz"
    np.savez(src, x=rng.integers(0, 255, (61, 8, 8), dtype=np.uint8), y=np.array([0] * 30 + [1] * 30 + [2]))
    result = run("encode", src, "--budget", "4ipc", "--dry-run", "-q", "--cache-dir", cache)
    assert result.exit_code == 0, result.output
    (line,) = [s for s in result.output.splitlines() if s.startswith("warning:")]
    assert "class '2' has only 1 training image" in line and "K=1" in line and "--classes" in line
    even = run("encode", _npz(tmp_path / "even.npz", n=60, classes=3), "--budget", "4ipc", "--dry-run",
               "--cache-dir", cache)
    assert even.exit_code == 0 and "warning:" not in even.output


def test_an_image_folder_of_mixed_sizes_and_colours_says_what_was_converted(tmp_path, cache) -> None:
    root = tmp_path / "mixed"
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(6):
            # class 0: 12x12 RGB; class 1: three grey 12x12 and three RGB 20x20
            grey, big = c == 1 and i < 3, c == 1 and i >= 3
            size = (20, 20) if big else (12, 12)
            Image.new("L" if grey else "RGB", size, 30 * i if grey else (30 * i, 10, 200)).save(
                root / f"c{c}" / f"{i}.png")
    result = run("experts", root, "--experts", "1", "--expert-epochs", "1", "-q", "--cache-dir", cache)
    assert result.exit_code == 0, result.output
    (note,) = [s for s in result.output.splitlines() if s.startswith("note:")]
    assert "3 of 12 images resized to 12x12" in note and "3 grey images converted to RGB" in note
    same = tmp_path / "same"
    for c in range(2):
        (same / f"c{c}").mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 40 * i + c).save(same / f"c{c}" / f"{i}.png")
    result = run("experts", same, "--experts", "1", "--expert-epochs", "1", "-q", "--cache-dir", cache)
    assert result.exit_code == 0 and "note:" not in result.output


@pytest.mark.parametrize("args", [
    ["encode", "digits", "--budget", "1ipc", "--dry-run", "--latents-per-class", "0"],
    ["encode", "digits", "--budget", "1ipc", "--dry-run", "--experts", "0"],
    ["encode", "digits", "--budget", "1ipc", "--dry-run", "--expert-epochs", "0"],
    ["encode", "digits", "--budget", "1ipc", "--dry-run", "--threads", "0"],
    ["encode", "digits", "--budget", "1ipc", "--dry-run", "--checkpoint-every", "-5"],
    ["encode", "digits", "--budget", "1ipc", "--dry-run", "--latent-dim", "0"],
    ["experts", "digits", "--experts", "0"],
    ["experts", "digits", "--expert-epochs", "0"],
])
def test_counts_that_mean_nothing_are_usage_errors(args, tmp_path) -> None:
    result = run(*args, "--cache-dir", tmp_path)
    assert result.exit_code == 2 and "Invalid value" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "datasets").exists()


def test_help_says_what_zero_means() -> None:
    text = " ".join(run("encode", "--help").output.split())
    assert "(0: only on Ctrl-C)" in text and "(0: start from random latents" in text and "(0: the fit alone" in text


# ---- small things ----

def test_npz_files_that_are_not_npz_get_advice_without_allow_pickle(tmp_path, cache) -> None:
    text = tmp_path / "text.npz"
    text.write_text("hello\n")
    one_error_line(run("encode", text, "--budget", "1ipc", "--dry-run", "--cache-dir", cache),
                   "not an .npz (zip) archive", "numpy.savez")
    np.save(tmp_path / "arr.npy", np.zeros(3))
    os.replace(tmp_path / "arr.npy", tmp_path / "arr.npz")
    one_error_line(run("encode", tmp_path / "arr.npz", "--budget", "1ipc", "--dry-run", "--cache-dir", cache),
                   "single .npy array")
    np.savez(tmp_path / "obj.npz", x=np.array([object()], dtype=object), y=np.zeros(1))
    result = run("encode", tmp_path / "obj.npz", "--budget", "1ipc", "--dry-run", "--cache-dir", cache)
    one_error_line(result, "pickled")
    assert "allow_pickle" not in result.output


def test_nothing_to_train_names_cli_options(tmp_path, cache) -> None:
    result = run("encode", "digits", "--budget", "1ipc", "--iterations", "0", "--fit-steps", "0",
                 "-o", tmp_path / "d.d3", "--cache-dir", cache)
    one_error_line(result, "--iterations", "--fit-steps")
    assert "init=" not in result.output


def test_a_scale_beyond_float32_is_one_line_without_a_runtime_warning(tmp_path) -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__)))
    from format.d3bytes import rebuild
    from d3codec.format import dumps

    bad = tmp_path / "over.d3"
    bad.write_bytes(rebuild(dumps(random_d3(0, dtype="I8")),
                            header=lambda h: h["decoders"][0]["tensors"]["fc.bias"].update(scale=[1e39])))
    r = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "d3codec", "verify", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "not a positive finite float32" in r.stderr


def test_the_subtask_budget_error_names_a_budget_that_works(cache) -> None:
    result = run("encode", "digits", "--budget", "1ipc", "--subtasks", "2", "--dry-run", "-q", "--cache-dir", cache)
    one_error_line(result, "too small for 2 subtasks", "raise --budget to")
    need = re.search(r"raise --budget to ([\d,]+\d)", result.output).group(1).replace(",", "")
    assert int(need) > 2560
    ok = run("encode", "digits", "--budget", need, "--subtasks", "2", "--dry-run", "-q", "--cache-dir", cache)
    assert ok.exit_code == 0, ok.output


def test_experts_trained_without_a_test_split_print_no_accuracy(tmp_path, cache, monkeypatch) -> None:
    from d3codec.data import open_dataset
    from d3codec.distill.experts import ensure_experts

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    train = open_dataset("digits", cache_dir=cache, progress=False)
    test = open_dataset("digits", split="test", cache_dir=cache, progress=False)
    for test_dataset, seed in ((None, 11), (test, 12)):
        err = Terminal()
        monkeypatch.setattr(sys, "stderr", err)
        ensure_experts(train, num_experts=1, epochs=1, seed=seed, cache_dir=str(tmp_path), test_dataset=test_dataset)
        monkeypatch.undo()
        printed = [s for s in re.split(r"[\r\n]", err.getvalue()) if "held-out accuracy" in s]
        assert "None" not in err.getvalue()
        assert printed == ([] if test_dataset is None else ["expert 0: held-out accuracy " + printed[0].split()[-1]])


@pytest.mark.parametrize("command", ["encode", "baseline"])
def test_a_budget_no_dataset_can_read_is_refused_before_the_data_is_decoded(tmp_path, command) -> None:
    data = _npz(tmp_path / "d.npz")
    args = (["encode", data, "-o", tmp_path / "o.d3"] if command == "encode" else
            ["eval", "--baseline", "png", "--train", data, "--test", data])
    res = run(*args, "--budget", "3 apples", "--cache-dir", tmp_path / "cache")
    one_error_line(res, "3 apples", "accepted forms")
    assert "decoding" not in res.output and not os.path.exists(tmp_path / "cache" / "datasets")
