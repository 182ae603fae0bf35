"""Inference-time fast path for `UpsamplingDecoder`: its affine stem as block-structured matmuls.

The stem (optional Linear, reshape to h x 2 x 2, first ConvTranspose) is linear in z plus a bias.
On the 2x2 map CPU transposed convolution runs at about a quarter of the GEMM rate (large,
1024 -> 512, batch 256, 1 thread: 220 ms vs 49 ms as matmuls), so `fast_decoder` swaps it for
matmuls built once at load. Each output pixel reads a fixed subset of the 4 input pixels (k3: 1, 2
or 4 of them), so of the 64 (input pixel, output pixel) blocks of the dense matrix only 25 (k3) /
36 (k4) are non-zero. Two tilings of those blocks into GEMMs `[B, n_in Cin] @ [n_in Cin, n_out Cout]`
that read windows of the input and write slices of the NHWC output in place:

- "pixels": per output row, one GEMM per run of columns that read the same pixels: only the
  non-zero blocks (12 GEMMs for k3), the fewest flops.
- "rows": one GEMM per run of output rows that read the same input rows, zero blocks inside a row
  kept (3 GEMMs, 40 blocks for k3): fewer, larger GEMMs, which split better over threads and lose
  less when the cores are oversubscribed.

The tiling follows the shapes only (`PIXELS_MIN_ENTRIES`), never the thread count, so a process
and its one-thread DataLoader workers decode with the same GEMMs (the two tilings differ in the
last bits). Wide layers get "pixels": its smallest GEMM is then large enough to split over threads
(the paper's large, 1024 -> 512, batch 256 on the shared 2-core sandbox: 146 ms vs 266 for "rows"
at 1 thread, 194 vs 236 at 2); narrower ones "rows" (512 -> 256: 61 vs 73 ms at 1 thread, but
171 vs 96 at 2, where 12 small parallel regions each cost a scheduler slice).

When the stem has a Linear and composing it is cheaper (`small`: z of 64), Linear and conv become
one dense `[B, z] @ [z, 16 Cout]` matmul ("fused"). Matrices are the stored weights rearranged
(composed in float64 when fused), so images equal the module's within float rounding.
Size rule: only the 2x2 input map (at 4x4 the non-zero blocks are 121 of 256 and the matmuls no
longer pay: 96 -> 76 ms for 512 -> 256, slower for narrower layers) and at most
`MAX_STEM_ELEMENTS` matrix entries (k3: 25 or 40 Cin Cout, 2.8x or 4.4x the conv's weights;
the paper's `large`: 50 or 80 MiB).
"""
from __future__ import annotations

import itertools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from d3codec.models._upsample import UpsamplingDecoder

#: Largest stem matrices (entries, all groups) `fast_decoder` builds: 64 Mi floats = 256 MiB.
MAX_STEM_ELEMENTS = 1 << 26
#: Cin x Cout of the transposed conv from which the stem is tiled by "pixels" (else "rows").
PIXELS_MIN_ENTRIES = 1 << 19
#: The tilings of the 2x2 map (module docstring).
TILINGS = ("pixels", "rows")


#: Raster pixels of the 2x2 map in an order where every single pixel, row, column and the whole map
#: is a window (contiguous run): `u[:, a:a + n]` of the reordered input is then a view.
_SEQUENCE = (0, 1, 3, 2, 0)


class AffineStem(nn.Module):
    """z [B, latent] -> the first block's pre-norm map [B, Cout, S, S] (channels-last strides).

    `kind` "fused": one dense addmm from z. Else ("pixels" or "rows" tiling) the Linear (if any),
    the 2x2 map's pixels reordered once (`_SEQUENCE`), the output filled with the bias once, then
    per piece one in-place addmm from a window of that reordering into the piece's NHWC slice: no
    gathers, no concatenation, no permutation afterwards.
    """

    def __init__(self, kind: str, pre: Optional[nn.Linear], cin: int, cout: int, side: int,
                 pieces: list[tuple[int, int, int, int, int, int]], weights: list[torch.Tensor],
                 bias: torch.Tensor) -> None:
        super().__init__()
        self.kind, self.pre, self.cin, self.cout, self.side = kind, pre, cin, cout, side
        self.pieces = pieces  # (window start, window length, output rows y0:y1, output columns x0:x1)
        self.weights = nn.ParameterList(nn.Parameter(w, requires_grad=False) for w in weights)
        self.register_buffer("bias", bias)  # [S * S * Cout], raster (row, column, channel)
        self.register_buffer("sequence", torch.tensor(_SEQUENCE, dtype=torch.int64))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, s, c = z.shape[0], self.side, self.cout
        if self.kind == "fused":
            return torch.addmm(self.bias, z, self.weights[0]).view(b, s, s, c).permute(0, 3, 1, 2)
        u = self.pre(z) if self.pre is not None else z
        u = u.view(b, self.cin, 4).transpose(1, 2).index_select(1, self.sequence)  # [B, 5, Cin] contiguous
        dtype = torch.promote_types(u.dtype, self.bias.dtype)
        out = self.bias.view(1, s, s, c).expand(b, s, s, c).to(dtype, copy=True)
        for (a, n, y0, y1, x0, x1), w in zip(self.pieces, self.weights):
            out[:, y0:y1, x0:x1].view(b, -1).addmm_(u[:, a:a + n].reshape(b, -1), w)
        return out.permute(0, 3, 1, 2)


