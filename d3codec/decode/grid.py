"""Sample grids: one row per class, the component's mean image first, then random draws.

People judge a distilled dataset by looking at it; `d3codec sample FILE -o grid.png` writes this.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from PIL import Image

from d3codec.decode.decoders import OutputSpace, Renderer, check_device
from d3codec.decode.sampling import PriorTensors
from d3codec.errors import ConfigError
from d3codec.format.types import D3File

#: Rows drawn when no classes are given.
DEFAULT_ROWS = 20


def grid_tensor(d3: D3File, n: int = 8, classes: Optional[Sequence[int]] = None, seed: int = 0,
                device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Pixels [rows, 1 + n, C, H, W] in [0, 1]: per class, component 0's mean then `n` random draws
    (components chosen by the mixture weights), all from a generator seeded with `seed`."""
    num = d3.metadata.num_classes
    rows = list(range(min(num, DEFAULT_ROWS))) if classes is None else list(classes)
    if not rows:
        raise ConfigError("no classes to draw; pass --classes with at least one class index")
    bad = [c for c in rows if not 0 <= c < num]
    if bad:
        raise ConfigError(f"class {bad[0]} is out of range: the file has classes 0..{num - 1}; fix --classes")
    if n < 0:
        raise ConfigError(f"the number of samples per class must be >= 0, got {n}")
    device = check_device(device)
    pt = PriorTensors.from_priors(d3.priors, device)
    g = torch.Generator().manual_seed(seed)
    r = len(rows)
    cls = torch.tensor(rows, dtype=torch.int64).repeat_interleave(1 + n)
    u = torch.rand(r * (1 + n), generator=g)
    comps = pt.pick_components(cls, u)
    random = torch.ones(r, 1 + n, dtype=torch.bool)
    random[:, 0] = False
    random = random.flatten()
    comps = torch.where(random, comps, torch.zeros_like(comps))
    eps = torch.randn(r * (1 + n), pt.noise_dim, generator=g)
    z = pt.sample(cls.to(device), comps.to(device), eps.to(device), random.to(device))
    values = Renderer(d3, device)(z, cls.to(device))
    pixels = OutputSpace(d3.metadata, denormalize=True, device=device)(values).clamp(0, 1)
    return pixels.view(r, 1 + n, *pixels.shape[1:]).cpu()


def sample_grid(d3: D3File, n: int = 8, classes: Optional[Sequence[int]] = None, seed: int = 0,
                device: Union[str, torch.device] = "cpu", pad: int = 2, scale: int = 1) -> Image.Image:
    """The grid as a PIL image (grey for 1-channel files, RGB otherwise), `pad` px apart, each
    image magnified `scale` times (nearest neighbour)."""
    if scale < 1 or pad < 0:
        raise ConfigError("scale must be >= 1 and pad >= 0")
    px = grid_tensor(d3, n, classes, seed, device)
    rows, cols, c, h, w = px.shape
    if c not in (1, 3):
        px = px[:, :, :1] if c < 3 else px[:, :, :3]
        c = px.shape[2]
    hs, ws = h * scale, w * scale
    canvas = torch.ones(c, rows * (hs + pad) + pad, cols * (ws + pad) + pad)
    big = px.repeat_interleave(scale, dim=3).repeat_interleave(scale, dim=4)
    for i in range(rows):  # rows x cols pastes of whole images, not pixels
        for j in range(cols):
            y, x = pad + i * (hs + pad), pad + j * (ws + pad)
            canvas[:, y:y + hs, x:x + ws] = big[i, j]
    arr = (canvas * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr[:, :, 0], mode="L") if c == 1 else Image.fromarray(arr, mode="RGB")


def save_png(image: Image.Image, path: str) -> None:
    """Write `image` as PNG atomically (temp file in the same folder, then `os.replace`)."""
    import os
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"cannot write {path}: folder {folder} does not exist; create it or choose another -o")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
