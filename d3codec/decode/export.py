"""Export: a file's images as a fixed set, for evaluators and training code that take a folder or a
tensor instead of a generator (`d3codec export`).

Per class, image j < K is component j's mean image; images K .. N-1 are seeded random draws (the
component by the mixture weights, then a latent from its Gaussian). Draw r of class c depends only
on (seed, c, r // 1024) and its place in that block, never on the batch size or the other classes.
Images are decoded `batch_size` at a time, so decoding memory is bounded by one batch.

Formats (everything lands in a new folder, staged beside it and renamed into place when complete):

- `imagefolder`: `DIR/<class>/<j>.png` (uint8 PNG, pixels p in [0, 1] stored as round(255 p)) and
  `DIR/labels.pt`. Class folders sort in class order (`torchvision.datasets.ImageFolder` gives
  folder i class id i: names that would sort otherwise get a zero-padded class-id prefix) and file
  names sort in image order, so ImageFolder's sample order is the row order of `labels.pt`.
- `pt`: `DIR/images.pt`, one torch file whose `images` are float32 pixels in [0, 1], [M, C, H, W].

Both hold `labels` (soft files: [M, N] float32 probabilities; hard files: [M] int64 class ids),
`targets` ([M] int64 class ids), `components`, `is_mean`, `class_names`, `mean` and `std` (the
file's normalisation: `(p - mean) / std` is what `D3Dataset` trains on); `imagefolder`'s also has
`paths` (relative to DIR, one per row). `DIR/export.json` records what was exported and how.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Iterator, Optional, Union

import numpy as np
import torch
from PIL import Image

from d3codec._seed import derive_seed
from d3codec._version import __version__
from d3codec.decode.decoders import LabelTable, OutputSpace, Renderer, check_device
from d3codec.decode.sampling import PriorTensors
from d3codec.errors import ConfigError
from d3codec.format.atomic import atomic_folder
from d3codec.format.types import D3File

FORMATS = ("imagefolder", "pt")
#: Random draws per noise block of a class (one generator seed each).
DRAW_BLOCK = 1024
MANIFEST = "export.json"


@dataclass
class ExportResult:
    """What `export` wrote."""

    path: str
    format: str
    images: int
    per_class: int
    mean_images_per_class: int
    num_classes: int
    labels: str  # "soft" or "hard"
    device: str
    seed: int


def class_folders(names: list[str]) -> list[str]:
    """Folder names for the classes: the names made path-safe, each prefixed with its zero-padded
    class id when the names would otherwise repeat (also ignoring case) or sort out of class order."""
    safe = []
    for c, name in enumerate(names):
        s = re.sub(r"[\\/\x00-\x1f:*?\"<>|]", "_", str(name)).strip()
        safe.append(s if s and s not in (".", "..") else str(c))
    unique = len({s.casefold() for s in safe}) == len(safe)
    if unique and sorted(safe) == safe:
        return safe
    width = len(str(len(names) - 1))
    return [f"{c:0{width}d}_{s}" for c, s in enumerate(safe)]


def check_destination(out_dir: str, overwrite: bool, inputs: tuple[str, ...] = ()) -> None:
    """Refuse a destination that would lose data, before any decoding: a file, a non-empty folder
    (unless `overwrite` and an earlier export wrote it), a missing parent, or one holding an input."""
    path = os.path.abspath(out_dir)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ConfigError(f"cannot write {out_dir}: folder {parent} does not exist; create it or choose another -o")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{out_dir} is a file, not a folder; choose a new folder for -o")
    if os.path.isdir(path) and os.listdir(path):
        if not overwrite:
            raise ConfigError(f"{out_dir} is not empty; choose a new or empty folder, or pass --overwrite to "
                              "replace an earlier export")
        if not os.path.isfile(os.path.join(path, MANIFEST)):
            raise ConfigError(f"{out_dir} was not written by d3codec export (no {MANIFEST}); refusing to replace it: "
                              "choose a new or empty folder")
        for source in inputs:
            if os.path.abspath(source).startswith(path + os.sep):
                raise ConfigError(f"{source} lies inside {out_dir}; --overwrite would delete it: export elsewhere")


class _Draws:
    """Classes, components, mean-or-draw flags and latents of export positions, class-major."""

    def __init__(self, pt: PriorTensors, per_class: int, seed: int, device: torch.device) -> None:
        self.pt, self.per_class, self.seed, self.device = pt, per_class, seed, device
        self.k = pt.latents_per_class
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _noise(self, c: int, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Uniforms [r1 - r0] and normals [r1 - r0, noise_dim] of draws r0..r1-1 of class c (CPU generators)."""
        us, eps = [], []
        for b in range(r0 // DRAW_BLOCK, (r1 - 1) // DRAW_BLOCK + 1):
            if (c, b) not in self._cache:
                if len(self._cache) >= 4:
                    self._cache.pop(next(iter(self._cache)))
                g = torch.Generator().manual_seed(derive_seed(self.seed, "export", c, b))
                self._cache[(c, b)] = (torch.rand(DRAW_BLOCK, generator=g),
                                       torch.randn(DRAW_BLOCK, self.pt.noise_dim, generator=g))
            u, e = self._cache[(c, b)]
            lo, hi = max(r0, b * DRAW_BLOCK) - b * DRAW_BLOCK, min(r1, (b + 1) * DRAW_BLOCK) - b * DRAW_BLOCK
            us.append(u[lo:hi])
            eps.append(e[lo:hi])
        return torch.cat(us), torch.cat(eps)

    def __call__(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        classes, comps, random, eps = [], [], [], []
        i = start
        while i < stop:  # one segment per class the range touches
            c, j0 = divmod(i, self.per_class)
            j1 = min(self.per_class, j0 + stop - i)
            means = range(j0, min(j1, self.k))
            if len(means):
                classes.append(torch.full((len(means),), c, dtype=torch.int64))
                comps.append(torch.arange(means.start, means.stop, dtype=torch.int64))
                random.append(torch.zeros(len(means), dtype=torch.bool))
                eps.append(torch.zeros(len(means), self.pt.noise_dim))
            r0, r1 = max(j0, self.k) - self.k, j1 - self.k
            if r1 > r0:
                u, e = self._noise(c, r0, r1)
                cls = torch.full((r1 - r0,), c, dtype=torch.int64)
                classes.append(cls)
                comps.append(self.pt.pick_components(cls.to(self.device), u.to(self.device)).cpu())
                random.append(torch.ones(r1 - r0, dtype=torch.bool))
                eps.append(e)
            i += j1 - j0
        dev = self.device
        cls, cmp, rnd = torch.cat(classes).to(dev), torch.cat(comps).to(dev), torch.cat(random).to(dev)
        z = self.pt.sample(cls, cmp, torch.cat(eps).to(dev), rnd)
        return cls, cmp, rnd, z


def decoded_batches(d3: D3File, per_class: int, *, seed: int = 0, device: Union[str, torch.device] = "auto",
                    batch_size: int = 256) -> Iterator[dict[str, torch.Tensor]]:
    """The export's images in order (class-major), `batch_size` at a time, on the CPU: dicts of
    `pixels` [B, C, H, W] float32 in [0, 1], `labels`, `targets`, `components`, `is_mean`."""
    dev = check_device(device)
    pt = PriorTensors.from_priors(d3.priors, dev)
    n = pt.num_classes
    draws = _Draws(pt, per_class, seed, dev)
    render = Renderer(d3, dev)
    output = OutputSpace(d3.metadata, denormalize=True, device=dev)
    table = LabelTable(d3.labels, n, dev)
    total = n * per_class
    for start in range(0, total, batch_size):
        stop = min(total, start + batch_size)
        cls, cmp, rnd, z = draws(start, stop)
        pixels = output(render(z, cls)).clamp_(0, 1)
        yield {"pixels": pixels.cpu(), "labels": table.lookup(cls, cmp).cpu(), "targets": cls.cpu(),
               "components": cmp.cpu(), "is_mean": (~rnd).cpu()}


def _to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [0, 1] -> [B, H, W, C] uint8, round(255 p)."""
    return (pixels * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def export(d3: D3File, out_dir: str, per_class: int, fmt: str = "imagefolder", *, seed: int = 0,
           device: Union[str, torch.device] = "auto", batch_size: int = 256, overwrite: bool = False,
           source: Optional[str] = None) -> ExportResult:
    """Write `per_class` images per class of `d3` to the new folder `out_dir` (see the module docstring).

    `overwrite` replaces a folder an earlier export wrote (it holds export.json); any other
    non-empty folder is refused. `source` is the input's path (recorded, and never deleted).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ConfigError(f"images per class must be a positive integer, got {per_class!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    meta = d3.metadata
    c, h, w = meta.image_shape
    if fmt == "imagefolder" and c not in (1, 3):
        raise ConfigError(f"PNG holds 1 or 3 channels, these images have {c}; use --format pt")
    dev = check_device(device)
    check_destination(out_dir, overwrite, (source,) if source else ())
    n = meta.num_classes
    total = n * per_class
    k = d3.priors.latents_per_class
    soft = d3.labels.kind == "soft"
    folders = class_folders(list(meta.class_names)) if fmt == "imagefolder" else []
    width = len(str(per_class - 1))
    path = os.path.abspath(out_dir)
    with atomic_folder(path, replace=True) as stage:  # check_destination allowed replacing it
        images = torch.empty(total, c, h, w, dtype=torch.float32) if fmt == "pt" else None
        labels = torch.empty((total, n) if soft else (total,), dtype=torch.float32 if soft else torch.int64)
        targets = torch.empty(total, dtype=torch.int64)
        comps = torch.empty(total, dtype=torch.int64)
        is_mean = torch.empty(total, dtype=torch.bool)
        for folder in folders:
            os.mkdir(os.path.join(stage, folder))
        paths = [f"{folders[i // per_class]}/{i % per_class:0{width}d}.png" for i in range(total)] if folders else []
        start = 0
        for batch in decoded_batches(d3, per_class, seed=seed, device=dev, batch_size=batch_size):
            stop = start + batch["pixels"].shape[0]
            labels[start:stop], targets[start:stop] = batch["labels"], batch["targets"]
            comps[start:stop], is_mean[start:stop] = batch["components"], batch["is_mean"]
            if images is not None:
                images[start:stop] = batch["pixels"]
            else:
                for i, arr in zip(range(start, stop), _to_uint8(batch["pixels"])):
                    img = Image.fromarray(arr[:, :, 0], mode="L") if c == 1 else Image.fromarray(arr, mode="RGB")
                    img.save(os.path.join(stage, paths[i]), format="PNG")
            start = stop
        record = {"labels": labels, "targets": targets, "components": comps, "is_mean": is_mean,
                  "soft": soft, "class_names": list(meta.class_names), "mean": list(meta.mean), "std": list(meta.std)}
        if images is not None:
            torch.save({"images": images, **record}, os.path.join(stage, "images.pt"))
        else:
            torch.save({"paths": paths, "folders": folders, **record}, os.path.join(stage, "labels.pt"))
        result = ExportResult(path=out_dir, format=fmt, images=total, per_class=per_class,
                              mean_images_per_class=min(per_class, k), num_classes=n,
                              labels="soft" if soft else "hard", device=str(dev), seed=seed)
        manifest = {**asdict(result), "d3codec": __version__, "source": source, "dataset": meta.name,
                    "image_shape": [c, h, w],
                    "pixels": "uint8 PNG, round(255 p)" if fmt == "imagefolder" else "float32 in [0, 1]",
                    "order": "class-major; per class the mean images of components 0.. first, then seeded draws"}
        with open(os.path.join(stage, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
    return result

