"""The evaluation report: accuracy beside storage and compute, as text or one JSON object."""
from __future__ import annotations

import json
from typing import Any


def storage_figures(nbytes: int, num_classes: int, image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """Bytes, and the same bytes as images per class of float32 pixels and of uint8 pixels."""
    c, h, w = image_shape
    per_image = c * h * w
    return {"bytes": int(nbytes),
            "ipc_float32": nbytes / (num_classes * per_image * 4),
            "ipc_uint8": nbytes / (num_classes * per_image)}


def to_json(report: dict[str, Any]) -> str:
    """One JSON object on one line."""
    return json.dumps(report, sort_keys=True)


def render(report: dict[str, Any]) -> str:
    """A short human-readable summary."""
    acc, sto, comp, rec = report["accuracy"], report["storage"], report["compute"], report["recipe"]
    what = report.get("file") or f"baseline {report['baseline']}" + (
        f" (quality {report['quality']})" if report.get("quality") else "")
    lines = [
        f"{what} on {report['test']['name']} test split ({report['test']['images']:,} images"
        + (", held out of the source's training images" if report["test"].get("held_out") else "") + ")",
        f"  accuracy  {100 * acc['mean']:.2f}% +- {100 * acc['std']:.2f} (final, {rec['runs']} run(s) of "
        f"{rec['model']}, {rec['epochs']} {'steps' if rec.get('epoch') == 'one batch' else 'epochs'})",
        f"  storage   {sto['bytes']:,} bytes = {sto['ipc_float32']:.3g} ipc float32 = {sto['ipc_uint8']:.3g} ipc uint8"
        + (f"; {sto['images']:,} images ({sto['images_per_class_min']}-{sto['images_per_class_max']} per class)"
           if "images" in sto else ""),
        f"  compute   {comp['images_seen_per_run']:,} images seen, {comp['optimizer_steps_per_run']:,} steps, "
        f"{comp['train_seconds_per_run']:.1f} s, ~{comp['train_flops_per_run_estimate'] / 1e12:.3g} TFLOP per run",
    ]
    return "\n".join(lines)
