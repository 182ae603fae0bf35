"""The network shared by the decoder families: an optional Linear, ConvTranspose blocks, Conv head, tanh.

Each family file (`small.py`, `medium.py`, `large.py`) only chooses block widths and kernels
from its hyper-parameters. State-dict keys are part of the file format and must never change
for a registered (family, version): `fc.*`, `blocks.<i>.conv.*`, `blocks.<i>.norm.*`, `out.*`.

Resolution: the first feature map is 2x2 and every block doubles it, so the network natively
draws the next power of two >= `image_size` (at least 4); other sizes (28 for MNIST) are the
centre crop of that (28: the central 28x28 of 32x32). Cropping is per sample and exact.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

#: Smallest and largest `image_size` a decoder draws.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 4, 1024
#: `norm` hyper-parameter values: BatchNorm with stored running statistics (used in eval), per-sample
#: instance norm (GroupNorm, one group per channel), or none (conv bias only, e.g. after folding BN).
NORMS = ("batch", "instance", "none")


def native_size(image_size: int) -> int:
    """The power of two >= image_size (at least 4) the blocks draw before centre cropping."""
    size = 4
    while size < image_size:
        size *= 2
    return size


def num_blocks(image_size: int) -> int:
    """Upsampling blocks from the 2x2 map to `native_size(image_size)`."""
    return native_size(image_size).bit_length() - 2


class Block(nn.Module):
    """ConvTranspose (doubles the side) -> norm -> LeakyReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, norm: str, slope: float) -> None:
        super().__init__()
        if kernel == 4:
            self.conv = nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1)
        elif kernel == 3:
            self.conv = nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1)
        else:  # pragma: no cover - builders pass 3 or 4
            raise ValueError(f"kernel must be 3 or 4, got {kernel}")
        if norm == "batch":
            self.norm: nn.Module = nn.BatchNorm2d(cout)
        elif norm == "instance":
            self.norm = nn.GroupNorm(cout, cout, affine=True)
        else:
            self.norm = nn.Identity()
        self.act = nn.LeakyReLU(slope, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class UpsamplingDecoder(nn.Module):
    """z [B, latent_dim] -> images [B, channels, image_size, image_size] in [-1, 1] (tanh).

    `widths[i] -> widths[i + 1]` are the blocks' channels (len(widths) - 1 blocks); with
    `use_fc` a Linear maps z to widths[0] x 2 x 2, else z must have 4 * widths[0] dimensions
    and is reshaped. `family`, `version` and the resolved `hparams` are kept on the module.
    In `eval()` every sample depends only on its own latent (norm is per sample or frozen).
    """

    def __init__(self, *, family: str, version: int, hparams: dict[str, Any], channels: int, image_size: int,
                 latent_dim: int, widths: Sequence[int], kernel: int, use_fc: bool, norm: str, slope: float) -> None:
        super().__init__()
        self.family, self.version, self.hparams = family, version, dict(hparams)
        self.channels, self.image_size, self.latent_dim = channels, image_size, latent_dim
        self.widths = tuple(widths)
        self.fc = nn.Linear(latent_dim, 4 * widths[0]) if use_fc else None
        self.blocks = nn.ModuleList(Block(a, b, kernel, norm, slope) for a, b in zip(widths[:-1], widths[1:]))
        self.out = nn.Conv2d(widths[-1], channels, 3, padding=1)
        self.native = 2 * 2 ** len(self.blocks)
        self._crop = (self.native - image_size) // 2

    def extra_repr(self) -> str:
        return f"family={self.family!r}, version={self.version}, image_size={self.image_size}, widths={self.widths}"

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"decoder expects latents [B, {self.latent_dim}], got {tuple(z.shape)}")
        h = self.fc(z) if self.fc is not None else z
        return self.draw_from(h.view(z.shape[0], self.widths[0], 2, 2), 0)

    def draw_from(self, h: torch.Tensor, block: int) -> torch.Tensor:
        """The network from the input of block `block` on: the rest of the blocks, the Conv head,
        tanh and the centre crop (decoders that compute the first blocks another way share it)."""
        for b in self.blocks[block:]:
            h = b(h)
        x = torch.tanh(self.out(h))
        if self._crop:
            c = self._crop
            x = x[:, :, c:c + self.image_size, c:c + self.image_size]
        return x
