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

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from d3codec.models._upsample import UpsamplingDecoder

#: Largest stem matrices (entries, all groups) `fast_decoder` builds: 64 Mi floats = 256 MiB.
MAX_STEM_ELEMENTS = 1 << 26


class AffineStem(nn.Module):
    """z [B, latent] -> the first block's pre-norm map [B, Cout, S, S] (channels-last strides).

    `kind` is "fused" (one dense matmul from z) or "grouped" (Linear if any, then one GEMM per
    group of output pixels that read the same input pixels).
    """

    def __init__(self, kind: str, pre: Optional[nn.Linear], cin: int, cout: int, side: int,
                 groups: list[tuple[Optional[list[int]], torch.Tensor]], bias: torch.Tensor,
                 order: list[int]) -> None:
        super().__init__()
        self.kind, self.pre, self.cin, self.cout, self.side = kind, pre, cin, cout, side
        # each group's input pixels: a contiguous range (a view) or an index buffer `index<i>`
        self.ranges: list[Optional[tuple[int, int]]] = []
        for i, (ins, _) in enumerate(groups):
            if ins is None or ins == list(range(ins[0], ins[0] + len(ins))):
                self.ranges.append(None if ins is None else (ins[0], ins[0] + len(ins)))
            else:
                self.ranges.append(None)
                self.register_buffer(f"index{i}", torch.tensor(ins, dtype=torch.int64))
        self.weights = nn.ParameterList(nn.Parameter(w, requires_grad=False) for _, w in groups)
        # group-major columns: bias in that order; `perm` puts output pixels back in raster order
        cols = torch.tensor(order)
        self.register_buffer("bias", bias.view(side * side, cout)[cols.to(bias.device)].reshape(-1).contiguous())
        perm = torch.empty(len(order), dtype=torch.int64)
        perm[cols] = torch.arange(len(order))
        self.register_buffer("perm", None if order == sorted(order) else perm)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b = z.shape[0]
        if self.kind == "fused":
            y = torch.addmm(self.bias, z, self.weights[0])
        else:
            u = self.pre(z) if self.pre is not None else z
            u = u.reshape(b, self.cin, -1).transpose(1, 2).contiguous()  # [B, pixels, Cin]
            ys = []
            for i, (span, w) in enumerate(zip(self.ranges, self.weights)):
                x = u[:, span[0]:span[1]] if span is not None else u.index_select(1, getattr(self, f"index{i}"))
                ys.append(torch.mm(x.reshape(b, -1), w))
            y = torch.cat(ys, 1).add_(self.bias)
        y = y.view(b, -1, self.cout)
        if self.perm is not None:
            y = y.index_select(1, self.perm)
        return y.view(b, self.side, self.side, self.cout).permute(0, 3, 1, 2)


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


def _blocks(conv: nn.ConvTranspose2d, side: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Non-zero weight blocks of the transposed conv on a side x side map: `(mask [P, Q] bool,
    blocks [P, Q, Cin, Cout] float64, output side)`, P input and Q output pixels in raster order.
    Block (p, q) is weight[:, :, ky, kx] with (ky, kx) = q - stride * p + padding, per axis."""
    (k, _), (s, _), (pad, _), (opad, _) = conv.kernel_size, conv.stride, conv.padding, conv.output_padding
    out = (side - 1) * s - 2 * pad + k + opad
    w = conv.weight.detach().double()
    cin, cout = w.shape[0], w.shape[1]
    mask = torch.zeros(side * side, out * out, dtype=torch.bool)
    blocks = torch.zeros(side * side, out * out, cin, cout, dtype=torch.float64)
    for iy in range(side):
        for ix in range(side):
            for oy in range(out):
                for ox in range(out):
                    ky, kx = oy - s * iy + pad, ox - s * ix + pad
                    if 0 <= ky < k and 0 <= kx < k:
                        mask[iy * side + ix, oy * out + ox] = True
                        blocks[iy * side + ix, oy * out + ox] = w[:, :, ky, kx]
    return mask, blocks, out


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
    mask, blocks, side = _blocks(conv, 2)
    bias = conv.bias.detach().double().cpu().repeat(side * side) if conv.bias is not None \
        else torch.zeros(side * side * cout, dtype=torch.float64)
    fc = module.fc
    if kind == "fused":
        # z -> fc -> [Cin, 2, 2] -> conv: W[z, (q, co)] = sum_{ci, p} fcW[(ci, p), z] blocks[p, q, ci, co]
        fw = fc.weight.detach().double().cpu().view(cin, 4, -1)  # [Cin, P, z]
        weight = torch.einsum("cpz,pqcd->zqd", fw, blocks).reshape(fw.shape[2], -1)
        fb = fc.bias.detach().double().cpu().view(cin, 4)
        bias = bias + torch.einsum("cp,pqcd->qd", fb, blocks).reshape(-1)
        groups = [(None, weight)]
        order = list(range(side * side))
    else:
        by_inputs: dict[tuple[int, ...], list[int]] = {}
        for q in range(side * side):
            by_inputs.setdefault(tuple(mask[:, q].nonzero().flatten().tolist()), []).append(q)
        groups, order = [], []
        for ins, outs in by_inputs.items():
            w = blocks[list(ins)][:, outs]  # [n_in, n_out, Cin, Cout] -> rows (p, ci), cols (q, co)
            groups.append((list(ins), w.permute(0, 2, 1, 3).reshape(len(ins) * cin, len(outs) * cout)))
            order += outs
    groups = [(ins, w.to(device, dtype).contiguous()) for ins, w in groups]
    return AffineStem(kind, fc if kind == "grouped" else None, cin, cout, side, groups,
                      bias.to(device, dtype), order).to(device).eval()


def fast_decoder(module: nn.Module, channels_last: bool = True) -> nn.Module:
    """`module` with its stem as matmuls (`FastDecoder`), or `module` itself where the size rule
    says no (see the module docstring). For inference only: the stem's matrices are copies."""
    if module.training:
        return module
    stem = build_stem(module)
    return module if stem is None else FastDecoder(module, stem, channels_last).eval()
