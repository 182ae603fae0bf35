"""Random but valid `D3File`s, for tests, golden vectors, fuzzing and benchmarks.

Every draw uses an explicit `torch.Generator`, so a seed gives the same file everywhere. By
default the decoder weights have plausible names and shapes but random values (the format does
not care, but they do not fit a registered architecture, so they cannot be decoded); pass
`decoder_states` (e.g. from `d3codec.models.export_state` of a built decoder) for decodable files.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch

from d3codec.format.types import Budget, D3File, DecoderEntry, Labels, Metadata, Priors, Stored


#: A real decoder for `random_d3`: (family, version, hparams, float state dict of the built module).
DecoderState = tuple[str, int, Mapping[str, Any], Mapping[str, torch.Tensor]]


def _store(x: torch.Tensor, dtype: str, per_channel: bool) -> Stored:
    return Stored.encode(x, dtype, axis=0 if per_channel and dtype in ("I8", "U8") and x.dim() > 1 else None)


def random_d3(
    seed: int = 0,
    *,
    num_classes: int = 3,
    image_shape: tuple[int, int, int] = (1, 8, 8),
    latents_per_class: int = 2,
    dim: int = 4,
    kind: str = "diag",
    rank: int = 2,
    mixture: bool = False,
    decoders: int = 1,
    width: int = 4,
    labels: str = "hard",
    topk: int = 2,
    index_dtype: str = "I16",
    dtype: str = "F32",
    per_channel: bool = False,
    budget: Optional[Budget] = None,
    decoder_states: Optional[Sequence[DecoderState]] = None,
) -> D3File:
    """A valid file: `kind` diag|lowrank|full, `labels` hard|dense|topk, `dtype` for all values.

    `decoder_states` replaces the placeholder decoders with these (their count overrides
    `decoders`; `width` is then unused): each state is stored in `dtype` like the other values.
    """
    g = torch.Generator().manual_seed(seed)
    n, k, d = num_classes, latents_per_class, dim
    c, h, w = image_shape

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    metadata = Metadata(
        name=f"random-{seed}", num_classes=n, class_names=[f"class{i}" for i in range(n)],
        image_shape=image_shape, mean=tuple(0.5 for _ in range(c)), std=tuple(0.25 for _ in range(c)),
    )
    store = lambda x: _store(x, dtype, per_channel)  # noqa: E731
    priors = Priors(kind=kind, mean=store(rnd(n, k, d)))
    if kind in ("diag", "lowrank"):
        priors.logvar = store(rnd(n, k, d) * 0.1 - 1.0)
    if kind == "lowrank":
        priors.factor = store(rnd(n, k, d, rank) * 0.1)
    if kind == "full":
        priors.cholesky = store(torch.tril(rnd(n, k, d, d) * 0.1) + torch.eye(d))
    if mixture:
        priors.weights = store(torch.rand(n, k, generator=g))
    classes = torch.randperm(n, generator=g).tolist()
    entries = []
    if decoder_states is not None:
        if not decoder_states:
            raise ValueError("decoder_states must hold at least one decoder")
        for i, (family, version, hparams, state) in enumerate(decoder_states):
            owned = sorted(classes[i :: len(decoder_states)])
            weights = {name: store(value) for name, value in state.items()}
            entries.append(DecoderEntry(family=family, version=version, classes=owned, weights=weights,
                                        hparams=dict(hparams)))
    for i in range(decoders if decoder_states is None else 0):  # placeholders
        owned = sorted(classes[i::decoders])
        weights = {
            "fc.weight": store(rnd(4 * width, d)),
            "fc.bias": store(rnd(4 * width)),
            "out.weight": store(rnd(c, width, 3, 3)),
            "out.bias": store(rnd(c)),
        }
        entries.append(DecoderEntry(family="small", version=1, classes=owned, weights=weights,
                                    hparams={"channels": c, "image_size": h, "latent_dim": d, "width": width}))
    if labels == "hard":
        lab = Labels()
    elif labels == "dense":
        lab = Labels(kind="soft", layout="dense", probs=store(torch.softmax(rnd(n, k, n), dim=-1)))
    elif labels == "topk":
        probs = torch.softmax(rnd(n, k, n) * 3, dim=-1)
        values, indices = probs.topk(min(topk, n), dim=-1)
        lab = Labels(kind="soft", layout="topk", indices=Stored.encode(indices, index_dtype), values=store(values))
    else:
        raise ValueError(f"labels must be hard, dense or topk, not {labels!r}")
    return D3File(metadata=metadata, priors=priors, decoders=entries, labels=lab, budget=budget,
                  provenance={"d3codec": "0.1.0", "seed": seed, "generator": "d3codec.format.testing"})
