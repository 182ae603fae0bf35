"""Expert trajectories for trajectory matching: ConvNets trained on real data, every epoch saved.

`ensure_experts(dataset, num_experts=N, epochs=E, ...)` returns an `ExpertSet`, training only the
experts (and epochs) not yet in the cache; `train_experts` trains chosen indices of a set (ranks
sharing a subtask's experts). Layout of `<cache>/experts/<key>/`, where the key hashes
the data fingerprint, the class subset and every training setting (not N: asking for more experts
reuses the first ones): `config.json`; `expert_0003.safetensors` (tensor `trajectory` [E+1, P]
float32, epoch 0 = initialisation, parameters flat in `param_names` order; metadata: held-out
accuracy, time); while training, `expert_0003.partial/epoch_0005.safetensors` per finished epoch
(with SGD momentum), so an interrupted run resumes at the last finished epoch with identical
results: expert i's initialisation and epoch e's batch order and augmentation come from seeds
derived from (seed, i, e) alone.

Defaults follow the reference buffer code: SGD lr 0.01, batch 256, no momentum, no weight decay,
constant learning rate, DSA; the student of trajectory matching takes plain SGD steps, so the
expert does too. Held-out accuracy is measured on the test split and only reported.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from d3codec._seed import derive_seed
from d3codec.data import default_cache_dir
from d3codec.decode.decoders import check_device
from d3codec.distill.classifier import default_augment, evaluate_accuracy, train_classifier
from d3codec.errors import ConfigError
from d3codec.format.atomic import atomic_path, write_atomic
from d3codec.models.convnet import (ConvNet, flatten_params, init_params, load_flat, param_names,
                                    param_shapes, unflatten_params)

#: Bumped when the expert file layout or training procedure changes (part of every key).
EXPERTS_VERSION = 1


@dataclass(frozen=True)
class ExpertConfig:
    """Everything that determines an expert's trajectory, besides the data and its index."""

    epochs: int
    lr: float = 0.01
    batch_size: int = 256
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_decay: bool = False
    augment: bool = True
    width: int = 128
    depth: Optional[int] = None
    seed: int = 0

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"--expert-epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch must be at least 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if self.width < 1 or (self.depth is not None and self.depth < 1):
            raise ConfigError("--width and --depth must be positive")


