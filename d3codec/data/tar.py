"""Image sets inside uncompressed tar files, read in place without extracting them.

Two layouts: an ImageFolder in a tar (`[top/]<class>/<image>`, like Tiny-ImageNet's `train.tar`)
and a tar of per-class tars (`<wnid>.tar` members each holding that class's images, like
ILSVRC2012's `ILSVRC2012_img_train.tar`). A tar has no index, so `scan_tar` reads its headers
once (never the image data) and groups the image members by class; decoders then read each image
with one positional read at its byte offset (`read_member`). Per class the members are ordered
and keyed as the extracted folder's files would be, so a tar and its extracted folder give the
same classes, held-out split and cached pixels. Compressed tars cannot be read by position and
are refused with the fix (decompress once, keeping a plain `.tar`).
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from array import array
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator, Optional, Union

from d3codec.errors import DatasetError

#: An image inside a tar: (tar path, byte offset of its data, size in bytes).
MemberRef = tuple[str, int, int]
#: Where an image's bytes are: a file path, or a member of a tar.
ImageRef = Union[str, MemberRef]
#: Names that resolve_source treats as tar files (the compressed ones are refused with the fix).
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tar.zstd")

_COMPRESSED = (  # magic bytes, name, the command that leaves a plain .tar beside it
    (b"\x1f\x8b", "gzip", "gunzip -k"),
    (b"BZh", "bzip2", "bunzip2 -k"),
    (b"\xfd7zXZ\x00", "xz", "unxz -k"),
    (b"\x28\xb5\x2f\xfd", "zstd", "unzstd"),
)
_BLOCK = tarfile.BLOCKSIZE


def is_tar_name(path: str) -> bool:
    return path.lower().endswith(TAR_SUFFIXES)


# ---- reading members (used by decoding workers) ----

_FDS: dict[str, tuple[int, tuple[int, int, int]]] = {}  # path -> (open fd, the file's (dev, inode, mtime))


def _fd(path: str) -> int:
    """An open descriptor of `path`, reused while the path still names the same, unchanged file."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_mtime_ns)
    held = _FDS.get(path)
    if held is not None and held[1] == key:
        return held[0]
    if held is not None:
        os.close(held[0])
    fd = os.open(path, os.O_RDONLY)
    _FDS[path] = (fd, key)
    return fd


def read_member(ref: MemberRef) -> bytes:
    """The bytes of one tar member, by positional reads (no seek state, so safe after fork)."""
    path, offset, size = ref
    fd = _fd(path)
    parts, got = [], 0
    while got < size:
        chunk = os.pread(fd, size - got, offset + got)
        if not chunk:
            raise OSError(f"{path} ends inside the member at byte {offset}")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def openable(ref: ImageRef) -> Union[str, BinaryIO]:
    """What `PIL.Image.open` takes for an image reference: the path, or the member's bytes."""
    return ref if isinstance(ref, str) else io.BytesIO(read_member(ref))


# ---- listing ----

def _parts(name: str) -> Optional[tuple[str, ...]]:
    """A member name as path components ('./a//b' -> ('a', 'b')); None if it climbs out ('..')."""
    parts = tuple(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))
    return None if ".." in parts else parts


def _is_image_name(name: str, extensions: tuple[str, ...]) -> bool:
    return name.lower().endswith(extensions) and not name.startswith(".")


def _members(f: BinaryIO, path: str, start: int, end: int, where: str) -> Iterator[tarfile.TarInfo]:
    """The file and folder members of the tar that spans bytes [start, end) of `f`, headers only.

    Offsets (`offset_data`) are absolute in `f`. A damaged header or a member running past `end`
    raises `DatasetError`; tarfile alone would end the listing early without saying so.
    """
    f.seek(start)
    try:
        tf = tarfile.open(fileobj=f, mode="r:")
    except tarfile.ReadError as exc:
        raise DatasetError(f"{where} is not a readable tar ({exc}); re-create or re-download it") from None
    try:
        while True:
            try:
                info = tf.next()
            except tarfile.ReadError as exc:
                raise DatasetError(f"{where} is damaged ({exc}); re-create or re-download it") from None
            tf.members.clear()  # tarfile keeps every header otherwise: memory would grow with the count
            if info is None or info.offset >= end:
                break
            if info.offset_data + (info.size if info.isreg() else 0) > end:
                raise DatasetError(f"{where} is truncated: member {info.name} ends past its end; "
                                   "re-create or re-download it")
            if info.isreg() and info.issparse():
                raise DatasetError(f"{where}: member {info.name} is a sparse file; re-create the tar without --sparse")
            if info.isreg() or info.isdir():
                yield info
        stop = tf.offset
    finally:
        tf.close()
    if stop < end:  # the listing ended: it must be at the zero blocks that close a tar, or at the end
        f.seek(stop)
        block = f.read(min(_BLOCK, end - stop))
        if block.strip(b"\0"):
            raise DatasetError(f"{where} is damaged: no valid tar header at byte {stop}; re-create or re-download it")


