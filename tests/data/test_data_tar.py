"""Tars read in place: an ImageFolder in a tar and a tar of per-class tars (ILSVRC2012) give the same
classes, split and cached pixels as their extracted folders; bad tars fail in one line."""
from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
import tracemalloc

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from d3codec.cli import cli
from d3codec.data import IMAGE_EXTENSIONS, open_dataset
from d3codec.data.sources import resolve_source
from d3codec.data.split import holdout_count
from d3codec.data.tar import scan_tar
from d3codec.errors import DatasetError

from conftest import class_image  # type: ignore[import-not-found]


def _files(root: str) -> list[str]:
    """Every file under root, relative, in reverse sorted order (so the tar is not in folder order)."""
    out = [os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs]
    return sorted(out, reverse=True)


def _tar_folder(root: str, path: str, top: str = "train") -> str:
    """`root`'s files as `top/<relative path>` members (top '' = at the tar's root)."""
    with tarfile.open(path, "w") as tf:
        for rel in _files(root):
            tf.add(os.path.join(root, rel), arcname=f"{top}/{rel}" if top else f"./{rel}")
    return path


def _tar_of_tars(root: str, path: str) -> str:
    """ILSVRC2012 train layout: one `<class>.tar` member per class folder, each holding its images."""
    with tarfile.open(path, "w") as outer:
        for c in sorted(os.listdir(root), reverse=True):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for rel in _files(os.path.join(root, c)):
                    inner.add(os.path.join(root, c, rel), arcname=rel)
            info = tarfile.TarInfo(f"{c}.tar")
            info.size = buf.tell()
            buf.seek(0)
            outer.addfile(info, buf)
    return path


def _everything(ds) -> tuple:
    return ds.class_names, ds.uint8(range(len(ds))), np.asarray(ds.labels), ds.mean, ds.std


def _assert_same(spec_a, spec_b, cache_dir: str, **kw) -> None:
    for split in ("train", "test"):
        a = open_dataset(spec_a, split=split, cache_dir=cache_dir, progress=False, **kw)
        b = open_dataset(spec_b, split=split, cache_dir=cache_dir, progress=False)
        (na, xa, ya, ma, sa), (nb, xb, yb, mb, sb) = _everything(a), _everything(b)
        assert na == nb and len(a) == len(b) and a.image_shape == b.image_shape
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_allclose(ma, mb, rtol=1e-12)
        np.testing.assert_allclose(sa, sb, rtol=1e-12)


def _with_extras(root: str) -> None:
    """A sub-folder inside a class, a hidden file and a non-image file, as real folders have."""
    sub = os.path.join(root, "class_1", "00")  # sorts before its sibling files by name, after them in os.walk
    os.makedirs(sub)
    Image.fromarray(class_image(1, 99)).save(os.path.join(sub, "0000.png"))
    with open(os.path.join(root, "class_0", ".DS_Store"), "wb") as f:
        f.write(b"junk")
    with open(os.path.join(root, "class_0", "notes.txt"), "w") as f:
        f.write("not an image")


@pytest.mark.parametrize("ext,top", [("png", "train"), ("jpg", ""), ("png", "data/train")])
def test_image_folder_in_a_tar_equals_the_extracted_folder(make_folder, cache_dir, tmp_path, ext, top):
    root = make_folder(classes=3, per_class=30, ext=ext)
    _with_extras(root)
    path = _tar_folder(root, str(tmp_path / "set.tar"), top)
    train = open_dataset(path, cache_dir=cache_dir, progress=False, workers=2)
    assert train.class_names == ["class_0", "class_1", "class_2"] and train.num_classes == 3
    test = open_dataset(path, split="test", cache_dir=cache_dir, progress=False)
    assert (len(train), len(test)) == (91 - 9, 9) and test.test_held_out
    assert [len(test.indices_of_class(c)) for c in range(3)] == [holdout_count(n) for n in (30, 31, 30)]
    _assert_same(path, root, cache_dir, workers=2)
    # extracting the tar gives the folder back, and the same cache content
    out = tmp_path / "extracted"
    with tarfile.open(path) as tf:
        tf.extractall(out, filter="data")
    _assert_same(path, str(out / top) if top else str(out), cache_dir)


def test_ilsvrc_tar_of_class_tars_via_imagenet_data_dir(make_folder, cache_dir, tmp_path):
    root = make_folder(classes=4, per_class=12, ext="jpg", name="n_classes")
    for c in range(4):
        os.rename(os.path.join(root, f"class_{c}"), os.path.join(root, f"n0{c}000000"))
    data_dir = tmp_path / "ilsvrc"
    data_dir.mkdir()
    _tar_of_tars(root, str(data_dir / "ILSVRC2012_img_train.tar"))
    (data_dir / "ILSVRC2012_img_val.tar").write_bytes(b"")  # beside it, as downloaded: not read
    source = resolve_source("imagenet", str(data_dir))
    assert (source.name, source.kind, source.held_out) == ("imagenet", "tar", True)
    train = open_dataset("imagenet", data_dir=str(data_dir), cache_dir=cache_dir, progress=False)
    assert train.class_names == [f"n0{c}000000" for c in range(4)]
    assert len(train) == 4 * (12 - holdout_count(12))
    _assert_same(str(data_dir / "ILSVRC2012_img_train.tar"), root, cache_dir)