class FastDecoder(nn.Module):
    """`UpsamplingDecoder` with its stem as `AffineStem`; the other blocks, head, tanh and crop are
    the module's own (shared, not copied). Same images within float rounding, eval only."""

    def __init__(self, module: nn.Module, stem: AffineStem, channels_last: bool) -> None:
        super().__init__()
        self.module, self.stem, self.channels_last = module, stem, channels_last
        first = module.blocks[0]
        self.first_norm = None if isinstance(first.norm, nn.Identity) else first.norm
        self.slope = float(first.act.negative_slope)
        for name in ("family", "version", "hparams", "channels", "image_size", "latent_dim", "widths"):
            setattr(self, name, getattr(module, name))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        m = self.module
        if z.dim() != 2 or z.shape[1] != m.latent_dim:
            raise ValueError(f"decoder expects latents [B, {m.latent_dim}], got {tuple(z.shape)}")
        h = self.stem(z)
        if self.first_norm is not None:
            h = self.first_norm(h)
        h = F.leaky_relu_(h, self.slope)  # h is this call's own tensor
        if not self.channels_last:
            h = h.contiguous()
        return m.draw_from(h, 1)


def _taps(conv: nn.ConvTranspose2d, side: int) -> tuple[dict[tuple[int, int], tuple[int, int]], int]:
    """Which weight tap links input pixel p to output pixel q of the transposed conv on a side x side
    map: `({(p, q): (ky, kx)}, output side)`, pixels in raster order, (ky, kx) = q - stride p + padding
    per axis; pairs not listed are the zero blocks of the dense matrix."""
    (k, _), (s, _), (pad, _), (opad, _) = conv.kernel_size, conv.stride, conv.padding, conv.output_padding
    out = (side - 1) * s - 2 * pad + k + opad
    taps = {}
    for iy, ix, oy, ox in itertools.product(range(side), range(side), range(out), range(out)):
        ky, kx = oy - s * iy + pad, ox - s * ix + pad
        if 0 <= ky < k and 0 <= kx < k:
            taps[(iy * side + ix, oy * out + ox)] = (ky, kx)
    return taps, out


def _pieces(conv: nn.ConvTranspose2d, tiling: str) -> tuple[list[tuple[int, int, int, int, int, int]], int]:
    """The GEMM pieces `(window start, window length, y0, y1, x0, x1)` of the "pixels" or "rows"
    tiling of the transposed conv on the 2x2 map, and the output side. A piece's output slice is
    one row or whole rows, so it is a 2-D view of the NHWC output."""
    taps, side = _taps(conv, 2)

    def reads(ys: range, xs: range) -> tuple[int, ...]:
        return tuple(sorted({p for p in range(4) for y in ys for x in xs if (p, y * side + x) in taps}))

    pieces = []
    if tiling == "rows":
        for y0, y1 in _runs([reads(range(y, y + 1), range(side)) for y in range(side)]):
            pieces.append((*_window(reads(range(y0, y1), range(side))), y0, y1, 0, side))
    else:
        for y in range(side):
            for x0, x1 in _runs([reads(range(y, y + 1), range(x, x + 1)) for x in range(side)]):
                pieces.append((*_window(reads(range(y, y + 1), range(x0, x1))), y, y + 1, x0, x1))
    return pieces, side


def _plain_conv(module: nn.Module) -> Optional[nn.ConvTranspose2d]:
    """The first block's ConvTranspose2d of an `UpsamplingDecoder` with square settings, or None."""
    if not isinstance(module, UpsamplingDecoder) or len(module.blocks) == 0:
        return None
    conv = module.blocks[0].conv
    if not isinstance(conv, nn.ConvTranspose2d) or conv.groups != 1 or conv.dilation != (1, 1) \
            or any(len(set(v)) != 1 for v in (conv.kernel_size, conv.stride, conv.padding, conv.output_padding)):
        return None
    return conv


