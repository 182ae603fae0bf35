"""What `d3codec info` shows: a JSON-able description of a loaded file, and its text rendering.

`describe` is the `info --json` object (the golden vectors store it, so its keys are part of
the spec); `render` is the human summary with a byte breakdown that adds up to the file size.
"""
from __future__ import annotations

from typing import Any, Optional

from d3codec.format.types import D3File, Stored


def _quant(s: Stored) -> Optional[str]:
    if not s.quantized:
        return None
    return "per-tensor" if s.axis is None else f"per-channel(axis={s.axis})"


def _tensor(s: Stored) -> dict[str, Any]:
    return {"dtype": s.dtype, "shape": list(s.shape), "quantization": _quant(s)}


def _dtypes(tensors: dict[str, Stored]) -> dict[str, int]:
    """Storage dtype -> number of values stored in it."""
    out: dict[str, int] = {}
    for s in tensors.values():
        out[s.dtype] = out.get(s.dtype, 0) + s.raw.numel()
    return dict(sorted(out.items()))


def describe(d3: D3File) -> dict[str, Any]:
    """The `info --json` object of a loaded file (needs `file_bytes` and `breakdown`)."""
    m, p, lab, b = d3.metadata, d3.priors, d3.labels, d3.budget
    priors, labels = p.tensors(), lab.tensors()
    used = None if b is None or not d3.file_bytes else round(d3.file_bytes / b.bytes, 6)
    return {
        "format_version": f"{d3.format_version[0]}.{d3.format_version[1]}",
        "file_bytes": d3.file_bytes,
        "budget_bytes": None if b is None else b.bytes,
        "budget": None if b is None else {"bytes": b.bytes, "unit": b.unit, "ipc": b.ipc, "spec": b.spec},
        "budget_used": used,
        "breakdown": dict(d3.breakdown or {}),
        "name": m.name,
        "num_classes": m.num_classes,
        "class_names": list(m.class_names),
        "image_shape": list(m.image_shape),
        "value_range": list(m.value_range),
        "mean": list(m.mean),
        "std": list(m.std),
        "fingerprint": m.fingerprint,
        "latents_per_class": p.latents_per_class,
        "latent_dim": p.dim,
        "priors": {"kind": p.kind, "rank": p.rank, "mixture_weights": p.weights is not None,
                   "tensors": {k: _tensor(v) for k, v in priors.items()}},
        "decoders": [
            {"family": dec.family, "version": dec.version, "hparams": dec.hparams, "classes": list(dec.classes),
             "parameters": sum(s.raw.numel() for s in dec.weights.values()), "dtypes": _dtypes(dec.weights),
             "section_bytes": (d3.breakdown or {}).get(f"decoder.{i}")}
            for i, dec in enumerate(d3.decoders)
        ],
        "labels": {"kind": lab.kind, "layout": lab.layout,
                   "k": lab.indices.shape[-1] if lab.indices is not None else None,
                   "tensors": {k: _tensor(v) for k, v in labels.items()}},
        "provenance": d3.provenance,
    }


def _n(x: int) -> str:
    return f"{x:,}"


def _dt(tensors: dict[str, Stored]) -> str:
    kinds = sorted({s.dtype + ("q" if s.quantized else "") for s in tensors.values()})
    return "/".join(k.replace("I8q", "I8 quantised").replace("U8q", "U8 quantised") for k in kinds) or "-"


def _compute(c: Any) -> str:
    """One encode's `compute` provenance record in words (what its bytes depend on)."""
    if not isinstance(c, dict):
        return str(c)
    where = str(c.get("device", "?"))
    if c.get("gpu"):
        where += f" ({c['gpu']}, CUDA {c.get('cuda')})"
    threads = c.get("threads", "?")
    return (f"torch {c.get('torch', '?')} on {where}, CPU capability {c.get('cpu_capability', '?')}, "
            f"{threads} thread{'' if threads == 1 else 's'}")


def render(d3: D3File, path: str) -> str:
    """The human summary `d3codec info FILE` prints."""
    info = describe(d3)
    m, p, lab = d3.metadata, d3.priors, d3.labels
    c, h, w = m.image_shape
    lines = [
        f"file      {path}  ({_n(info['file_bytes'] or 0)} bytes, format {info['format_version']})",
        f"dataset   {m.name}: {m.num_classes} classes, images {c}x{h}x{w}, values in [{m.value_range[0]:g}, {m.value_range[1]:g}]",
    ]
    cov = {"diag": "diagonal", "lowrank": f"low-rank (r={p.rank}) + diagonal", "full": "full"}[p.kind]
    mix = ", mixture weights" if p.weights is not None else ""
    pri = {k: v for k, v in (("mean", p.mean), ("logvar", p.logvar), ("factor", p.factor), ("cholesky", p.cholesky), ("weights", p.weights)) if v is not None}
    lines.append(f"priors    {cov} Gaussians: {p.num_classes} classes x {p.latents_per_class} latents x {p.dim} dims{mix} ({_dt(pri)})")
    for i, dec in enumerate(d3.decoders):
        params = sum(s.raw.numel() for s in dec.weights.values())
        lines.append(f"decoder.{i} {dec.family} v{dec.version}: {len(dec.classes)} classes, {_n(params)} parameters ({_dt(dec.weights)})")
    if lab.kind == "hard":
        lines.append("labels    hard (each latent labelled with its class)")
    elif lab.layout == "dense":
        lines.append(f"labels    soft, dense probabilities ({_dt({'p': lab.probs})})")
    else:
        lines.append(f"labels    soft, top-{info['labels']['k']} (indices {lab.indices.dtype}, values {_dt({'v': lab.values})})")
    b = d3.budget
    if b is None:
        lines.append("budget    none recorded")
    else:
        given = f" ({b.spec})" if b.spec else ""
        lines.append(f"budget    {_n(b.bytes)} bytes{given}: {100 * info['budget_used']:.1f}% used, {_n(b.bytes - (d3.file_bytes or 0))} bytes left")
    compute = d3.provenance.get("compute") if isinstance(d3.provenance, dict) else None
    if isinstance(compute, list):
        lines += [f"encoded   part {i}: {_compute(c)}" for i, c in enumerate(compute)]
    elif compute is not None:
        lines.append(f"encoded   {_compute(compute)}")
    total = d3.file_bytes or 0
    width = max(len(k) for k in (d3.breakdown or {"total": 0}))
    lines.append("bytes")
    for part, n in (d3.breakdown or {}).items():
        lines.append(f"  {part:<{width}}  {n:>12,}  {100 * n / total if total else 0:5.1f}%")
    lines.append(f"  {'total':<{width}}  {total:>12,}  100.0%")
    return "\n".join(lines)
