"""Soft-label storage (dense and top-k) and checkpoint files (safetensors + JSON, no pickle)."""
from __future__ import annotations

import pytest
import torch

from d3codec.encode.checkpoint import load_checkpoint, optimizer_from_flat, optimizer_to_flat, save_checkpoint
from d3codec.encode.labels import (HARD_LABEL_AGREEMENT, LabelStorage, auto_storage, class_agreement, index_dtype,
                                   store_labels, teacher_probs_of_batches)
from d3codec.errors import ConfigError


def _probs(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(5, 2, 10, generator=g), dim=-1)


def test_dense_u8_labels_are_within_half_a_step() -> None:
    p = _probs()
    lab = store_labels(p, LabelStorage("dense", dtype="U8"))
    assert lab.kind == "soft" and lab.layout == "dense" and lab.probs.dtype == "U8"
    assert torch.allclose(lab.probs.dequantize(), p, atol=0.5 / 255 + 1e-6)


def test_topk_labels_keep_the_largest_probabilities() -> None:
    p = _probs(1)
    lab = store_labels(p, LabelStorage("topk", k=3, dtype="F16"))
    idx = lab.indices.dequantize()
    assert lab.indices.dtype == "U8" and tuple(idx.shape) == (5, 2, 3)
    assert torch.equal(idx.long(), torch.topk(p, 3, dim=-1).indices)
    assert torch.allclose(lab.values.dequantize(), torch.topk(p, 3, dim=-1).values, atol=1e-3)


def test_hard_labels_store_nothing_and_index_dtypes_grow() -> None:
    assert store_labels(_probs(), LabelStorage("hard")).probs is None
    assert [index_dtype(n) for n in (10, 256, 1000, 40000)] == ["U8", "U8", "I16", "I32"]


def test_teacher_probs_are_softmax_rows() -> None:
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    images = torch.randn(10, 1, 2, 2)
    p = teacher_probs_of_batches(teacher, images.split(3), 2, 5)  # batches of 3, 3, 3, 1
    assert p.shape == (2, 5, 3)
    assert torch.allclose(p.sum(-1), torch.ones(2, 5))


def test_checkpoint_round_trip_with_optimizer_state(tmp_path) -> None:
    w = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([w], lr=0.1)
    w.grad = torch.ones(3)
    opt.step()
    tensors, meta = optimizer_to_flat("opt", opt.state_dict())
    tensors["w"] = w.detach()
    path = tmp_path / "run.ckpt"
    save_checkpoint(path, tensors, {"opt": meta, "iteration": 7})
    loaded, loaded_meta = load_checkpoint(path)
    assert loaded_meta["iteration"] == 7
    opt2 = torch.optim.Adam([torch.nn.Parameter(loaded["w"].clone())], lr=0.5)
    opt2.load_state_dict(optimizer_from_flat("opt", loaded, loaded_meta["opt"]))
    assert opt2.param_groups[0]["lr"] == 0.1
    assert torch.equal(opt2.state[opt2.param_groups[0]["params"][0]]["exp_avg"], opt.state[w]["exp_avg"])
    assert not list(tmp_path.glob("*.tmp*"))


def test_damaged_checkpoint_is_a_config_error(tmp_path) -> None:
    path = tmp_path / "bad.ckpt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="delete it"):
        load_checkpoint(path)


def test_auto_labels_are_hard_only_where_the_teacher_agrees() -> None:
    soft = LabelStorage("dense", dtype="U8")
    n, k = 4, 10
    own = torch.nn.functional.one_hot(torch.arange(n).repeat_interleave(k), n).float().reshape(n, k, n)
    other = own.roll(1, dims=-1)  # every component's top class is the next class
    agreed = int(HARD_LABEL_AGREEMENT * k + 0.999)  # components per class the teacher gets right
    mixed = torch.cat([own[:, :agreed], other[:, agreed:]], dim=1)
    assert class_agreement(own) == 1.0 and class_agreement(other) == 0.0
    assert auto_storage(own, soft) == (LabelStorage("hard"), 1.0)
    assert auto_storage(mixed, soft)[0].kind == "hard"
    fewer = torch.cat([own[:, :agreed - 1], other[:, agreed - 1:]], dim=1)
    assert auto_storage(fewer, soft)[0] == soft
