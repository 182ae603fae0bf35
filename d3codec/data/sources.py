"""Where images come from: builtin names, ImageFolder directories or tars, `.npz` files, the embedded set.

`resolve_source(spec, data_dir)` turns a dataset argument into a `Source`: its class names,
an identity (bytes hashed into the cache fingerprint: file contents for array files, the
listing with sizes and modification times for folders) and a loader of the train and test
items. Sources without a test split get one held out per class (see `split.py`).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np

from d3codec.data import readers, tar
from d3codec.data.split import holdout_count, holdout_mask
from d3codec.errors import DatasetError

#: Files an ImageFolder source reads (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
#: Builtin dataset names (`digits` is embedded; the others read `--data-dir`).
BUILTINS = ("digits", "mnist", "cifar10", "cifar100", "tinyimagenet", "imagenet")
_EMBEDDED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded", "digits.npz")


@dataclass
class FileItems:
    """Image files of one split, grouped by class (labels 0..k-1 in order), listed lazily.

    `files_of(c)` returns class c's (absolute path or tar member, display name) pairs; it
    re-reads the folder each call, so a split of any size never sits in memory as a list of paths.
    """

    counts: list[int]
    files_of: Callable[[int], list[tuple[tar.ImageRef, str]]]

    def __len__(self) -> int:
        return int(sum(self.counts))


@dataclass
class ArrayItems:
    """Images already decoded: `x` (N, H, W, C) uint8 and labels `y` (N,) int64."""

    x: np.ndarray
    y: np.ndarray


Items = Union[FileItems, ArrayItems]
Loaded = tuple[list[str], Items, Items]


@dataclass
class Source:
    """A resolved dataset argument. `load()` returns (class_names, train items, test items)."""

    name: str
    kind: str
    identity: bytes
    held_out: bool
    load: Callable[[], Loaded]


def resolve_source(spec: str, data_dir: Optional[str] = None) -> Source:
    """Resolve a dataset argument: a builtin name, an ImageFolder directory or `.tar`, or an `.npz` file."""
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError(f"empty dataset argument; give a builtin name ({', '.join(BUILTINS)}), a folder or an .npz file")
    if spec in BUILTINS:
        return _builtin(spec, data_dir)
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        return folder_source(path, name=os.path.basename(os.path.normpath(path)) or path)
    if os.path.isfile(path):
        if path.lower().endswith(".npz"):
            return _npz_source(path)
        if tar.is_tar_name(path):
            return tar_source(path)
        raise DatasetError(f"{spec} is a file but not an .npz or a .tar; give an .npz with x and y, "
                           "or an ImageFolder directory or .tar")
    looks_like_path = os.sep in spec or spec.startswith((".", "~")) or spec.lower().endswith(".npz")
    if looks_like_path:
        raise DatasetError(f"no such file or folder: {spec}; give an ImageFolder directory or .tar, an .npz file or a builtin name")
    raise DatasetError(
        f"unknown dataset {spec!r}: not a builtin ({', '.join(BUILTINS)}) and no such file or folder"
    )


# ---- array sources ----

def _with_holdout(class_names: list[str], x: np.ndarray, y: np.ndarray) -> Loaded:
    mask = holdout_mask(y, [str(i) for i in range(len(y))], class_names)
    return class_names, ArrayItems(x[~mask], y[~mask]), ArrayItems(x[mask], y[mask])


def _npz_source(path: str) -> Source:
    def load() -> Loaded:
        x, y = readers.read_npz(path)
        num_classes = int(y.max()) + 1 if len(y) else 0
        _check_classes(num_classes, path)
        return _with_holdout([str(c) for c in range(num_classes)], x, y)

    return Source(os.path.basename(path), "npz", b"npz\0" + readers.file_digest(path), True, load)


def _digits_source() -> Source:
    def load() -> Loaded:
        x, y = readers.read_npz(_EMBEDDED)
        return _with_holdout([str(c) for c in range(10)], x, y)

    return Source("digits", "digits", b"digits\0" + readers.file_digest(_EMBEDDED), True, load)


def _find(dirs: list[str], names: list[str]) -> Optional[str]:
    for d in dirs:
        for n in names:
            p = os.path.join(d, n)
            if os.path.isfile(p):
                return p
    return None


def _mnist_source(data_dir: str) -> Source:
    dirs = [data_dir, os.path.join(data_dir, "mnist"), os.path.join(data_dir, "MNIST", "raw")]
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    files = [_find(dirs, [s, s + ".gz"]) for s in stems]
    if None in files:
        missing = [s for s, f in zip(stems, files) if f is None]
        raise DatasetError(f"mnist: {', '.join(missing)}(.gz) not found in {data_dir}; point --data-dir at the four MNIST IDX files")
    paths: list[str] = [f for f in files if f is not None]

    def load() -> Loaded:
        xs = [readers.read_idx(paths[0]), readers.read_idx(paths[2])]
        ys = [readers.read_idx(paths[1]).astype(np.int64), readers.read_idx(paths[3]).astype(np.int64)]
        for x, y, p in zip(xs, ys, paths[::2]):
            if x.ndim != 3 or len(x) != len(y):
                raise DatasetError(f"{p}: {x.shape} images for {len(y)} labels; use the matching MNIST IDX files")
        classes = [str(c) for c in range(10)]
        return classes, ArrayItems(xs[0][..., None], ys[0]), ArrayItems(xs[1][..., None], ys[1])

    identity = b"mnist\0" + b"".join(readers.file_digest(p) for p in paths)
    return Source("mnist", "idx", identity, False, load)


def _cifar_pickle_source(name: str, root: str) -> Source:
    if name == "cifar10":
        train_files = [os.path.join(root, f"data_batch_{i}") for i in range(1, 6)]
        test_file, meta_file, label_key, names_key = (
            os.path.join(root, "test_batch"), os.path.join(root, "batches.meta"), "labels", "label_names")
    else:
        train_files = [os.path.join(root, "train")]
        test_file, meta_file, label_key, names_key = (
            os.path.join(root, "test"), os.path.join(root, "meta"), "fine_labels", "fine_label_names")
    needed = train_files + [test_file]
    missing = [os.path.basename(p) for p in needed if not os.path.isfile(p)]
    if missing:
        raise DatasetError(f"{name}: {', '.join(missing)} missing in {root}; use the complete CIFAR python version")

    def load() -> Loaded:
        parts = [readers.cifar_images(readers.read_cifar_batch(p), p, label_key) for p in train_files]
        x_train = np.concatenate([p[0] for p in parts])
        y_train = np.concatenate([p[1] for p in parts])
        x_test, y_test = readers.cifar_images(readers.read_cifar_batch(test_file), test_file, label_key)
        num_classes = 10 if name == "cifar10" else 100
        classes = [str(c) for c in range(num_classes)]
        if os.path.isfile(meta_file):
            names = readers.read_cifar_batch(meta_file).get(names_key)
            if names is not None and len(names) == num_classes:
                classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        for y, p in ((y_train, root), (y_test, test_file)):
            if len(y) and (y.min() < 0 or y.max() >= num_classes):
                raise DatasetError(f"{p}: labels outside 0..{num_classes - 1}; use the official {name} files")
        return classes, ArrayItems(x_train, y_train), ArrayItems(x_test, y_test)

    identity = name.encode() + b"\0" + b"".join(readers.file_digest(p) for p in needed)
    return Source(name, "cifar-pickle", identity, False, load)


# ---- folder sources ----

def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _list_images(class_dir: str) -> list[str]:
    """Image files under `class_dir`, recursively, in sorted order (paths relative to it)."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, class_dir)
        for f in sorted(filenames):
            if _is_image(f):
                out.append(f if rel == "." else os.path.join(rel, f))
    return out


