"""Format I/O: save and load a ~100 MB `.d3` file (priors and decoders) against safetensors.

    python benchmarks/format_io.py [--mb 100] [--repeat 3]

The baseline is measured in the same run on the same tensors: `safetensors.torch.save_file`,
`load_file` (lazy: mmap, so almost free) and `load_file` + materialising every tensor (a copy,
which is what a training loop ends up paying). Our `load` includes reading the whole file, the
CRC-32 over every byte and all validation; by default it maps the file copy-on-write, so raw
sections need no copy (rows with `+ materialise` and `memory_map=False` show the copying costs).
Figures are best of `--repeat`, page cache warm.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch

from d3codec.format import D3File, DecoderEntry, Metadata, Priors, Stored, load, save


def _file(mb: float) -> D3File:
    """Random F32 priors (20%) and two decoders (80%) totalling about `mb` MB."""
    g = torch.Generator().manual_seed(0)
    n, k = 100, 10
    d = max(1, int(mb * 1e6 * 0.2 / (2 * n * k * 4)))
    per_decoder = int(mb * 1e6 * 0.4 / 4)
    width = 512
    decoders = []
    for i in range(2):
        rows = per_decoder // width
        weights = {f"block{j}.weight": Stored(torch.randn(rows // 4, width, generator=g)) for j in range(4)}
        decoders.append(DecoderEntry("large", 1, {"latent_dim": d, "width": width}, list(range(i, n, 2)), weights))
    priors = Priors("diag", Stored(torch.randn(n, k, d, generator=g)), Stored(torch.randn(n, k, d, generator=g)))
    meta = Metadata("bench", n, [str(i) for i in range(n)], (3, 64, 64), (0.5,) * 3, (0.25,) * 3)
    return D3File(meta, priors, decoders)


def _materialise(d3: D3File) -> list[torch.Tensor]:
    """A private copy of every tensor (what `.clone()` after safetensors' lazy load costs)."""
    out = [d3.priors.mean.raw.clone(), d3.priors.logvar.raw.clone()]
    return out + [s.raw.clone() for dec in d3.decoders for s in dec.weights.values()]


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    d3 = _file(args.mb)
    flat = {"priors.mean": d3.priors.mean.raw, "priors.logvar": d3.priors.logvar.raw}
    for i, dec in enumerate(d3.decoders):
        flat.update({f"decoder.{i}.{k}": v.raw for k, v in dec.weights.items()})
    with tempfile.TemporaryDirectory() as tmp:
        st_path, raw_path, auto_path = (Path(tmp) / n for n in ("x.safetensors", "raw.d3", "auto.d3"))
        rows = []
        t = _best(lambda: safetensors.torch.save_file(flat, st_path), args.repeat)
        size = st_path.stat().st_size
        base_save = t
        rows.append(("safetensors save_file", t, size))
        t_lazy = _best(lambda: safetensors.torch.load_file(st_path), args.repeat)
        rows.append(("safetensors load_file (lazy mmap)", t_lazy, size))
        t = _best(lambda: {k: v.clone() for k, v in safetensors.torch.load_file(st_path).items()}, args.repeat)
        base_load = t
        rows.append(("safetensors load_file + materialise", t, size))
        for label, path, comp in (("none", raw_path, "none"), ("auto", auto_path, "auto")):
            t = _best(lambda: save(d3, path, compression=comp), args.repeat)
            rows.append((f"d3 save (compression={label})", t, path.stat().st_size))
            t = _best(lambda: load(path), args.repeat)
            rows.append((f"d3 load (compression={label}, CRC + checks)", t, path.stat().st_size))
        t = _best(lambda: _materialise(load(raw_path)), args.repeat)
        rows.append(("d3 load (compression=none) + materialise", t, raw_path.stat().st_size))
        t = _best(lambda: load(raw_path, memory_map=False), args.repeat)
        rows.append(("d3 load (compression=none, memory_map=False)", t, raw_path.stat().st_size))
        back = load(raw_path)
        assert torch.equal(back.decoders[1].weights["block3.weight"].raw, d3.decoders[1].weights["block3.weight"].raw)
    print(f"tensors: {sum(v.numel() * 4 for v in flat.values()) / 1e6:.1f} MB of float32, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"{'operation':48s} {'seconds':>8s} {'file MB':>8s} {'MB/s':>8s} {'x baseline':>10s}")
    for name, t, size in rows:
        base = base_save if "save" in name else base_load
        print(f"{name:48s} {t:8.3f} {size / 1e6:8.1f} {size / 1e6 / t:8.0f} {t / base:10.2f}")
    print("x baseline: time relative to safetensors save_file (saves) or load_file + materialise (loads)")


if __name__ == "__main__":
    main()
