"""Data cache benchmarks: decode throughput of an ImageFolder, and peak memory while building.

    python benchmarks/data_cache.py throughput --folder ../shared/data/cifar10-jpeg/train
    python benchmarks/data_cache.py rss --classes 1000 --per-class 300 --size 64 --work /tmp/d3bench

`throughput` builds the cache twice in fresh folders, in-process (workers=1, the baseline) and with
the default worker pool, and prints images/s and their ratio. `rss` generates a JPEG ImageFolder
(once; reused), then builds its cache in a child process while sampling the resident memory of that
process and all its workers every 20 ms; it does so for a tenth of the images per class and for all
of them, so the ratio shows whether peak memory grows with the image count.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def _build(folder: str, cache: str, workers: int | None) -> tuple[int, float]:
    from d3codec.data import open_dataset

    t0 = time.perf_counter()
    train = open_dataset(folder, cache_dir=cache, workers=workers, progress=False)
    test = open_dataset(folder, cache_dir=cache, split="test", workers=workers, progress=False)
    return len(train) + len(test), time.perf_counter() - t0


def throughput(folder: str) -> None:
    rows = {}
    for label, workers in (("in-process (workers=1)", 1), ("worker pool (default)", None)):
        cache = tempfile.mkdtemp(prefix="d3cache-")
        try:
            n, seconds = _build(folder, cache, workers)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        rows[label] = n / seconds
        print(json.dumps({"what": "cache build", "mode": label, "images": n, "seconds": round(seconds, 2),
                          "images_per_s": round(n / seconds, 1), "cpus": os.cpu_count()}), flush=True)
    base, pool = rows.values()
    print(json.dumps({"what": "speed-up of the pool over in-process", "ratio": round(pool / base, 2)}), flush=True)


def generate(work: str, classes: int, per_class: int, size: int) -> str:
    """A JPEG ImageFolder of smooth random images (written once; skipped if complete)."""
    from PIL import Image

    folder = os.path.join(work, f"folder_{classes}x{per_class}_{size}")
    done = os.path.join(folder, ".complete")
    if os.path.exists(done):
        return folder
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for c in range(classes):
        d = os.path.join(folder, f"c{c:04d}")
        os.makedirs(d, exist_ok=True)
        colour = rng.integers(0, 256, 3)
        for i in range(per_class):
            a, b = rng.uniform(-1, 1, 2)
            img = colour[None, None, :] * (0.5 + 0.25 * (a * xx + b * yy))[..., None]
            img = img + rng.normal(0, 8, (size, size, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(d, f"{i:04d}.jpg"), quality=90)
    open(done, "w").close()
    return folder


def _tree_rss(pid: int, field: str = "VmRSS:") -> int:
    """Resident bytes of `pid` and all its descendants (from /proc): `VmRSS:` counts pages shared
    by forked workers once per process; `Pss:` (smaps_rollup) splits them between sharers."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        stack.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/status" if field == "VmRSS:" else f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith(field):
                        total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def _subset_folder(src: str, dst: str, per_class: int) -> str:
    """Symlinks to the first `per_class` images of every class of `src`."""
    if os.path.isdir(dst):
        return dst
    for c in sorted(os.listdir(src)):
        if c.startswith("."):
            continue
        os.makedirs(os.path.join(dst, c))
        for name in sorted(os.listdir(os.path.join(src, c)))[:per_class]:
            os.symlink(os.path.join(src, c, name), os.path.join(dst, c, name))
    return dst


def measure_rss(folder: str) -> dict:
    cache = tempfile.mkdtemp(prefix="d3cache-")
    code = ("import sys; sys.path.insert(0, %r); from d3codec.data import open_dataset; "
            "open_dataset(%r, cache_dir=%r, progress=False)") % (ROOT, folder, cache)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code])
    peak = peak_pss = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        peak_pss = max(peak_pss, _tree_rss(proc.pid, "Pss:"))
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
    images = sum(len([f for f in files if not f.startswith(".")]) for _, _, files in os.walk(folder))
    shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode:
        raise SystemExit(f"cache build failed with exit status {proc.returncode}")
    return {"images": images, "peak_rss_mib": round(peak / 2**20, 1), "peak_pss_mib": round(peak_pss / 2**20, 1),
            "seconds": round(seconds, 1),
            "images_per_s": round(images / seconds, 1)}


def rss(work: str, classes: int, per_class: int, size: int) -> None:
    os.makedirs(work, exist_ok=True)
    t0 = time.perf_counter()
    full = generate(work, classes, per_class, size)
    print(json.dumps({"what": "generated folder", "path": full, "seconds": round(time.perf_counter() - t0, 1)}),
          flush=True)
    small = _subset_folder(full, full + f"_first{per_class // 10}", per_class // 10)
    rows = []
    for folder in (small, full):
        row = measure_rss(folder)
        rows.append(row)
        print(json.dumps({"what": "peak RSS while building the cache (process + workers)", **row}), flush=True)
    print(json.dumps({"what": "growth", "images_ratio": round(rows[1]["images"] / rows[0]["images"], 1),
                      "peak_rss_ratio": round(rows[1]["peak_rss_mib"] / rows[0]["peak_rss_mib"], 2),
                      "peak_pss_ratio": round(rows[1]["peak_pss_mib"] / rows[0]["peak_pss_mib"], 2)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--folder", required=True)
    r = sub.add_parser("rss")
    r.add_argument("--classes", type=int, default=1000)
    r.add_argument("--per-class", type=int, default=300)
    r.add_argument("--size", type=int, default=64)
    r.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "d3bench"))
    args = p.parse_args()
    if args.cmd == "throughput":
        throughput(args.folder)
    else:
        rss(args.work, args.classes, args.per_class, args.size)


if __name__ == "__main__":
    main()
