"""Every dataset argument kind opens with the right classes, splits and pixels; bad input says why."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from d3codec.data import BUILTINS, open_dataset
from d3codec.data.split import holdout_count
from d3codec.errors import DatasetError

from conftest import class_image, write_idx  # type: ignore[import-not-found]


def test_digits_is_embedded_with_held_out_test(cache_dir):
    train = open_dataset("digits", cache_dir=cache_dir, progress=False)
    test = open_dataset("digits", split="test", cache_dir=cache_dir, progress=False)
    assert (train.num_classes, train.image_shape) == (10, (1, 8, 8))
    assert len(train) + len(test) == 1797
    for c in range(10):  # 10% of each class, and nothing in both splits
        n = len(train.indices_of_class(c)) + len(test.indices_of_class(c))
        assert len(test.indices_of_class(c)) == holdout_count(n)
    x = np.load(os.path.join(os.path.dirname(__import__("d3codec.data").data.__file__), "embedded", "digits.npz"))["x"]
    rows = {r.tobytes() for r in x}
    train_rows = {r.tobytes() for r in train.uint8(range(len(train)))[..., 0]}
    test_rows = {r.tobytes() for r in test.uint8(range(len(test)))[..., 0]}
    assert train_rows | test_rows <= rows
    assert test.test_held_out and train.fingerprint == test.fingerprint


def test_image_folder_classes_sorted_pixels_exact(make_folder, cache_dir):
    root = make_folder(classes=3, per_class=10, ext="png")
    train = open_dataset(root, cache_dir=cache_dir, progress=False)
    test = open_dataset(root, split="test", cache_dir=cache_dir, progress=False)
    assert train.class_names == ["class_0", "class_1", "class_2"]
    assert (len(train), len(test)) == (27, 3)
    assert train.image_shape == (3, 8, 8)
    # PNG is lossless: every cached image is one of the written ones, in its class
    written = {(c, class_image(c, i).tobytes()) for c in range(3) for i in range(10)}
    for ds in (train, test):
        for k in range(len(ds)):
            assert (int(ds.labels[k]), ds.uint8([k])[0].tobytes()) in written


def test_jpeg_grayscale_and_resolution(make_folder, cache_dir):
    root = make_folder(classes=2, per_class=6, size=16, ext="jpg", channels=1)
    ds = open_dataset(root, resolution=8, cache_dir=cache_dir, progress=False)
    assert ds.image_shape == (1, 8, 8)
    assert ds.batch([0, 1]).shape == (2, 1, 8, 8)


@pytest.mark.parametrize("channels", [None, 1, 3])
def test_npz_source(tmp_path, cache_dir, channels):
    rng = np.random.default_rng(0)
    shape = (40, 6, 6) if channels is None else (40, 6, 6, channels)
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    y = np.repeat(np.arange(4), 10)
    path = str(tmp_path / "set.npz")
    np.savez(path, x=x, y=y)
    train = open_dataset(path, cache_dir=cache_dir, progress=False)
    test = open_dataset(path, split="test", cache_dir=cache_dir, progress=False)
    assert train.num_classes == 4 and (len(train), len(test)) == (36, 4)
    assert train.image_shape == ((channels or 1), 6, 6)
    # mean/std are the train split's, in [0, 1] pixel units
    pixels = train.uint8(range(len(train))).astype(np.float64) / 255
    np.testing.assert_allclose(train.mean, pixels.reshape(-1, pixels.shape[-1]).mean(0), rtol=1e-9)
    np.testing.assert_allclose(train.std, pixels.reshape(-1, pixels.shape[-1]).std(0), rtol=1e-6)


def test_mnist_idx_files(tmp_path, cache_dir):
    rng = np.random.default_rng(1)
    d = tmp_path / "mnist"
    d.mkdir()
    xs = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    write_idx(str(d / "train-images-idx3-ubyte.gz"), xs)
    write_idx(str(d / "train-labels-idx1-ubyte.gz"), np.arange(30) % 10)
    write_idx(str(d / "t10k-images-idx3-ubyte"), xs[:10])  # un-gzipped also works
    write_idx(str(d / "t10k-labels-idx1-ubyte"), np.arange(10))
    train = open_dataset("mnist", data_dir=str(d), cache_dir=cache_dir, progress=False)
    test = open_dataset("mnist", data_dir=str(d), split="test", cache_dir=cache_dir, progress=False)
    assert (len(train), len(test), train.image_shape) == (30, 10, (1, 28, 28))
    assert not test.test_held_out  # the official t10k split
    np.testing.assert_array_equal(train.uint8(range(30))[..., 0], xs)
    np.testing.assert_array_equal(test.labels, np.arange(10))


def _cifar_batch(path, x, labels, key="labels"):
    data = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
    with open(path, "wb") as f:
        pickle.dump({b"data": data, key.encode(): list(labels), b"batch_label": b"x"}, f, protocol=2)


def test_cifar10_python_batches(tmp_path, cache_dir):
    rng = np.random.default_rng(2)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    x = rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)
    for i in range(5):
        _cifar_batch(d / f"data_batch_{i + 1}", x[10 * i:10 * i + 10], np.arange(10))
    _cifar_batch(d / "test_batch", x[50:], np.arange(10))
    names = [f"n{c}".encode() for c in range(10)]
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f, protocol=2)
    train = open_dataset("cifar10", data_dir=str(tmp_path), cache_dir=cache_dir, progress=False)
    test = open_dataset("cifar10", data_dir=str(tmp_path), split="test", cache_dir=cache_dir, progress=False)
    assert train.class_names[:2] == ["n0", "n1"] and (len(train), len(test)) == (50, 10)
    np.testing.assert_array_equal(train.uint8(range(50)), x[:50])


def test_cifar_pickle_with_code_is_refused(tmp_path, cache_dir):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as f:
            pickle.dump({"data": os.system}, f)  # a pickle that would import os.system
    with pytest.raises(DatasetError, match="refusing to load"):
        open_dataset("cifar10", data_dir=str(tmp_path), cache_dir=cache_dir, progress=False)


def test_builtin_class_folders_with_official_test(make_folder, tmp_path, cache_dir):
    make_folder(classes=2, per_class=5, name="imnet/train")
    make_folder(classes=2, per_class=2, name="imnet/val")
    train = open_dataset("imagenet", data_dir=str(tmp_path / "imnet"), cache_dir=cache_dir, progress=False)
    test = open_dataset("imagenet", data_dir=str(tmp_path / "imnet"), split="test", cache_dir=cache_dir,
                        progress=False)
    assert (len(train), len(test), test.test_held_out) == (10, 4, False)


def test_tinyimagenet_layout(tmp_path, cache_dir):
    root = tmp_path / "tiny-imagenet-200"
    for w, c in (("n01", 0), ("n02", 1)):
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(class_image(c, i)).save(d / f"{w}_{i}.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for i, w in enumerate(("n02", "n01")):
        Image.fromarray(class_image(i, 9)).save(root / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t8\t8\n")
    (root / "val" / "val_annotations.txt").write_text("".join(lines))
    train = open_dataset("tinyimagenet", data_dir=str(tmp_path), cache_dir=cache_dir, progress=False)
    test = open_dataset("tinyimagenet", data_dir=str(tmp_path), split="test", cache_dir=cache_dir, progress=False)
    assert train.class_names == ["n01", "n02"] and len(train) == 6
    np.testing.assert_array_equal(test.labels, [0, 1])  # grouped by class
    # val_0.JPEG (written from class_image(0, 9)) is annotated n02, i.e. label 1
    diff = np.abs(test.uint8([1])[0].astype(int) - class_image(0, 9).astype(int)).mean()
    assert diff < 10


def test_subset_views_share_the_cache(cache_dir):
    train = open_dataset("digits", cache_dir=cache_dir, progress=False)
    sub = train.subset([7, 2])
    assert sub.class_names == ["7", "2"] and sub.num_classes == 2 and sub.classes == (7, 2)
    assert set(np.unique(sub.labels)) == {0, 1}
    assert len(sub) == len(train.indices_of_class(7)) + len(train.indices_of_class(2))
    first7 = train.indices_of_class(7)[0]
    np.testing.assert_array_equal(sub.uint8(sub.indices_of_class(0)[:1]), train.uint8([first7]))
    kept = train.subset([7, 2], remap=False)
    assert set(np.unique(kept.labels)) == {2, 7} and kept.num_classes == 10
    assert sub.mean == train.mean  # one pixel space for every view
    with pytest.raises(DatasetError, match="distinct"):
        train.subset([1, 1])
    counts = train.class_counts()
    assert counts.sum() == len(train) and counts[7] == len(train.indices_of_class(7))
    assert sub.class_counts().tolist() == [counts[7], counts[2]]
    assert kept.class_counts()[[2, 7]].tolist() == [counts[2], counts[7]] and kept.class_counts()[0] == 0


def test_batch_is_normalised_on_device(cache_dir):
    ds = open_dataset("digits", cache_dir=cache_dir, progress=False)
    x = ds.batch(np.arange(len(ds)))
    assert x.dtype.is_floating_point and x.shape == (len(ds), 1, 8, 8)
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2
    raw = ds.uint8([3])[0, :, :, 0] / 255.0
    np.testing.assert_allclose(x[3, 0].numpy(), (raw - ds.mean[0]) / ds.std[0], rtol=1e-5, atol=1e-6)


# ---- bad input: one clear DatasetError each ----

def test_wrong_path(cache_dir):
    with pytest.raises(DatasetError, match="no such file or folder: ./nowhere"):
        open_dataset("./nowhere", cache_dir=cache_dir)


def test_unknown_builtin_lists_them(cache_dir):
    with pytest.raises(DatasetError) as err:
        open_dataset("imagenett", cache_dir=cache_dir)
    assert all(name in str(err.value) for name in BUILTINS)


def test_missing_data_dir(tmp_path, cache_dir):
    with pytest.raises(DatasetError, match="--data-dir"):
        open_dataset("mnist", cache_dir=cache_dir)
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte"):
        open_dataset("mnist", data_dir=str(tmp_path), cache_dir=cache_dir)
    with pytest.raises(DatasetError, match="cifar-10-batches-py"):
        open_dataset("cifar10", data_dir=str(tmp_path), cache_dir=cache_dir)


def test_empty_folder(tmp_path, cache_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="is empty"):
        open_dataset(str(tmp_path / "empty"), cache_dir=cache_dir)
    (tmp_path / "empty" / "a").mkdir()
    (tmp_path / "empty" / "b").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        open_dataset(str(tmp_path / "empty"), cache_dir=cache_dir)


def test_loose_images_without_class_folders(tmp_path, cache_dir):
    (tmp_path / "loose").mkdir()
    Image.fromarray(class_image(0, 0)).save(tmp_path / "loose" / "a.png")
    with pytest.raises(DatasetError, match="no class folders"):
        open_dataset(str(tmp_path / "loose"), cache_dir=cache_dir)


def test_single_class_folder(make_folder, cache_dir):
    root = make_folder(classes=1, per_class=4)
    with pytest.raises(DatasetError, match="only 1 class .*at least 2 classes"):
        open_dataset(root, cache_dir=cache_dir)


@pytest.mark.parametrize("x, y, message", [
    (np.zeros((4, 5, 5), np.uint8), np.array([0, 1, 0]), "one label per image"),
    (np.zeros((4, 5, 5), np.uint8), np.array([0, 1, 3, 3]), "classes \\[2\\] have no image"),
    (np.zeros((4, 5, 5), np.uint8), np.array([0, -1, 1, 1]), "negative label"),
    (np.zeros((4, 5, 5), np.uint8), np.array([0.0, 1, 1, 0]), "must be integers"),
    (np.zeros((4, 5, 5), np.float32), np.array([0, 1, 1, 0]), "not uint8"),
    (np.zeros((4, 5), np.uint8), np.array([0, 1, 1, 0]), "expected \\(N,H,W\\)"),
    (np.zeros((4, 5, 5), np.uint8), np.array([0, 0, 0, 0]), "only 1 class"),
])
def test_mislabelled_npz(tmp_path, cache_dir, x, y, message):
    path = str(tmp_path / "bad.npz")
    np.savez(path, x=x, y=y)
    with pytest.raises(DatasetError, match=message):
        open_dataset(path, cache_dir=cache_dir)


def test_npz_without_x_y(tmp_path, cache_dir):
    path = str(tmp_path / "other.npz")
    np.savez(path, images=np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(DatasetError, match="not 'x' and 'y'"):
        open_dataset(path, cache_dir=cache_dir)


def test_bad_split_and_resolution(cache_dir):
    with pytest.raises(DatasetError, match="split"):
        open_dataset("digits", split="val", cache_dir=cache_dir)
    with pytest.raises(DatasetError, match="resolution"):
        open_dataset("digits", resolution=0, cache_dir=cache_dir)


def test_real_mnist_official_split(shared_data, cache_dir):
    mnist = os.path.join(shared_data, "mnist")
    train = open_dataset("mnist", data_dir=mnist, cache_dir=cache_dir, progress=False)
    test = open_dataset("mnist", data_dir=mnist, split="test", cache_dir=cache_dir, progress=False)
    assert (len(train), len(test)) == (60000, 10000)
    assert abs(train.mean[0] - 0.1307) < 1e-3 and abs(train.std[0] - 0.3081) < 1e-3