def plan_stem(module: nn.Module, tiling: Optional[str] = None) -> Optional[tuple[str, int]]:
    """`(kind, matrix entries)` of the stem `fast_decoder` builds for `module`: "fused", else the
    tiling (`tiling`, default the shape rule: "pixels" from `PIXELS_MIN_ENTRIES` Cin x Cout, else
    "rows"); None where the size rule says no (not an `UpsamplingDecoder` with a plain first
    ConvTranspose, or more than `MAX_STEM_ELEMENTS` entries)."""
    conv = _plain_conv(module)
    if conv is None:
        return None
    if tiling is None:
        tiling = "pixels" if conv.in_channels * conv.out_channels >= PIXELS_MIN_ENTRIES else "rows"
    elif tiling not in TILINGS:
        raise ValueError(f"tiling must be one of {', '.join(TILINGS)}, not {tiling!r}")
    pieces, side = _pieces(conv, tiling)
    cin, cout = conv.in_channels, conv.out_channels
    grouped = sum(n * cin * (y1 - y0) * (x1 - x0) * cout for _, n, y0, y1, x0, x1 in pieces)
    fc = module.fc
    if fc is not None:
        fused = fc.in_features * side * side * cout
        if fused <= grouped + fc.in_features * fc.out_features:  # multiply-adds per sample
            return ("fused", fused) if fused <= MAX_STEM_ELEMENTS else None
    return (tiling, grouped) if grouped <= MAX_STEM_ELEMENTS else None


@torch.no_grad()
def build_stem(module: nn.Module, tiling: Optional[str] = None) -> Optional[AffineStem]:
    """The `AffineStem` of an eval-mode `UpsamplingDecoder` (see `plan_stem`), or None."""
    plan = plan_stem(module, tiling)
    if plan is None:
        return None
    kind = plan[0]
    conv = module.blocks[0].conv
    device, dtype = conv.weight.device, conv.weight.dtype
    cin, cout = conv.in_channels, conv.out_channels
    taps, side = _taps(conv, 2)
    w = conv.weight.detach().double()  # [Cin, Cout, k, k]
    bias = conv.bias.detach().double().repeat(side * side) if conv.bias is not None \
        else torch.zeros(side * side * cout, dtype=torch.float64, device=device)
    fc = module.fc
    if kind == "fused":
        # z -> fc -> [Cin, 2, 2] -> conv: W[z, (q, co)] = sum_{ci, p} fcW[(ci, p), z] w[ci, co, tap(p, q)]
        fw = fc.weight.detach().double().view(cin, 4, -1)  # [Cin, P, z]
        fb = fc.bias.detach().double().view(cin, 4)
        weight = torch.zeros(fw.shape[2], side * side, cout, dtype=torch.float64, device=device)
        bias = bias.view(side * side, cout).clone()
        for (p, q), (ky, kx) in taps.items():
            weight[:, q] += fw[:, p].T @ w[:, :, ky, kx]
            bias[q] += fb[:, p] @ w[:, :, ky, kx]
        pieces, weights, bias = [], [weight.reshape(fw.shape[2], -1)], bias.reshape(-1)
    else:
        pieces, _ = _pieces(conv, kind)
        weights = []
        zero = torch.zeros(cin, cout, dtype=torch.float64, device=device)
        for a, n, y0, y1, x0, x1 in pieces:
            # rows (input pixel in window order, Cin), columns (output row, output column, Cout)
            cols = [y * side + x for y in range(y0, y1) for x in range(x0, x1)]
            weights.append(torch.cat([torch.cat([w[:, :, taps[(p, q)][0], taps[(p, q)][1]] if (p, q) in taps else zero
                                                 for q in cols], 1) for p in _SEQUENCE[a:a + n]], 0))
    weights = [m.to(device, dtype).contiguous() for m in weights]
    return AffineStem(kind, fc if kind != "fused" else None, cin, cout, side, pieces, weights,
                      bias.to(device, dtype)).to(device).eval()


def _runs(reads: list[tuple[int, ...]]) -> list[tuple[int, int]]:
    """Maximal runs [x0, x1) of equal consecutive entries."""
    runs, x0 = [], 0
    for x in range(1, len(reads) + 1):
        if x == len(reads) or reads[x] != reads[x0]:
            runs.append((x0, x))
            x0 = x
    return runs


def _window(pixels: tuple[int, ...]) -> tuple[int, int]:
    """(start, length) of the window of `_SEQUENCE` holding exactly `pixels`."""
    n = len(pixels)
    for a in range(len(_SEQUENCE) - n + 1):
        if sorted(_SEQUENCE[a:a + n]) == sorted(pixels):
            return a, n
    raise AssertionError(f"no window of {_SEQUENCE} holds pixels {pixels}")  # pragma: no cover - 2x2 maps


def fast_decoder(module: nn.Module, channels_last: bool = True, tiling: Optional[str] = None) -> nn.Module:
    """`module` with its stem as matmuls (`FastDecoder`), tiled by `tiling` (default: from the
    shapes, see `plan_stem`), or `module` itself where the size rule says no (module docstring).
    For inference only: the stem's matrices are copies of the weights taken here."""
    if module.training:
        return module
    stem = build_stem(module, tiling)
    return module if stem is None else FastDecoder(module, stem, channels_last).eval()