def _class_names(root: str) -> list[str]:
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise DatasetError(f"cannot list {root}: {exc.strerror}; check the path and its permissions") from None
    names = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    if not names:
        loose = sum(1 for e in entries if e.is_file() and _is_image(e.name))
        if loose:
            raise DatasetError(f"{root} holds {loose} images but no class folders; put each class's images in {root}/<class>/")
        raise DatasetError(f"{root} is empty: no class folders with images; expected {root}/<class>/<image>.jpg|png")
    return names


def _scan_folder(root: str) -> tuple[list[str], list[int], bytes]:
    """Class names (sorted sub-folder names), images per class, and a hash of the listing
    (names, sizes, mtimes). Streams class by class: memory does not grow with the image count."""
    class_names = _class_names(root)
    h = hashlib.blake2b(digest_size=16)
    counts = []
    for c in class_names:
        files = _list_images(os.path.join(root, c))
        for f in files:
            st = os.stat(os.path.join(root, c, f))
            h.update(f"{c}/{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        counts.append(len(files))
    if not any(counts):
        raise DatasetError(f"{root} has class folders but no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...); expected {root}/<class>/<image>")
    empty = [c for c, n in zip(class_names, counts) if not n]
    if empty:
        raise DatasetError(f"class folder(s) {', '.join(empty[:5])} in {root} have no images; add images or remove the folder(s)")
    return class_names, counts, h.digest()


def _check_classes(num_classes: int, where: str, names: Optional[list[str]] = None) -> None:
    if num_classes < 2:
        which = f" ({names[0]})" if names else ""
        raise DatasetError(f"{where} has only {num_classes} class{which}; distillation needs at least 2 classes")


def _class_files(root: str, name: str, part: Optional[bool] = None) -> list[tuple[str, str]]:
    """(path, name) of a class folder's images; `part` True/False keeps only held-out/other ones."""
    files = _list_images(os.path.join(root, name))
    if part is not None:
        mask = holdout_mask(np.zeros(len(files), dtype=np.int64), files, [name])
        files = [f for f, m in zip(files, mask) if m == part]
    return [(os.path.join(root, name, f), os.path.join(name, f)) for f in files]


def folder_source(root: str, name: Optional[str] = None, test_root: Optional[str] = None) -> Source:
    """An ImageFolder (`root/<class>/<image>`); test = `test_root` if given, else held out."""
    root = os.path.abspath(root)
    class_names, counts, digest = _scan_folder(root)
    _check_classes(len(class_names), root, class_names)
    identity = b"folder\0" + digest
    if test_root is not None:
        test_root = os.path.abspath(test_root)
        t_names, t_counts, t_digest = _scan_folder(test_root)
        unknown = [c for c in t_names if c not in class_names]
        if unknown:
            raise DatasetError(f"test folder {test_root} has classes {unknown[:5]} that {root} lacks; use matching class folders")
        identity += b"\0test\0" + t_digest
        test_counts = [t_counts[t_names.index(c)] if c in t_names else 0 for c in class_names]

    def load() -> Loaded:
        if test_root is not None:
            return (class_names, FileItems(counts, lambda c: _class_files(root, class_names[c])),
                    FileItems(test_counts, lambda c: _class_files(test_root, class_names[c])
                              if test_counts[c] else []))
        held = [holdout_count(n) for n in counts]
        return (class_names,
                FileItems([n - k for n, k in zip(counts, held)], lambda c: _class_files(root, class_names[c], False)),
                FileItems(held, lambda c: _class_files(root, class_names[c], True)))

    return Source(name or os.path.basename(root), "folder", identity, test_root is None, load)


def tar_source(path: str, name: Optional[str] = None) -> Source:
    """An ImageFolder in an uncompressed tar, or a tar of per-class tars, read in place (see `tar.py`);
    its test split is held out per class as for a folder, so the tar and its extraction agree."""
    listing = tar.scan_tar(path, IMAGE_EXTENSIONS)
    class_names = listing.class_names
    _check_classes(len(class_names), listing.path, class_names)

    def files(c: int, part: bool) -> list[tuple[tar.ImageRef, str]]:
        members = listing.members_of(c)
        mask = holdout_mask(np.zeros(len(members), dtype=np.int64), [k for k, _ in members], [class_names[c]])
        return [(ref, f"{class_names[c]}/{k}") for (k, ref), m in zip(members, mask) if m == part]

    def load() -> Loaded:
        held = [holdout_count(n) for n in listing.counts]
        return (class_names, FileItems([n - k for n, k in zip(listing.counts, held)], lambda c: files(c, False)),
                FileItems(held, lambda c: files(c, True)))

    stem = os.path.basename(path)
    return Source(name or stem[:stem.lower().rfind(".tar")], "tar", b"tar\0" + listing.digest, True, load)


def _has_class_folders(path: str) -> bool:
    return os.path.isdir(path) and any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(path))