def _generator(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def _atomic_save(tensors: dict[str, torch.Tensor], path: str, metadata: Optional[dict[str, str]] = None) -> None:
    """`tensors` (and string `metadata`) as a safetensors file at `path`, written atomically."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


class ExpertSet:
    """The first `num_experts` complete experts of one cache folder."""

    def __init__(self, path: str, num_experts: int) -> None:
        self.path = path
        with open(os.path.join(path, "config.json")) as f:
            self.info: dict[str, Any] = json.load(f)
        self.config = ExpertConfig(**self.info["config"])
        self.classes: list[int] = list(self.info["classes"])
        self.num_classes: int = len(self.classes)
        self.image_shape: tuple[int, int, int] = tuple(self.info["image_shape"])  # type: ignore[assignment]
        self.fingerprint: str = self.info["fingerprint"]
        self.num_experts = num_experts
        self.num_epochs = self.config.epochs
        missing = [i for i in range(num_experts) if not os.path.isfile(self.file(i))]
        if missing:
            raise ConfigError(f"experts {missing[:5]} are not trained in {path}; run ensure_experts first")
        self._shapes = param_shapes(self.build_model())

    def file(self, i: int) -> str:
        return os.path.join(self.path, f"expert_{i:04d}.safetensors")

    @property
    def param_names(self) -> list[str]:
        """Parameter names in flat-vector order."""
        return list(self._shapes)

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in self._shapes.values())

    def build_model(self) -> ConvNet:
        """A fresh ConvNet of the experts' architecture (parameters not loaded)."""
        c, h, w = self.image_shape
        return ConvNet(c, self.num_classes, (h, w), width=self.config.width, depth=self.config.depth)

    def trajectory(self, i: int) -> torch.Tensor:
        """Expert `i`'s parameters after every epoch: float32 [num_epochs + 1, P] (row 0 = init)."""
        self._check(i)
        with safe_open(self.file(i), framework="pt") as f:
            return f.get_tensor("trajectory")

    def flat_at(self, i: int, epoch: int) -> torch.Tensor:
        """Expert `i`'s flat parameters [P] after `epoch` epochs (reads one row)."""
        self._check(i, epoch)
        with safe_open(self.file(i), framework="pt") as f:
            return f.get_slice("trajectory")[epoch:epoch + 1][0]

    def params_at(self, i: int, epoch: int) -> dict[str, torch.Tensor]:
        """Expert `i`'s parameters after `epoch` epochs, by name."""
        return unflatten_params(self.flat_at(i, epoch), self._shapes)

    def model_at(self, i: int, epoch: Optional[int] = None,
                 device: Union[str, torch.device] = "cpu") -> ConvNet:
        """A ConvNet in eval mode holding expert `i`'s parameters at `epoch` (default: last)."""
        model = self.build_model()
        load_flat(model, self.flat_at(i, self.num_epochs if epoch is None else epoch))
        return model.to(device).eval()

    def teacher(self, epoch: Optional[int] = None, expert: int = 0,
                device: Union[str, torch.device] = "cpu") -> ConvNet:
        """The soft-label teacher: expert `expert` at `epoch` (default: last), eval mode."""
        return self.model_at(expert, epoch, device)

    def accuracy(self, i: int) -> Optional[float]:
        """Expert `i`'s final held-out (test split) accuracy, if it was measured."""
        with safe_open(self.file(i), framework="pt") as f:
            value = (f.metadata() or {}).get("test_accuracy", "")
        return float(value) if value else None

    def report(self) -> list[dict[str, Any]]:
        """One row per expert: index, epochs, held-out accuracy, training time."""
        rows = []
        for i in range(self.num_experts):
            with safe_open(self.file(i), framework="pt") as f:
                meta = f.metadata() or {}
            acc = meta.get("test_accuracy", "")
            rows.append({"expert": i, "epochs": self.num_epochs,
                         "test_accuracy": float(acc) if acc else None,
                         "train_loss": float(meta.get("train_loss", "nan")),
                         "train_seconds": float(meta.get("train_seconds", "nan"))})
        return rows

    def _check(self, i: int, epoch: int = 0) -> None:
        if not 0 <= i < self.num_experts:
            raise IndexError(f"expert {i} out of range 0..{self.num_experts - 1}")
        if not 0 <= epoch <= self.num_epochs:
            raise IndexError(f"epoch {epoch} out of range 0..{self.num_epochs}")


def experts_key(fingerprint: str, classes: Sequence[int], image_shape: Sequence[int], config: ExpertConfig) -> str:
    """Cache key of an expert folder: data fingerprint, classes, shape and settings."""
    text = json.dumps({"v": EXPERTS_VERSION, "fp": fingerprint, "classes": list(classes),
                       "shape": list(image_shape), "config": asdict(config)}, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def default_experts_dir(cache_dir: Optional[str] = None) -> str:
    return os.path.join(cache_dir or default_cache_dir(), "experts")


def ensure_experts(dataset: Any, *, num_experts: int, epochs: int, classes: Optional[Sequence[int]] = None,
                   seed: int = 0, lr: float = 0.01, batch_size: int = 256, momentum: float = 0.0,
                   weight_decay: float = 0.0, lr_decay: bool = False, augment: bool = True,
                   width: int = 128, depth: Optional[int] = None, cache_dir: Optional[str] = None,
                   device: Union[str, torch.device] = "cpu", test_dataset: Any = None,
                   progress: bool = True) -> ExpertSet:
    """Train (or reuse) `num_experts` ConvNet experts on `dataset` (an `ImageDataset` train split).

    `classes` (global class ids) restricts training to a subtask; the experts then have
    len(classes) outputs in that order. `test_dataset` (the test split) gives each expert's
    held-out accuracy, only reported. An interrupted call (Ctrl-C, a crash) resumes where it stopped.
    """
    config = ExpertConfig(epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum,
                          weight_decay=weight_decay, lr_decay=lr_decay, augment=augment, width=width,
                          depth=depth, seed=seed)
    if num_experts < 1:
        raise ConfigError(f"--experts must be at least 1, got {num_experts}")
    folder, _ = train_experts(dataset, range(num_experts), config, classes=classes, cache_dir=cache_dir,
                              device=device, test_dataset=test_dataset, progress=progress)
    return ExpertSet(folder, num_experts)


def train_experts(dataset: Any, indices: Iterable[int], config: ExpertConfig, *,
                  classes: Optional[Sequence[int]] = None, cache_dir: Optional[str] = None,
                  device: Union[str, torch.device] = "cpu", test_dataset: Any = None,
                  progress: bool = True) -> tuple[str, list[int]]:
    """Train just the experts `indices` of the set `config` defines (cached ones are skipped), as
    `ensure_experts` with the same settings would: returns the set's cache folder and the indices
    this call trained. An expert depends on its index alone, never on who trains it, so ranks that
    share a subtask each train theirs into the same folder (every write is atomic)."""
    config.validate()
    check_device(device)
    chosen = list(dataset.classes) if classes is None else [int(c) for c in classes]
    train = dataset if classes is None else dataset.subset(chosen)
    test = None if test_dataset is None else (test_dataset if classes is None else test_dataset.subset(chosen))
    if train.num_classes < 2:
        raise ConfigError("experts need at least 2 classes; choose more --classes")
    folder = os.path.join(default_experts_dir(cache_dir), experts_key(dataset.fingerprint, chosen,
                                                                      dataset.image_shape, config))
    os.makedirs(folder, exist_ok=True)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        info = {"version": EXPERTS_VERSION, "fingerprint": dataset.fingerprint, "dataset": dataset.name,
                "classes": chosen, "class_names": list(train.class_names),
                "image_shape": list(dataset.image_shape), "config": asdict(config)}
        write_atomic(config_path, json.dumps(info, indent=1).encode())
    trained = []
    for i in indices:
        if i < 0:
            raise ConfigError(f"expert indices start at 0, got {i}")
        final = os.path.join(folder, f"expert_{i:04d}.safetensors")
        if os.path.isfile(final):
            continue
        with _exclusive(final[: -len(".safetensors")] + ".lock", f"expert {i} in {folder}", progress):
            if os.path.isfile(final):  # another process trained it while this one waited
                continue
            _train_one(i, train, test, config, final, device, progress)
            trained.append(i)
    return folder, trained


@contextlib.contextmanager
def _exclusive(path: str, what: str, progress: bool) -> Iterator[None]:
    """Hold an advisory lock on `path` (waiting for it if another process has it), so that two
    encodes started together train a shared expert once instead of racing on its partial files.
    Without `fcntl` (Windows) there is no lock and concurrent encodes must not share a cache."""
    try:
        import fcntl  # local: POSIX only, absent on Windows
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"waiting for another process that is training {what}", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _train_one(i: int, train: Any, test: Any, config: ExpertConfig, final: str,
               device: Union[str, torch.device], progress: bool) -> None:
    """Train expert `i` from its last saved epoch to the end, then write its trajectory file."""
    c, h, w = train.image_shape
    model = ConvNet(c, train.num_classes, (h, w), width=config.width, depth=config.depth)
    init_params(model, _generator(config.seed, i, "init"))
    model.to(device)
    names = param_names(model)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    partial = final[: -len(".safetensors")] + ".partial"
    os.makedirs(partial, exist_ok=True)
    epoch_file = lambda e: os.path.join(partial, f"epoch_{e:04d}.safetensors")  # noqa: E731
    done = 0
    while os.path.isfile(epoch_file(done + 1)) and done < config.epochs:
        done += 1
    if done > 0:
        with safe_open(epoch_file(done), framework="pt") as f:
            load_flat(model, f.get_tensor("params").to(device))
            if config.momentum > 0:
                momentum = f.get_tensor("momentum").to(device)
                shapes = param_shapes(model)
                for p, buf in zip(model.parameters(), unflatten_params(momentum, shapes).values()):
                    opt.state[p]["momentum_buffer"] = buf.clone()
    else:
        _atomic_save({"params": flatten_params(model, names)}, epoch_file(0))

    def save_epoch(epoch: int, net: nn.Module, optimizer: torch.optim.SGD, loss: float) -> None:
        tensors = {"params": flatten_params(net, names)}
        if config.momentum > 0:
            tensors["momentum"] = torch.cat([optimizer.state[p]["momentum_buffer"].reshape(-1)
                                             for p in net.parameters()])
        _atomic_save(tensors, epoch_file(epoch + 1), {"train_loss": repr(loss)})

    aug = default_augment() if config.augment else None
    batches = lambda e: train.batches(config.batch_size, generator=_generator(config.seed, i, e, "order"),  # noqa: E731
                                      device=device)
    result = train_classifier(model, batches, epochs=config.epochs, start_epoch=done, optimizer=opt,
                              generator=lambda e: _generator(config.seed, i, e, "augment"),
                              lr=config.lr, lr_decay=config.lr_decay, augment=aug, on_epoch_end=save_epoch,
                              progress=progress, desc=f"expert {i}",
                              steps_per_epoch=-(-len(train) // config.batch_size))
    rows = []
    for e in range(config.epochs + 1):
        with safe_open(epoch_file(e), framework="pt") as f:
            rows.append(f.get_tensor("params"))
            loss = (f.metadata() or {}).get("train_loss", "nan")
    acc = evaluate_accuracy(model, test, device) if test is not None and len(test) else None
    meta = {"test_accuracy": "" if acc is None else repr(acc), "train_loss": loss,
            "train_seconds": repr(result.wall_time_s), "expert": str(i)}
    _atomic_save({"trajectory": torch.stack(rows)}, final, meta)
    shutil.rmtree(partial, ignore_errors=True)
    if progress and acc is not None:
        print(f"expert {i}: held-out accuracy {acc:.4f}", file=sys.stderr)