def test_cli_encodes_a_tar(make_folder, cache_dir, tmp_path):
    path = _tar_folder(make_folder(classes=3, per_class=10), str(tmp_path / "set.tar"))
    res = CliRunner().invoke(cli, ["encode", path, "--budget", "1ipc", "--dry-run", "--cache-dir", cache_dir])
    assert res.exit_code == 0, res.output
    assert "plan: decoder" in res.output


def test_a_changed_tar_gets_a_new_cache_entry(make_folder, cache_dir, tmp_path):
    root = make_folder(classes=2, per_class=10)
    path = _tar_folder(root, str(tmp_path / "set.tar"))
    first = open_dataset(path, cache_dir=cache_dir, progress=False)
    assert open_dataset(path, cache_dir=cache_dir, progress=False).fingerprint == first.fingerprint
    Image.fromarray(class_image(0, 50)).save(os.path.join(root, "class_0", "extra.png"))
    _tar_folder(root, path)
    second = open_dataset(path, cache_dir=cache_dir, progress=False)
    assert second.fingerprint != first.fingerprint
    assert len(second) + len(open_dataset(path, split="test", cache_dir=cache_dir, progress=False)) == 21
    assert len(os.listdir(os.path.join(cache_dir, "datasets"))) == 1  # the stale entry is gone


