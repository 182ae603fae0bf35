"""How sharply does a decoder draw K real images per class? PSNR of the encoder's fit, per configuration.

The fit (`encode`'s step 3) teaches one decoder and one latent code per image to draw K real
images of every class; its sharpness bounds what a file can show a student. This script runs
that fit alone (same recipe: PCA-started codes at std 0.3, Gaussian noise on the codes, Adam with
a cosine-decayed rate, 3x on the codes, MSE in normalised space) for each decoder/latent
configuration, then reports the PSNR of the noise-free decodes over all K x classes images, and
seconds per step. Fewer steps than a real encode, so compare configurations within one run.
Beside each, `linear PSNR` is what a linear code of the same D gives (the images' own top-D
principal components, float, no training): the bar a nonlinear decoder has to clear. `--steps 0`
gives that bar alone, in seconds.

    python benchmarks/fit_sharpness.py cifar10 --data-dir DIR --per-class 500 --steps 600 \\
        --config width=256,d=32 --config width=256,d=64 --config width=224,d=128
    python benchmarks/fit_sharpness.py digits --per-class 100 --steps 300 --config width=16,d=8

A config is comma-separated key=value: `width`, `d` (latent dim), and optionally `family`
(small), `min_width`, `noise` (0.1), `lr` (3e-3). One JSON line per config with `--json`.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def _config(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {"family": "small", "noise": 0.1, "lr": 3e-3, "min_width": None}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in ("width", "d", "family", "min_width", "noise", "lr"):
            raise SystemExit(f"error: unknown config key {key!r} in {text!r}")
        out[key] = value if key == "family" else (float(value) if key in ("noise", "lr") else int(value))
    if "width" not in out or "d" not in out:
        raise SystemExit(f"error: config {text!r} needs width= and d=")
    return out


@dataclass
class Basis:
    """The images in the normalised space and their principal components, shared by every config."""

    mean: torch.Tensor
    std: torch.Tensor
    x: torch.Tensor        # [N, C, H, W], normalised
    centred: torch.Tensor  # [N, pixels], float64, less their mean
    centre: torch.Tensor   # [pixels]
    axes: torch.Tensor     # [pixels, <= D] principal axes, columns (the encoder's `principal_axes`)


def basis_of(images: torch.Tensor, d: int) -> Basis:
    """Normalise `images` ([N, C, H, W] in [0, 1]) and take the top-`d` principal axes of at most
    4,096 of them, evenly spaced as the encoder's basis."""
    from d3codec.distill.pca import basis_rows, principal_axes

    mean, std = images.mean((0, 2, 3), keepdim=True), images.std((0, 2, 3), keepdim=True)
    x = (images - mean) / std
    flat = x.flatten(1).double()
    centre = flat.mean(0)
    centred = flat - centre
    return Basis(mean, std, x, centred, centre, principal_axes(centred[basis_rows(len(flat))], d))


def run(images: torch.Tensor, basis: Basis, cfg: dict[str, Any], steps: int, batch: int, seed: int) -> dict[str, Any]:
    """Fit one decoder and one code per image of `images` ([N, C, H, W] in [0, 1]); PSNR and timing."""
    from d3codec.models.registry import build_decoder

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n, c, h, _ = images.shape
    mean, std, x, centre = basis.mean, basis.std, basis.x, basis.centre
    axes = basis.axes[:, :cfg["d"]]
    codes = torch.zeros(n, cfg["d"], dtype=torch.float64)
    proj = basis.centred @ axes
    codes[:, :proj.shape[1]] = proj / proj.std(0).clamp_min(1e-12)
    linear = (proj @ axes.T + centre).float().view_as(x) * std + mean
    linear_err = float((linear.clamp(0, 1) - images).pow(2).mean())
    hp = {"channels": c, "image_size": h, "latent_dim": cfg["d"], "width": cfg["width"], "norm": "batch"}
    if cfg["min_width"]:
        hp["min_width"] = cfg["min_width"]
    decoder = build_decoder(cfg["family"], 1, hp)
    latents = torch.nn.Parameter((0.3 * codes).float())
    opt = torch.optim.Adam([{"params": decoder.parameters()}, {"params": [latents]}], lr=cfg["lr"])

    def draw(z: torch.Tensor) -> torch.Tensor:  # tanh range -> normalised space, as the encoder does
        return ((decoder(z) + 1) / 2 - mean) / std

    t0 = time.perf_counter()
    for it in range(steps):
        lr = cfg["lr"] * 0.5 * (1 + math.cos(math.pi * it / steps))
        opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = lr, 3 * lr
        pick = torch.randperm(n, generator=g)[:batch]
        z = latents[pick] + cfg["noise"] * torch.randn(len(pick), cfg["d"], generator=g)
        loss = (draw(z) - x[pick]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    decoder.eval()
    with torch.no_grad():
        err = sum(float(((draw(latents[s:s + 500]) * std + mean).clamp(0, 1) - images[s:s + 500]).pow(2).sum())
                  for s in range(0, n, 500)) / images.numel()
    return {**cfg, "params": sum(p.numel() for p in decoder.parameters()), "images": n, "steps": steps,
            "s_per_step": seconds / max(1, steps), "psnr_db": -10 * math.log10(max(err, 1e-12)),
            "linear_psnr_db": -10 * math.log10(max(linear_err, 1e-12))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset", help="a dataset name or path, as for `d3codec encode`")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--per-class", type=int, default=500, help="real images per class to draw (K)")
    parser.add_argument("--steps", type=int, default=600, help="fit steps (0: only the linear PSNR is meaningful)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--config", action="append", required=True, help="width=W,d=D[,family=..,min_width=..]")
    parser.add_argument("--json", action="store_true", help="one JSON line per config")
    args = parser.parse_args()
    configs = [_config(c) for c in args.config]

    from d3codec.data import open_dataset

    torch.set_num_threads(args.threads)
    ds = open_dataset(args.dataset, data_dir=args.data_dir, progress=False)
    g = torch.Generator().manual_seed(args.seed)
    rows = np.concatenate([ds.indices_of_class(c)[torch.randperm(len(ds.indices_of_class(c)), generator=g)
                                                  [:args.per_class].numpy()] for c in range(ds.num_classes)])
    images = torch.from_numpy(ds.uint8(rows)).permute(0, 3, 1, 2).float() / 255.0
    if not args.json:
        print(f"{ds.name}: {len(rows)} images ({args.per_class} per class), {args.steps} fit steps of {args.batch}")
        print(f"{'config':<36} {'params':>9} {'s/step':>7} {'PSNR dB':>8} {'linear PSNR dB':>15}")
    basis = basis_of(images, max(cfg["d"] for cfg in configs))
    for cfg in configs:
        res = run(images, basis, cfg, args.steps, args.batch, args.seed)
        if args.json:
            print(json.dumps(res), flush=True)
        else:
            name = ",".join(f"{k}={v}" for k, v in cfg.items() if v is not None and k in ("family", "width", "d", "min_width"))
            print(f"{name:<36} {res['params']:>9,} {res['s_per_step']:>7.3f} {res['psnr_db']:>8.2f} {res['linear_psnr_db']:>15.2f}", flush=True)


if __name__ == "__main__":
    main()
