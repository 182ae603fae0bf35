"""Inference-time fast path for `UpsamplingDecoder`: its affine stem as block-structured matmuls.

The stem (optional Linear, reshape to h x 2 x 2, first ConvTranspose) is linear in z plus a bias.
On the 2x2 map CPU transposed convolution runs at about a quarter of the GEMM rate (large,
1024 -> 512, batch 256, 1 thread: 220 ms vs 49 ms as matmuls), so `fast_decoder` swaps it for
matmuls built once at load. Each output pixel reads a fixed subset of the 4 input pixels (k3: 1, 2
or 4 of them); output pixels that read the same subset form a group and each group is one GEMM
`[B, n_in * Cin] @ [n_in * Cin, n_out * Cout]`, so only the 25 (k3) / 36 (k4) non-zero
(input pixel, output pixel) weight blocks are multiplied and stored, never the zeros of the
dense 64-block matrix. When the stem has a Linear and composing it is cheaper (`small`: z of 64),
Linear and conv become one dense `[B, z] @ [z, 16 Cout]` matmul. Matrices are the stored weights
rearranged (composed in float64 when fused), so images equal the module's within float rounding.
Size rule: only a 2x2 input map (at 4x4 the blocks are 121 of 256 and the matmuls no longer pay:
measured 96 vs 76 ms for 512 -> 256 but slower for narrower layers) and at most `MAX_STEM_ELEMENTS`
matrix entries (2.8x the first conv's weights for k3; 50 MiB for the paper's `large`).
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


#: Raster pixels of the 2x2 map in an order where every single pixel, row, column and the whole map
#: is a window (contiguous run): `u[:, a:a + n]` of the reordered input is then a view.
_SEQUENCE = (0, 1, 3, 2, 0)


class AffineStem(nn.Module):
    """z [B, latent] -> the first block's pre-norm map [B, Cout, S, S] (channels-last strides).

    `kind` "fused": one dense addmm from z. `kind` "grouped": the Linear (if any), the 2x2 map's
    pixels reordered once (`_SEQUENCE`), then one addmm per (output row, run of output columns that
    read the same input pixels), each reading a window of that reordering and writing its slice of
    the NHWC output in place: no gathers, no concatenation, no permutation afterwards.
    """

    def __init__(self, kind: str, pre: Optional[nn.Linear], cin: int, cout: int, side: int,
                 pieces: list[tuple[int, int, int, int, int]], weights: list[torch.Tensor], bias: torch.Tensor) -> None:
        super().__init__()
        self.kind, self.pre, self.cin, self.cout, self.side = kind, pre, cin, cout, side
        self.pieces = pieces  # (window start, window length, output row, first and last + 1 output column)
        self.weights = nn.ParameterList(nn.Parameter(w, requires_grad=False) for w in weights)
        self.register_buffer("bias", bias)  # [S * S * Cout], raster (row, column, channel)
        self.register_buffer("sequence", torch.tensor(_SEQUENCE, dtype=torch.int64))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, s, c = z.shape[0], self.side, self.cout
        if self.kind == "fused":
            return torch.addmm(self.bias, z, self.weights[0]).view(b, s, s, c).permute(0, 3, 1, 2)
        u = self.pre(z) if self.pre is not None else z
        u = u.view(b, self.cin, 4).transpose(1, 2).index_select(1, self.sequence)  # [B, 5, Cin] contiguous
        out = torch.empty(b, s, s, c, device=z.device, dtype=torch.promote_types(u.dtype, self.bias.dtype))
        bias = self.bias.view(s, s * c)
        for (a, n, oy, x0, x1), w in zip(self.pieces, self.weights):
            torch.addmm(bias[oy, x0 * c:x1 * c], u[:, a:a + n].reshape(b, -1), w, out=out[:, oy, x0:x1].view(b, -1))
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
        for block in m.blocks[1:]:
            h = block(h)
        x = torch.tanh(m.out(h))
        if m._crop:
            c = m._crop
            x = x[:, :, c:c + m.image_size, c:c + m.image_size]
        return x


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


def plan_stem(module: nn.Module) -> Optional[tuple[str, int]]:
    """`(kind, matrix entries)` of the stem `fast_decoder` would build for `module`, or None when
    the size rule says no (not an `UpsamplingDecoder` with a plain 2x2 first ConvTranspose, or
    more than `MAX_STEM_ELEMENTS` entries)."""
    if not isinstance(module, UpsamplingDecoder) or len(module.blocks) == 0:
        return None
    conv = module.blocks[0].conv
    if not isinstance(conv, nn.ConvTranspose2d) or conv.groups != 1 or conv.dilation != (1, 1) \
            or len(set(conv.kernel_size)) != 1 or len(set(conv.stride)) != 1 or len(set(conv.padding)) != 1 \
            or len(set(conv.output_padding)) != 1:
        return None
    cin, cout, k = conv.in_channels, conv.out_channels, conv.kernel_size[0]
    s, pad, opad = conv.stride[0], conv.padding[0], conv.output_padding[0]
    out = s - 2 * pad + k + opad  # side of the map after the first block (input side 2)
    hits = sum(1 for i in range(2) for o in range(out) if 0 <= o - s * i + pad < k) ** 2  # non-zero blocks
    grouped = hits * cin * cout
    fc = getattr(module, "fc", None)
    if fc is not None:
        fused = fc.in_features * out * out * cout
        if fused <= grouped + fc.in_features * fc.out_features:
            return ("fused", fused) if fused <= MAX_STEM_ELEMENTS else None
    return ("grouped", grouped) if grouped <= MAX_STEM_ELEMENTS else None


@torch.no_grad()
def build_stem(module: nn.Module) -> Optional[AffineStem]:
    """The `AffineStem` of an eval-mode `UpsamplingDecoder`, or None where `plan_stem` says no."""
    plan = plan_stem(module)
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
        pieces, weights = [], []
        for oy in range(side):
            reads = [tuple(sorted(p for p in range(4) if (p, oy * side + ox) in taps)) for ox in range(side)]
            for x0, x1 in _runs(reads):
                ins = _window(reads[x0])
                # rows (input pixel in window order, Cin), columns (output column, Cout)
                blocks = [[w[:, :, taps[(p, oy * side + ox)][0], taps[(p, oy * side + ox)][1]]
                           for ox in range(x0, x1)] for p in _SEQUENCE[ins[0]:ins[0] + ins[1]]]
                weights.append(torch.cat([torch.cat(row, 1) for row in blocks], 0))
                pieces.append((ins[0], ins[1], oy, x0, x1))
    weights = [m.to(device, dtype).contiguous() for m in weights]
    return AffineStem(kind, fc if kind == "grouped" else None, cin, cout, side, pieces, weights,
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


def fast_decoder(module: nn.Module, channels_last: bool = True) -> nn.Module:
    """`module` with its stem as matmuls (`FastDecoder`), or `module` itself where the size rule
    says no (see the module docstring). For inference only: the stem's matrices are copies."""
    if module.training:
        return module
    stem = build_stem(module)
    return module if stem is None else FastDecoder(module, stem, channels_last).eval()