def _error(path: str, cache_dir: str, **kw) -> str:
    with pytest.raises(DatasetError) as exc:
        open_dataset(path, cache_dir=cache_dir, progress=False, **kw)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_compressed_and_non_tars_are_refused_with_the_fix(make_folder, cache_dir, tmp_path):
    path = _tar_folder(make_folder(classes=2, per_class=4), str(tmp_path / "set.tar"))
    gz = tmp_path / "set.tar.gz"
    with open(path, "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert "gzip-compressed" in _error(str(gz), cache_dir) and "gunzip -k set.tar.gz" in _error(str(gz), cache_dir)
    not_tar = tmp_path / "junk.tar"
    not_tar.write_bytes(b"hello" * 300)
    assert "not a readable tar" in _error(str(not_tar), cache_dir)


def test_damaged_tars_fail_in_one_line(make_folder, cache_dir, tmp_path):
    path = _tar_folder(make_folder(classes=2, per_class=6), str(tmp_path / "set.tar"))
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: len(data) // 2 + 100])
    assert "truncated" in _error(str(truncated), cache_dir) or "damaged" in _error(str(truncated), cache_dir)
    with tarfile.open(path) as tf:
        third = tf.getmembers()[3].offset
    broken = bytearray(data)
    broken[third:third + 512] = b"\x7f" * 512  # a header tarfile alone would take as the end
    (tmp_path / "broken.tar").write_bytes(bytes(broken))
    assert f"no valid tar header at byte {third}" in _error(str(tmp_path / "broken.tar"), cache_dir)


def test_tars_without_classes_or_with_empty_classes_say_what_to_fix(make_folder, cache_dir, tmp_path):
    root = make_folder(classes=2, per_class=4)
    loose = tmp_path / "loose.tar"
    with tarfile.open(loose, "w") as tf:
        for c in range(2):
            for rel in os.listdir(os.path.join(root, f"class_{c}")):
                tf.add(os.path.join(root, f"class_{c}", rel), arcname=f"{c}_{rel}")
    assert "no class folders" in _error(str(loose), cache_dir)
    one = _tar_folder(os.path.join(root, "class_0"), str(tmp_path / "one.tar"), top="only")
    assert "only 1 class (only)" in _error(one, cache_dir)
    text = tmp_path / "text.tar"
    with tarfile.open(text, "w") as tf:
        info = tarfile.TarInfo("classes.txt")
        tf.addfile(info, io.BytesIO(b""))
    assert "no images" in _error(str(text), cache_dir)
    # a tar of per-class tars with an empty class tar
    (tmp_path / "c" / "n1").mkdir(parents=True)
    shutil.copytree(os.path.join(root, "class_0"), tmp_path / "c" / "n0")
    tars = _tar_of_tars(str(tmp_path / "c"), str(tmp_path / "tars.tar"))
    assert "n1.tar" in _error(tars, cache_dir) and "hold no images" in _error(tars, cache_dir)


def test_a_member_that_is_not_an_image_follows_skip_bad_images(make_folder, cache_dir, tmp_path):
    root = make_folder(classes=2, per_class=10)
    with open(os.path.join(root, "class_1", "0003.png"), "wb") as f:
        f.write(b"this is not a png")
    path = _tar_folder(root, str(tmp_path / "set.tar"))
    msg = _error(path, cache_dir)
    assert "class_1/0003.png" in msg and "--skip-bad-images" in msg
    with pytest.warns(UserWarning, match="class_1/0003.png"):
        train = open_dataset(path, cache_dir=cache_dir, progress=False, skip_bad_images=True)
    test = open_dataset(path, split="test", cache_dir=cache_dir, progress=False, skip_bad_images=True)
    assert len(train) + len(test) == 19


def _tiny_members_tar(path: str, classes: int, per_class: int, nested: bool) -> None:
    """Many empty `.png` members (enough to list, nothing to decode)."""
    with tarfile.open(path, "w") as outer:
        for c in range(classes):
            names = [f"{c:03d}_{i:05d}.png" for i in range(per_class)]
            if not nested:
                for n in names:
                    outer.addfile(tarfile.TarInfo(f"train/c{c}/{n}"))
                continue
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for n in names:
                    inner.addfile(tarfile.TarInfo(n))
            info = tarfile.TarInfo(f"c{c}.tar")
            info.size = buf.tell()
            buf.seek(0)
            outer.addfile(info, buf)


@pytest.mark.parametrize("nested", [False, True])
def test_listing_memory_does_not_keep_every_header(tmp_path, nested):
    """tarfile keeps a TarInfo per member (~0.5 kB each) unless told not to; the listing keeps
    compact per-class arrays (flat tar) or only where each class tar is (tar of tars)."""
    path = str(tmp_path / "many.tar")
    _tiny_members_tar(path, classes=8, per_class=2000, nested=nested)
    tracemalloc.start()
    try:
        listing = scan_tar(path, IMAGE_EXTENSIONS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert listing.counts == [2000] * 8 and listing.layout == ("tars" if nested else "folder")
    assert peak < 3_000_000, peak  # 16,000 retained TarInfo objects alone would be over 7 MB
    members = listing.members_of(2)
    assert len(members) == 2000 and members[0][0] == "002_00000.png"
    assert members[0][1][0] == listing.path and members[0][1][2] == 0


def test_tinyimagenet_data_dir_with_a_train_tar(make_folder, cache_dir, tmp_path):
    data_dir = tmp_path / "tiny"
    data_dir.mkdir()
    _tar_folder(make_folder(classes=2, per_class=10), str(data_dir / "train.tar"))
    (data_dir / "classes.txt").write_text("class_0\nclass_1\n")  # beside it, not needed
    train = open_dataset("tinyimagenet", data_dir=str(data_dir), cache_dir=cache_dir, progress=False)
    assert train.class_names == ["class_0", "class_1"] and len(train) == 18


def test_an_empty_class_folder_in_a_tar_fails_as_in_a_folder(make_folder, cache_dir, tmp_path):
    root = make_folder(classes=2, per_class=4)
    os.makedirs(os.path.join(root, "class_2"))
    path = str(tmp_path / "set.tar")
    with tarfile.open(path, "w") as tf:
        tf.add(root, arcname="train")  # folder members included, class_2/ with nothing in it
    assert "class folder(s) class_2" in _error(path, cache_dir) and "no images" in _error(path, cache_dir)
    assert "class folder(s) class_2" in _error(root, cache_dir)


def test_a_tar_replaced_under_the_same_name_is_read_anew(make_folder, cache_dir, tmp_path):
    path = str(tmp_path / "set.tar")
    _tar_folder(make_folder(classes=2, per_class=6, name="a"), path)
    open_dataset(path, cache_dir=cache_dir, progress=False)
    other = make_folder(classes=2, per_class=6, name="b")
    for c in range(2):  # same names and sizes (PNG of other pixels), new file put in place by rename
        for i in range(6):
            Image.fromarray(class_image(c, i + 100)).save(os.path.join(other, f"class_{c}", f"{i:04d}.png"))
    os.replace(_tar_folder(other, str(tmp_path / "new.tar")), path)
    _assert_same(path, other, cache_dir)


def test_a_touched_or_copied_tar_keeps_its_fingerprint(make_folder, cache_dir, tmp_path):
    """New mtimes (a re-provisioned or copied source) rebuild the cache entry, but the same decoded
    images keep the dataset's fingerprint: cached experts and files' provenance still match."""
    path = _tar_folder(make_folder(classes=2, per_class=10), str(tmp_path / "set.tar"))
    first = open_dataset(path, cache_dir=cache_dir, progress=False)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = open_dataset(path, cache_dir=cache_dir, progress=False)
    assert touched.entry.meta["source_fingerprint"] != first.entry.meta["source_fingerprint"]
    assert touched.fingerprint == first.fingerprint
    copy = str(tmp_path / "copy.tar")
    with open(path, "rb") as f, open(copy, "wb") as g:
        g.write(f.read())
    assert open_dataset(copy, cache_dir=cache_dir, progress=False).fingerprint == first.fingerprint