def _tinyimagenet_source(data_dir: str) -> Source:
    root = data_dir if os.path.isdir(os.path.join(data_dir, "train")) else os.path.join(data_dir, "tiny-imagenet-200")
    train = os.path.join(root, "train")
    annotations = os.path.join(root, "val", "val_annotations.txt")
    if not os.path.isdir(train) and os.path.isfile(os.path.join(data_dir, "train.tar")):
        return tar_source(os.path.join(data_dir, "train.tar"), name="tinyimagenet")
    if not os.path.isdir(train):
        raise DatasetError(f"tinyimagenet: no train/ folder or train.tar in {data_dir}; point --data-dir at tiny-imagenet-200")
    if not os.path.isfile(annotations):
        return folder_source(train, name="tinyimagenet")
    class_names, counts, digest = _scan_folder(train)
    _check_classes(len(class_names), train, class_names)
    label_of = {c: i for i, c in enumerate(class_names)}
    val_dir = os.path.join(root, "val", "images")
    by_class: list[list[tuple[str, str]]] = [[] for _ in class_names]
    with open(annotations) as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) >= 2 and parts[1] in label_of:
                by_class[label_of[parts[1]]].append((os.path.join(val_dir, parts[0]), f"val/{parts[0]}"))

    def load() -> Loaded:
        # The official val split is the test split, so train keeps every train image.
        return (class_names, FileItems(counts, lambda c: _class_files(train, class_names[c])),
                FileItems([len(v) for v in by_class], lambda c: by_class[c]))

    identity = b"tinyimagenet\0" + digest + readers.file_digest(annotations)
    return Source("tinyimagenet", "folder", identity, False, load)


