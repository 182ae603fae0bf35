"""Regenerate the golden `.d3` vectors and their expected `d3codec info --json` output.

    python spec/vectors/make_vectors.py          # rewrite the vectors in this folder
    python spec/vectors/make_vectors.py --check  # exit 1 if regenerating would change a file

Deterministic: fixed seeds, explicit generators, no clock. zstd output may differ between
zstandard library versions, so tests only read these files (load + info --json); they never
compare freshly written bytes against them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from d3codec.format import Budget, Stored, dumps, loads
from d3codec.format.budget import parse_budget
from d3codec.format.summary import describe
from d3codec.format.testing import random_d3

HERE = Path(__file__).resolve().parent


def _vectors() -> dict[str, object]:
    """Name -> D3File: one and several decoders, hard/soft top-k/dense labels, diag/lowrank/full,
    float32/float16/bfloat16 and int8/uint8 (per tensor and per channel) storage."""
    out = {}
    out["one-decoder-diag-hard-f32"] = random_d3(
        1, num_classes=3, image_shape=(1, 8, 8), latents_per_class=2, dim=4, kind="diag", decoders=1,
        width=4, labels="hard", dtype="F32", budget=parse_budget("2ipc", 3, (1, 8, 8)),
    )
    two = random_d3(
        2, num_classes=4, image_shape=(3, 8, 8), latents_per_class=2, dim=6, kind="lowrank", rank=2,
        mixture=True, decoders=2, width=6, labels="topk", topk=2, index_dtype="U8", dtype="I8",
        per_channel=True, budget=parse_budget("8KiB", 4, (3, 8, 8)),
    )
    two.priors.mean = Stored.encode(two.priors.mean.dequantize(), "I8")  # per-tensor next to per-channel
    two.decoders[1].family, two.decoders[1].hparams["width"] = "medium", 6
    out["two-decoders-lowrank-topk-i8"] = two
    three = random_d3(
        3, num_classes=5, image_shape=(3, 4, 4), latents_per_class=1, dim=3, kind="full", decoders=3,
        width=2, labels="dense", dtype="F16",
    )
    three.decoders[2].weights = {k: Stored(v.raw.to(torch.bfloat16)) for k, v in three.decoders[2].weights.items()}
    three.metadata.fingerprint = "sha256:" + "0" * 64
    three.decoders[0].weights["zeros"] = Stored(torch.zeros(4096, dtype=torch.uint8))  # makes a zstd section
    out["three-decoders-full-dense-f16"] = three
    return out


def main(argv: list[str]) -> int:
    check = "--check" in argv
    changed = []
    for name, d3 in _vectors().items():
        data = dumps(d3)
        info = json.dumps(describe(loads(data)), sort_keys=True, indent=2) + "\n"
        for path, content in ((HERE / f"{name}.d3", data), (HERE / f"{name}.info.json", info.encode())):
            if not path.exists() or path.read_bytes() != content:
                changed.append(path.name)
                if not check:
                    path.write_bytes(content)
    if check and changed:
        print("would change: " + ", ".join(changed), file=sys.stderr)
        return 1
    print(("rewrote: " + ", ".join(changed)) if changed else "vectors up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