def _walk_key(key: str) -> tuple[tuple[str, ...], str]:
    """Sorts relative paths as `os.walk` with sorted names lists them (a folder's files before its sub-folders')."""
    *dirs, name = key.split("/")
    return tuple(dirs), name


def _ordered(entries: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """(key, offset, size) in folder order; a name stored twice keeps its last copy, as extraction does."""
    entries.sort(key=lambda e: (_walk_key(e[0]), e[1]))
    return [e for i, e in enumerate(entries) if i + 1 == len(entries) or entries[i + 1][0] != e[0]]


@dataclass
class _Group:
    """Image members of one directory of an ImageFolder tar: names joined by NUL, offsets, sizes."""

    names: bytearray = field(default_factory=bytearray)
    offsets: array = field(default_factory=lambda: array("q"))
    sizes: array = field(default_factory=lambda: array("q"))

    def add(self, name: str, offset: int, size: int) -> None:
        self.names += name.encode("utf-8", "surrogateescape") + b"\0"
        self.offsets.append(offset)
        self.sizes.append(size)

    def entries(self, prefix: str) -> list[tuple[str, int, int]]:
        names = self.names[:-1].decode("utf-8", "surrogateescape").split("\0")
        return [(prefix + n, o, s) for n, o, s in zip(names, self.offsets, self.sizes)]


@dataclass
class TarListing:
    """The classes of a tar and where their images are. `members_of(c)` lists class c on demand."""

    path: str
    layout: str  # "folder" (an ImageFolder in the tar) or "tars" (a tar of per-class tars)
    class_names: list[str]
    counts: list[int]
    digest: bytes
    extensions: tuple[str, ...]
    _groups: list[list[tuple[tuple[str, ...], _Group]]]  # layout "folder": per class, (sub-dir, group)
    _spans: list[tuple[int, int]]  # layout "tars": per class, the inner tar's (start, end) bytes

    def members_of(self, c: int) -> list[tuple[str, MemberRef]]:
        """Class c's images as (key, ref), in folder order; key = the path relative to the class folder."""
        if self.layout == "folder":
            entries: list[tuple[str, int, int]] = []
            for sub, group in self._groups[c]:
                entries += group.entries("".join(p + "/" for p in sub))
            entries = _ordered(entries)
        else:
            entries = self._inner(c)
        return [(k, (self.path, o, s)) for k, o, s in entries]

    def _inner(self, c: int) -> list[tuple[str, int, int]]:
        start, end = self._spans[c]
        with open(self.path, "rb") as f:
            return _inner_entries(f, self.path, self.class_names[c], start, end, self.extensions)


def _inner_entries(f: BinaryIO, path: str, name: str, start: int, end: int,
                   extensions: tuple[str, ...]) -> list[tuple[str, int, int]]:
    entries = []
    for info in _members(f, path, start, end, f"{name}.tar in {path}"):
        parts = _parts(info.name)
        if info.isreg() and parts and not any(p.startswith(".") for p in parts) \
                and _is_image_name(parts[-1], extensions):
            entries.append(("/".join(parts), info.offset_data, info.size))
    return _ordered(entries)


def _refuse_compressed(path: str) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, kind, command in _COMPRESSED:
        if head.startswith(magic):
            raise DatasetError(f"{path} is a {kind}-compressed tar, which cannot be read in place; decompress it once "
                               f"(`{command} {os.path.basename(path)}` leaves a plain .tar d3codec reads directly) "
                               "or extract it to a folder")


def scan_tar(path: str, extensions: tuple[str, ...]) -> TarListing:
    """List an uncompressed tar's image members (names ending in `extensions`) by class, reading
    headers only, in one pass (plus one pass over each per-class tar's headers)."""
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
        _refuse_compressed(path)
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror}; check the path and its permissions") from None
    groups: dict[tuple[str, ...], _Group] = {}
    dirs: set[tuple[str, ...]] = set()  # folder members: a class folder may hold no image
    tars: list[tuple[str, int, int]] = []
    with open(path, "rb") as f:
        for info in _members(f, path, 0, st.st_size, path):
            parts = _parts(info.name)
            if not parts or any(p.startswith(".") for p in parts):
                continue
            if info.isdir():
                dirs.add(parts)
            elif _is_image_name(parts[-1], extensions):
                groups.setdefault(parts[:-1], _Group()).add(parts[-1], info.offset_data, info.size)
            elif parts[-1].lower().endswith(".tar"):
                tars.append((parts[-1][:-4], info.offset_data, info.offset_data + info.size))
        if groups:
            return _folder_listing(path, st, groups, dirs, extensions)
        if tars:
            return _tars_listing(f, path, st, tars, extensions)
    raise DatasetError(f"{path} holds no images ({', '.join(extensions[:4])}, ...) and no per-class .tar "
                       "members; expected <class>/<image> inside (an ImageFolder) or <class>.tar members")