def _builtin(name: str, data_dir: Optional[str]) -> Source:
    if name == "digits":
        return _digits_source()
    if not data_dir:
        raise DatasetError(f"dataset {name!r} reads its files from --data-dir; pass --data-dir DIR (no download is made)")
    data_dir = os.path.expanduser(data_dir)
    if not os.path.isdir(data_dir):
        raise DatasetError(f"--data-dir {data_dir} is not a folder; point it at the {name} files")
    if name == "mnist":
        return _mnist_source(data_dir)
    if name in ("cifar10", "cifar100"):
        sub = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
        marker = "data_batch_1" if name == "cifar10" else "train"
        for root in (os.path.join(data_dir, sub), data_dir):
            if os.path.isfile(os.path.join(root, marker)):
                return _cifar_pickle_source(name, root)
    if name == "tinyimagenet":
        return _tinyimagenet_source(data_dir)
    train = os.path.join(data_dir, "train")
    if _has_class_folders(train):
        tests = [os.path.join(data_dir, t) for t in ("test", "val")]
        test = next((t for t in tests if _has_class_folders(t)), None)
        return folder_source(train, name=name, test_root=test)
    if name == "imagenet" and _has_class_folders(data_dir):
        return folder_source(data_dir, name=name)
    if name == "imagenet" and os.path.isfile(os.path.join(data_dir, "ILSVRC2012_img_train.tar")):
        return tar_source(os.path.join(data_dir, "ILSVRC2012_img_train.tar"), name=name)
    expected = {
        "cifar10": "cifar-10-batches-py/ (python batches) or train/<class>/ folders",
        "cifar100": "cifar-100-python/ (python batches) or train/<class>/ folders",
        "imagenet": "train/<wnid>/*.JPEG folders or ILSVRC2012_img_train.tar",
    }[name]
    raise DatasetError(f"{name}: {data_dir} holds neither {expected}; point --data-dir at them")
