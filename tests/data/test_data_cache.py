"""The uint8 memmap cache: reused, invalidated when the source changes, atomic, parallel = serial,
and unreadable images reported by name (or skipped on request)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from d3codec.data import cache as cache_mod
from d3codec.data import open_dataset
from d3codec.errors import DatasetError


def _entries(cache_dir):
    root = os.path.join(cache_dir, "datasets")
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


def test_cache_is_reused_without_decoding(make_folder, cache_dir, monkeypatch):
    root = make_folder(classes=2, per_class=5)
    first = open_dataset(root, cache_dir=cache_dir, progress=False)
    monkeypatch.setattr(cache_mod, "_build", lambda *a, **k: pytest.fail("rebuilt a cached dataset"))
    again = open_dataset(root, cache_dir=cache_dir, progress=False)
    assert again.entry.path == first.entry.path and again.fingerprint == first.fingerprint
    assert len(_entries(cache_dir)) == 1


def test_cache_invalidated_when_source_changes(make_folder, cache_dir):
    root = make_folder(classes=2, per_class=5)
    before = open_dataset(root, cache_dir=cache_dir, progress=False)
    old_path = before.entry.path
    path = os.path.join(root, "class_1", "0003.png")
    from PIL import Image

    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(path)  # same name, new content
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    after = open_dataset(root, cache_dir=cache_dir, progress=False)
    assert after.fingerprint != before.fingerprint
    assert _entries(cache_dir) == [os.path.basename(after.entry.path)]  # the stale entry is gone
    assert not os.path.exists(old_path)
    assert any((after.uint8([i]) == 255).all() for i in range(len(after))) or \
        any((after.other_split().uint8([i]) == 255).all() for i in range(len(after.other_split())))


def test_npz_content_change_invalidates(tmp_path, cache_dir):
    path = str(tmp_path / "a.npz")
    np.savez(path, x=np.zeros((6, 4, 4), np.uint8), y=np.array([0, 0, 0, 1, 1, 1]))
    a = open_dataset(path, cache_dir=cache_dir, progress=False)
    np.savez(path, x=np.full((6, 4, 4), 9, np.uint8), y=np.array([0, 0, 0, 1, 1, 1]))
    b = open_dataset(path, cache_dir=cache_dir, progress=False)
    assert a.fingerprint != b.fingerprint and int(b.uint8([0]).max()) == 9


def test_settings_are_part_of_the_fingerprint(make_folder, cache_dir):
    root = make_folder(classes=2, per_class=4, size=8)
    native = open_dataset(root, cache_dir=cache_dir, progress=False)
    small = open_dataset(root, resolution=4, cache_dir=cache_dir, progress=False)
    assert native.fingerprint != small.fingerprint and small.image_shape == (3, 4, 4)


def test_parallel_workers_equal_serial(make_folder, tmp_path):
    root = make_folder(classes=3, per_class=110, ext="jpg")  # > 4 chunks: the pool is used
    serial = open_dataset(root, cache_dir=str(tmp_path / "c1"), workers=1, progress=False)
    parallel = open_dataset(root, cache_dir=str(tmp_path / "c2"), workers=2, progress=False)
    assert serial.fingerprint == parallel.fingerprint
    with open(serial.entry.images_path, "rb") as f1, open(parallel.entry.images_path, "rb") as f2:
        assert f1.read() == f2.read()
    assert serial.mean == pytest.approx(parallel.mean, rel=1e-12)


def _corrupt(root):
    bad = os.path.join(root, "class_0", "0002.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really")
    trunc = os.path.join(root, "class_1", "0001.png")
    data = open(trunc, "rb").read()
    with open(trunc, "wb") as f:
        f.write(data[: len(data) // 2])
    return ["class_0/0002.png", "class_1/0001.png"]


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_images_stop_before_training_naming_them(make_folder, cache_dir, workers):
    root = make_folder(classes=2, per_class=140)
    names = _corrupt(root)
    with pytest.raises(DatasetError) as err:
        open_dataset(root, cache_dir=cache_dir, workers=workers, progress=False)
    message = str(err.value)
    assert "2 unreadable image(s)" in message and "--skip-bad-images" in message
    assert all(n in message for n in names) and "\n" not in message
    assert _entries(cache_dir) == []  # nothing half-built is left behind


def test_skip_bad_images_leaves_them_out(make_folder, cache_dir):
    root = make_folder(classes=2, per_class=10)
    names = _corrupt(root)
    with pytest.warns(UserWarning, match="skipped 2 unreadable images"):
        train = open_dataset(root, skip_bad_images=True, cache_dir=cache_dir, progress=False)
    test = open_dataset(root, split="test", skip_bad_images=True, cache_dir=cache_dir, progress=False)
    assert sorted(train.skipped_images) == names
    assert len(train) + len(test) == 18
    # compaction kept every good image intact: none is all zeros (bad rows were zero-filled)
    for ds in (train, test):
        assert all(ds.uint8([i]).any() for i in range(len(ds)))


def test_default_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("D3CODEC_CACHE", str(tmp_path / "envcache"))
    ds = open_dataset("digits", progress=False)
    assert ds.entry.path.startswith(str(tmp_path / "envcache"))
    monkeypatch.delenv("D3CODEC_CACHE")
    assert cache_mod.default_cache_dir().endswith(os.path.join(".cache", "d3codec"))


def test_damaged_entry_is_reported(cache_dir):
    ds = open_dataset("digits", cache_dir=cache_dir, progress=False)
    with open(ds.entry.images_path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(DatasetError, match="delete it to rebuild"):
        open_dataset("digits", cache_dir=cache_dir, progress=False)
