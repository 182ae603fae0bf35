"""Soft-label storage (dense and top-k) and checkpoint files (safetensors + JSON, no pickle)."""
from __future__ import annotations

import pytest
import torch

from d3codec.distill.checkpoint import load_checkpoint, optimizer_from_flat, optimizer_to_flat, save_checkpoint
from d3codec.distill.labels import (AUTO_OWN_AGREEMENT, AUTO_OWN_WEIGHT, MIN_TEACHER_STEPS, LabelStorage, index_dtype,
                                   mix_own_class, own_weight, resolve_labels, store_labels, teacher_agreement,
                                   teacher_labels, teacher_probs_of_batches)
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


def test_teacher_agreement_counts_components_whose_top_class_is_their_own() -> None:
    p = torch.full((4, 5, 4), 0.1)
    for c in range(4):
        p[c, :2, c] = 0.7                 # 2 of each class's 5 components: the own class on top
        p[c, 2:, (c + 1) % 4] = 0.7       # the other 3: a neighbour on top
    line = teacher_agreement(p)
    assert "40.0% of the 20 components" in line
    assert "own class 0.340" in line and "chance 0.250" in line  # (2 x 0.7 + 3 x 0.1) / 5


def test_own_class_weight_mixes_each_component_with_its_own_class() -> None:
    p = _probs()                                          # 5 classes x 2 components x 10 outputs
    mixed = mix_own_class(p, 0.8)
    own = torch.zeros_like(p)
    for c in range(5):
        own[c, :, c] = 1.0
    assert torch.allclose(mixed, 0.8 * own + 0.2 * p) and torch.allclose(mixed.sum(-1), torch.ones(5, 2))
    assert mix_own_class(p, 0.0) is p
    with pytest.raises(ValueError):
        mix_own_class(p, 1.5)


def test_teacher_labels_store_the_mix_and_log_the_teacher_before_it() -> None:
    """The stored labels are the mix; the agreement line describes the teacher itself."""
    uniform = lambda x: torch.zeros(x.shape[0], 4)        # noqa: E731 - a teacher that knows nothing
    batches = [torch.zeros(6, 1, 2, 2), torch.zeros(2, 1, 2, 2)]  # 4 classes x 2 components
    lines: list[str] = []
    lab = teacher_labels(uniform, batches, 4, 2, LabelStorage("dense", dtype="U8", own=0.8), lines.append)
    probs = lab.probs.dequantize()
    assert torch.allclose(probs[2, :, 2], torch.full((2,), 0.85), atol=1 / 255)   # 0.8 + 0.2 / 4
    assert torch.allclose(probs[2, :, 0], torch.full((2,), 0.05), atol=1 / 255)
    assert "own class 0.250" in lines[0]                  # the teacher's own view: uniform
    assert "0.8 x own class + 0.2 x teacher" in LabelStorage("dense", own=0.8).describe()


def _agreeing(share: float, classes: int = 4, k: int = 20) -> torch.Tensor:
    """Probabilities whose top class is the component's own for `share` of each class's components."""
    p = torch.full((classes, k, classes), 0.1)
    own = round(share * k)
    for c in range(classes):
        p[c, :own, c] = 0.7
        p[c, own:, (c + 1) % classes] = 0.7
    return p / p.sum(-1, keepdim=True)


def test_auto_own_weight_follows_the_teachers_agreement() -> None:
    """auto: the own class mixed in for a teacher that hardly knows the components, not for one that does."""
    assert own_weight("auto", _agreeing(0.10)) == AUTO_OWN_WEIGHT == 0.8
    assert own_weight("auto", _agreeing(AUTO_OWN_AGREEMENT - 0.05)) == AUTO_OWN_WEIGHT
    assert own_weight("auto", _agreeing(AUTO_OWN_AGREEMENT)) == 0.0
    assert own_weight("auto", _agreeing(0.45)) == 0.0
    assert own_weight(0.3, _agreeing(0.10)) == 0.3 and own_weight(0.0, _agreeing(0.10)) == 0.0


def test_teacher_labels_with_auto_weight_mix_only_a_weak_teachers_labels() -> None:
    weak, strong = _agreeing(0.10), _agreeing(0.60)
    for probs, weight in ((weak, 0.8), (strong, 0.0)):
        batches = [torch.arange(80).float().view(80, 1)]   # a teacher that returns the fixed log-probabilities
        lines: list[str] = []
        teacher = lambda x, p=probs: p.reshape(80, 4).log()[x[:, 0].long()]  # noqa: E731
        lab = teacher_labels(teacher, batches, 4, 20, LabelStorage("dense", dtype="F16", own="auto"), lines.append)
        assert torch.allclose(lab.probs.dequantize().float(), mix_own_class(probs, weight), atol=1e-3)
        assert f"own-class weight {weight:g} (auto" in lines[1], lines
    assert "if the teacher agrees under 25%" in LabelStorage("dense", own="auto").describe()


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



def test_auto_labels_are_soft_only_for_a_long_trained_teacher() -> None:
    assert resolve_labels("auto", teacher_epochs=1, train_images=45000, batch_size=256) == "hard"  # CPU default: 176 steps
    assert resolve_labels("auto", teacher_epochs=50, train_images=45000, batch_size=256) == "auto"  # the paper's experts
    assert resolve_labels("auto", teacher_epochs=MIN_TEACHER_STEPS, train_images=256, batch_size=256) == "auto"
    assert resolve_labels("auto", teacher_epochs=MIN_TEACHER_STEPS - 1, train_images=256, batch_size=256) == "hard"
    assert resolve_labels("soft", 1, 100, 256) == "soft" and resolve_labels("hard", 100, 10**6, 256) == "hard"