def _digest(path: str, st: os.stat_result, layout: str) -> "hashlib._Hash":
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{layout}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h


def _folder_listing(path: str, st: os.stat_result, groups: dict[tuple[str, ...], _Group],
                    dirs: set[tuple[str, ...]], extensions: tuple[str, ...]) -> TarListing:
    """Classes of an ImageFolder tar: the sub-folders of the deepest folder holding every image."""
    image_dirs = list(groups)
    root: tuple[str, ...] = image_dirs[0]
    for d in image_dirs[1:]:
        n = 0
        while n < min(len(root), len(d)) and root[n] == d[n]:
            n += 1
        root = root[:n]
    if root in groups and all(len(d) == len(root) for d in image_dirs) and root:
        root = root[:-1]  # one folder holds every image: it is the only class
    names = sorted({d[len(root)] for d in image_dirs if len(d) > len(root)}
                   | {d[len(root)] for d in dirs if len(d) > len(root) and d[:len(root)] == root})
    where = f"{path} (folder {'/'.join(root)})" if root else path
    if not names:
        loose = sum(len(g.offsets) for g in groups.values())
        raise DatasetError(f"{where} holds {loose} images but no class folders; put each class's images in <class>/ "
                           "folders inside the tar")
    by_class: dict[str, list[tuple[tuple[str, ...], _Group]]] = {n: [] for n in names}
    for d in sorted(image_dirs):
        if len(d) > len(root):
            by_class[d[len(root)]].append((d[len(root) + 1:], groups[d]))
    counts = [sum(len(g.offsets) for _, g in by_class[n]) for n in names]
    empty = [n for n, k in zip(names, counts) if not k]
    if empty:
        raise DatasetError(f"class folder(s) {', '.join(empty[:5])} in {where} have no images; "
                           "add images or leave the folder(s) out of the tar")
    listing = TarListing(path, "folder", names, counts, b"", extensions, [by_class[n] for n in names], [])
    h = _digest(path, st, "folder")
    for c, n in enumerate(names):  # class by class: names and sizes, in folder order (after de-duplication)
        members = listing.members_of(c)
        listing.counts[c] = len(members)
        for key, (_, _, size) in members:
            h.update(f"{n}/{key}\0{size}\n".encode("utf-8", "surrogateescape"))
    listing.digest = h.digest()
    return listing


def _tars_listing(f: BinaryIO, path: str, st: os.stat_result, tars: list[tuple[str, int, int]],
                  extensions: tuple[str, ...]) -> TarListing:
    """Classes of a tar of per-class tars (ILSVRC2012 train): each `<class>.tar` member is one class."""
    tars.sort()
    seen = [n for i, (n, _, _) in enumerate(tars) if i and tars[i - 1][0] == n]
    if seen:
        raise DatasetError(f"{path} holds {seen[0]}.tar twice; keep one tar per class")
    h = _digest(path, st, "tars")
    counts, empty = [], []
    for name, start, end in tars:  # class by class: only one class's listing in memory at a time
        entries = _inner_entries(f, path, name, start, end, extensions)
        if not entries:
            empty.append(name)
        counts.append(len(entries))
        for key, _, size in entries:
            h.update(f"{name}/{key}\0{size}\n".encode("utf-8", "surrogateescape"))
    if empty:
        raise DatasetError(f"per-class tar(s) {', '.join(e + '.tar' for e in empty[:5])} in {path} hold no images; "
                           "replace or remove them")
    return TarListing(path, "tars", [n for n, _, _ in tars], counts, h.digest(), extensions, [],
                      [(s, e) for _, s, e in tars])
