"""Sample grids: one row per class, the component's mean image first, then random draws.

People judge a distilled dataset by looking at it; `d3codec sample FILE -o grid.png` writes this.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
from PIL import Image

from d3codec.decode.decoders import OutputSpace, Renderer, check_device
from d3codec.decode.sampling import PriorTensors
from d3codec.errors import ConfigError
from d3codec.format.atomic import TempFileError, atomic_file
from d3codec.format.types import D3File

#: Rows drawn when no classes are given.
DEFAULT_ROWS = 20
#: Largest grid written, in pixels (a 7,000 x 7,000 px picture; its float canvas is under 600 MB).
MAX_GRID_PIXELS = 49_000_000
#: Images decoded per decoder call while drawing a grid.
_CHUNK = 1024
#: Image formats `save_image` writes, by file suffix.
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
           ".tiff": "TIFF"}


def grid_size(d3: D3File, n: int, classes: Optional[Sequence[int]] = None, pad: int = 2,
              scale: int = 1) -> tuple[int, int]:
    """(width, height) in pixels of the grid `sample_grid` draws with these settings."""
    _, h, w = d3.metadata.image_shape
    rows = min(d3.metadata.num_classes, DEFAULT_ROWS) if classes is None else len(classes)
    return (1 + n) * (w * scale + pad) + pad, rows * (h * scale + pad) + pad


def check_grid_size(d3: D3File, n: int, classes: Optional[Sequence[int]] = None, pad: int = 2,
                    scale: int = 1) -> None:
    """Refuse a grid over `MAX_GRID_PIXELS` before anything is decoded."""
    width, height = grid_size(d3, n, classes, pad, scale)
    if width * height > MAX_GRID_PIXELS:
        raise ConfigError(f"the grid would be {width:,} x {height:,} px, over the {MAX_GRID_PIXELS // 1_000_000} "
                          "megapixel limit; lower -n, --scale or the number of --classes")


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
    render, space = Renderer(d3, device), OutputSpace(d3.metadata, denormalize=True, device=device)
    chunks = []
    for s in range(0, len(cls), _CHUNK):  # bounded memory, whatever n is
        part = slice(s, s + _CHUNK)
        c = cls[part].to(device)
        z = pt.sample(c, comps[part].to(device), eps[part].to(device), random[part].to(device))
        chunks.append(space(render(z, c)).clamp(0, 1).cpu())
    pixels = torch.cat(chunks)
    return pixels.view(r, 1 + n, *pixels.shape[1:])


def sample_grid(d3: D3File, n: int = 8, classes: Optional[Sequence[int]] = None, seed: int = 0,
                device: Union[str, torch.device] = "cpu", pad: int = 2, scale: int = 1) -> Image.Image:
    """The grid as a PIL image (grey for 1-channel files, RGB otherwise), `pad` px apart, each
    image magnified `scale` times (nearest neighbour)."""
    if scale < 1 or pad < 0:
        raise ConfigError("scale must be >= 1 and pad >= 0")
    check_grid_size(d3, n, classes, pad, scale)
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


def image_format(path: str) -> str:
    """The PIL format `save_image` writes for `path`, from its suffix; `ConfigError` for others."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FORMATS:
        raise ConfigError(f"cannot tell which image format to write from {path!r}; end -o with "
                          f"{', '.join(sorted(FORMATS))}")
    return FORMATS[suffix]


def save_image(image: Image.Image, path: str) -> None:
    """Write `image` atomically (`d3codec.format.atomic`) in the format its suffix names
    (`image_format`); an unwritable place raises `ConfigError`."""
    fmt = image_format(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"cannot write {path}: folder {folder} does not exist; create it or choose another -o")
    if os.path.isdir(path):
        raise ConfigError(f"cannot write {path}: it is a folder; give a file path such as "
                          f"{os.path.join(path, 'grid.png')}")
    try:
        with atomic_file(path, suffix=os.path.splitext(path)[1]) as f:
            image.save(f, format=fmt)
    except TempFileError as exc:
        raise ConfigError(f"cannot write to folder {folder} ({exc.strerror or exc}); "
                          "choose a writable -o path") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {path} ({exc.strerror or exc}); choose another -o path") from None


def save_png(image: Image.Image, path: str) -> None:
    """Write `image` as PNG atomically; `path` must end in .png (see `save_image` for other formats)."""
    if image_format(path) != "PNG":
        raise ConfigError(f"save_png writes PNG files; name {path!r} .png, or use save_image")
    save_image(image, path)
