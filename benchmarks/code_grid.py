"""How coarse may stored latent means be? Bits per value and image change, per grid step.

`store_priors` puts I8 latent means whose components share one prior std s on a grid of
`CODE_STEP` x s. For each finished `.d3` file (with one prior std) and each step given in prior
stds, this re-rounds the file's means and prints: bits per value after the writer's zstd, the
std of the rounding error, and the PSNR between the decoder's images of the re-rounded and the
stored means (1,000 components), beside the PSNR that one prior draw (noise of std s) costs. Where
rounding costs far less than a draw, the decoder, trained on such draws, cannot tell.
`--write DIR` also saves each re-rounded file, for `d3codec eval`.

    python benchmarks/code_grid.py cifar10_1ipc.d3 --steps 0.5 1 2 3 [--write out/]
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import replace
from typing import Optional

import torch

from d3codec.decode.decoders import build_decoders
from d3codec.format import _zstd
from d3codec.format.io import LEVEL_LARGE, LEVEL_SMALL, SMALL_SECTION, dumps, load, save
from d3codec.format.types import D3File, Stored


def _psnr(a: torch.Tensor, b: torch.Tensor, value_range: float) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(value_range ** 2 / mse)


def _bits(s: Stored) -> float:
    raw = s.raw.contiguous().view(torch.uint8).numpy().tobytes()
    level = LEVEL_SMALL if len(raw) <= SMALL_SECTION else LEVEL_LARGE  # as the writer picks it
    return 8 * len(_zstd.compress(raw, level)) / s.raw.numel()


def report(path: str, steps: list[float], write: Optional[str], samples: int = 1000) -> None:
    d3: D3File = load(path, memory_map=False)
    p = d3.priors
    logvar = p.logvar.dequantize() if p.logvar is not None else None
    if logvar is None or not bool((logvar == logvar.flatten()[0]).all()) or len(d3.decoders) != 1:
        print(f"{path}: skipped (needs one decoder and one prior std for every component)")
        return
    std = math.exp(0.5 * float(logvar.flatten()[0]))
    x = p.mean.dequantize()
    n, k, d = x.shape
    pick = torch.randperm(n * k, generator=torch.Generator().manual_seed(0))[:samples]
    decoder = build_decoders(d3)[0]
    lo, hi = d3.metadata.value_range
    with torch.no_grad():
        ref = decoder(x.reshape(-1, d)[pick])
        draw = decoder(x.reshape(-1, d)[pick] + std * torch.randn(len(pick), d, generator=torch.Generator().manual_seed(1)))
    name = os.path.basename(path)
    print(f"{name}: K={k}, D={d}, prior std {std:.3g}, means' std {float(x.std()) / std:.2f} prior stds, "
          f"stored {_bits(p.mean):.2f} bits/value; one prior draw: {_psnr(ref, draw, hi - lo):.2f} dB")
    print(f"  {'step (stds)':>11s} {'bits/value':>10s} {'error std (stds)':>16s} {'PSNR vs stored':>14s} {'file bytes':>10s}")
    for step in steps:
        grid = Stored.on_grid(x, step * std)
        with torch.no_grad():
            out = decoder(grid.dequantize().reshape(-1, d)[pick])
        other = d3.replace(priors=replace(p, mean=grid))
        size = len(dumps(other)) if write is None else save(other, os.path.join(write, name.replace(".d3", f"_g{step:g}.d3")))
        print(f"  {step:11g} {_bits(grid):10.2f} {float((grid.dequantize() - x).std()) / std:16.3f} "
              f"{_psnr(ref, out, hi - lo):13.2f}  {size:10,d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="finished .d3 files")
    parser.add_argument("--steps", nargs="+", type=float, default=[0.5, 1.0, 2.0, 3.0], help="grid steps, in prior stds")
    parser.add_argument("--write", default=None, help="folder for the re-rounded files")
    args = parser.parse_args()
    if args.write:
        os.makedirs(args.write, exist_ok=True)
    for path in args.files:
        report(path, args.steps, args.write)


if __name__ == "__main__":
    main()
