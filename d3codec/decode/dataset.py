"""`D3Dataset`: endless or epoch-sized streams of training batches decoded from a `.d3` file.

    ds = D3Dataset("cifar10-1ipc.d3", batch_size=256, device="cuda", seed=0)
    for images, labels in ds:   # images [B, C, H, W] float32 on the device, in the file's normalisation
        ...                     # labels [B, num_classes] probabilities (soft files) or [B] int64

How the stream is defined (so it is deterministic, shardable and indexable; the order itself is
`d3codec.decode.stream.Stream`, this module adds epochs, ranks, workers and decoding):

- An epoch is `epoch_size` positions (default: the fewest whole rounds, see below, that fill one
  batch on every rank: one round, the paper's epoch, whenever a round is at least that big; the
  world size is read when the stream is used, not at construction). Position i of epoch e is
  slot `perm_e[i]`, `perm_e` a permutation drawn from (seed, e). An `epoch_size` that is not a
  whole number of rounds walks one endless sequence of rounds instead (position i of epoch e is
  place q = e * epoch_size + i, in round q // round, each round permuted from (seed, round)), so
  short epochs still cover every component and class in turn. A round is every component
  once: `mode="mixed"` (the paper's evaluation) has 2 N K slots, each component's mean image and
  one random draw; `"random"` and `"mean"` have N K. Epochs longer than a round repeat rounds
  (slot s is round slot s mod round), so classes stay balanced exactly per round.
- Random draws (eps, component choice under mixture weights, classes under `class_weights`)
  come from a generator seeded by (seed, e, block of 4096 positions) on the device: a sample
  depends on the seed, epoch and its position only, never on the batch size or on other samples.
- Under `torch.distributed` rank r of W takes positions [r S, (r + 1) S), S = ceil(epoch_size / W)
  (the last rank wraps around to fill S, as `DistributedSampler` pads), so ranks never share a
  position. r and W (and so the default epoch size) are read from `torch.distributed` each time
  they are used, so a dataset built before `init_process_group` is sharded like one built after.
  DataLoader workers split a rank's batches round-robin (an endless stream's across epochs, so
  its loader yields the batches of one process in order, with any number of workers); a pickled
  dataset (a worker's copy under the spawn start method) keeps the rank and world size of the
  process group it was pickled in.
- Each new iteration over the dataset is the next epoch (as FFCV's `Loader`): a loop
  `for epoch in range(E): for x, y in ds:` gets epochs 0, 1, ... E - 1, fresh draws each time, and
  a new dataset with the same arguments repeats that sequence. This holds through
  `DataLoader(ds, batch_size=None, num_workers=W)` (fork or spawn, persistent workers or not:
  each DataLoader epoch is one new iteration, its workers agree on its epoch through counters in
  shared memory, `EpochClock`) and per rank under DDP, so ranks that loop alike stay in step. An
  endless iteration runs on from its epoch; the next iteration starts after the last epoch it
  began. `set_epoch(e)` pins the epoch of the next iteration (later ones follow it), so code
  that calls it before every epoch, as for `DistributedSampler`, gets exactly epoch e.
- Memory: the priors stay in their stored dtype (only the rows a batch draws are dequantised,
  `PriorTensors`), plus the epoch's permutation (4 bytes per slot) and the batch in flight.
- `len(ds)` is the number of batches this rank yields per epoch, and `ds[i]` is the i-th of them
  in the next iteration, augmentation included (so `ds[i]` takes exactly `i in range(len(ds))`,
  or -len(ds) .. -1; an endless stream has no length and takes any i >= 0). `ds.sample(i)` is
  position i of the next epoch over all ranks (not sharded, not augmented): `(image, label)`.
"""
from __future__ import annotations

import operator
import os
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch.utils.data import IterableDataset, get_worker_info

from d3codec.augment import DSA
from d3codec.decode.decoders import DecodeOptions, LabelTable, OutputSpace, check_device
from d3codec.decode.sampling import PriorTensors
from d3codec.decode.stream import MODES, Draw, Stream
from d3codec.errors import ConfigError
from d3codec.format.io import load
from d3codec.format.types import D3File

#: Most DataLoader workers per loader that the epoch counters (`EpochClock`) serve.
MAX_WORKERS = 64
_SPEED_DEFAULTS = DecodeOptions()


def _dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group now; (0, 1) when there is none."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpochClock:
    """Which epoch each new iteration over a dataset starts at, agreed by every process that holds
    a copy: the main process and its DataLoader workers (fork or spawn, persistent or not).

    Counters live in one shared-memory int64 tensor (shared across fork, and across spawn through
    torch's pickling), no locks: `[base, main, then per loader width n = 1..MAX_WORKERS and worker
    w < n: started, next after an even run, next after an odd run]`, epochs relative to `base`.
    A "next" entry is the first epoch not yet begun by that iterator slot. A new iteration in the
    main process starts at the furthest "next" of all slots. Worker w of an n-worker DataLoader
    starts at the furthest "next" of everything but its own loader width, and of its own width
    only the previous run's entries (parity of `started`): every worker of one DataLoader epoch
    reads the same values, whichever starts first, so they agree on the epoch. An endless
    iteration moves its slot's "next" on as it crosses epochs. `pin(e)` sets base e and zeroes
    the counters.
    """

    def __init__(self) -> None:
        widths = MAX_WORKERS * (MAX_WORKERS + 1) // 2
        self.t = torch.zeros(2 + 3 * widths, dtype=torch.int64).share_memory_()

    def __getstate__(self) -> dict[str, Any]:
        return {"t": self.t}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a DataLoader worker (spawn) receives the shared tensor itself; a plain pickle or deepcopy
        # gets a private copy, made shared so that its own workers advance it
        self.t = state["t"] if state["t"].is_shared() else state["t"].share_memory_()

    def _slots(self) -> torch.Tensor:
        return self.t[2:].view(-1, 3)

    def _frontier(self, skip: Optional[int] = None) -> int:
        """The furthest "next" of the main slot and every worker slot outside loader width `skip`."""
        nexts = self._slots()[:, 1:]
        if skip is not None:
            lo = (skip - 1) * skip // 2
            nexts = torch.cat([nexts[:lo], nexts[lo + skip:]])
        return max(int(self.t[1]), int(nexts.max()))

    @property
    def epoch(self) -> int:
        """The epoch a new iteration in the main process starts at."""
        return int(self.t[0]) + self._frontier()

    def pin(self, epoch: int) -> None:
        self.t.zero_()
        self.t[0] = epoch

    def begin(self, worker: Optional[int] = None, workers: int = 1) -> tuple[int, int, int]:
        """Claim the epoch a new iteration starts at (`worker` of a `workers`-worker DataLoader, or
        None: the main process): `(epoch, base, index of the slot's "next" entry)`."""
        base = int(self.t[0])
        if worker is None:
            rel, index = self._frontier(), 1
        else:
            if workers > MAX_WORKERS:
                raise ConfigError(f"D3Dataset counts epochs for DataLoaders of at most {MAX_WORKERS} workers, "
                                  f"not {workers}; use fewer num_workers")
            slots = self._slots()
            lo = (workers - 1) * workers // 2
            mine = slots[lo:lo + workers]
            run = int(mine[worker, 0])
            rel = self._frontier(skip=workers)
            if run > 0:
                rel = max(rel, int(mine[:, 1 + (run - 1) % 2].max()))
            mine[worker, 0] = run + 1
            index = 2 + 3 * (lo + worker) + 1 + run % 2
        self.t[index] = rel + 1
        return base + rel, base, index

    def reached(self, epoch: int, base: int, index: int) -> None:
        """An endless iteration claimed with `base` moved on to `epoch`."""
        if int(self.t[0]) == base:  # not pinned since
            self.t[index] = max(int(self.t[index]), epoch - base + 1)


class D3Dataset(IterableDataset):
    """Training batches `(images, labels)` decoded on `device` from a `.d3` file (path or `D3File`).

    Iterating yields one epoch of this rank's batches (forever with `endless=True`), and each new
    iteration is the next epoch, with fresh draws (`epoch`, `set_epoch`; module docstring). The
    stream is fixed by the seed: the same arguments draw the same sequence of epochs in every run,
    and ranks given the same seed split each epoch into disjoint parts (no sampler needed).

    Training for a fixed number of optimizer steps: pass `endless=True` and
    `epoch_size=batch_size * world_size` (`batch_size` in one process), and stop after N batches:

        ds = D3Dataset(path, batch_size=256, epoch_size=256, endless=True, augment=True)
        for step, (images, labels) in zip(range(num_steps), ds):
            ...

    Every epoch is then exactly one full batch per rank, and consecutive epochs walk through every
    component of every class in turn (see the module docstring), so no step gets a short batch and
    no sample is skipped. The default epoch (whole rounds) usually ends in a smaller batch, and
    `drop_last=True` would drop those samples instead.

    `len(ds)` counts the batches this rank yields per epoch (what `DataLoader(ds, batch_size=None)`
    and progress bars read) and `ds[i]` is the i-th of them in the next iteration; `ds.sample(i)`
    is one position of the epoch, `(image, label)`.

    Args:
        batch_size: samples per batch (the last batch of an epoch may be smaller unless `drop_last`).
        device: "auto" (CUDA when `torch.cuda.is_available()`, else the CPU), "cpu", "cuda" or "cuda:N".
        seed: fixes the whole stream (with epoch, batch size, device).
        mode: "mixed" (mean images and random draws, as the paper evaluates), "random" or "mean".
        class_weights: N non-negative weights: classes are drawn with these probabilities instead
            of balanced rounds.
        epoch_size: samples per epoch over all ranks (default: one round, 2 N K for mixed and N K
            otherwise, or the fewest whole rounds that fill `batch_size` samples on each rank).
        endless: iterate forever (epoch after epoch from the next one) instead of one epoch.
        augment: True for DSA (`d3codec.augment.DSA()`), or any `aug(x, generator) -> x`.
        denormalize: images in [0, 1] instead of the file's `(p - mean) / std`.
        labels: "file" (soft probabilities if the file has them) or "hard" (int64 class ids).
        options: `DecodeOptions(precision, channels_last, compile, fold_bn, stem_matmul)`, how the
            decoders run (speed, not which images; channels-last and BatchNorm folding on by
            default, the stem as matmuls on CPU, compile off, "fp32"; "bf16" autocast changes
            pixels by about 1e-2, "fp16" by about 1e-3).
        precision, channels_last, compile, fold_bn, stem_matmul: the same options as keywords
            (build `options`; give them one way or the other, not both).
        rank, world_size: override what `torch.distributed` says.

    Attributes:
        d3: the loaded `D3File` (the one passed in, or loaded from the path). Its `metadata` has
            what a training script needs besides batches: `num_classes`, `class_names`,
            `image_shape` (C, H, W) for the network, `mean` and `std` to normalise real test
            images into the pixel space the batches are in; `labels.kind` says whether labels
            are soft or hard.
        source: the path the file was loaded from (None when a `D3File` was passed).
        num_classes: N, the classes of the file (and the width of soft labels).
        batch_size, seed, mode: as passed; device: the resolved `torch.device` ("auto" made concrete).
        options: the `DecodeOptions` in use.
        stream: the deterministic sample order (`d3codec.decode.stream.Stream`): what each
            position of each epoch draws and which positions each rank's batches hold.
        epoch: the epoch the next iteration starts at: 0 at first, then one past the last epoch
            an iteration (here or in a DataLoader worker) began; `set_epoch(e)` (or assigning it)
            pins it. `latents`, `batch`, `ds[i]` and `sample` default to it.
        epoch_size, rank, world_size, shard_size: the epoch over all ranks and this rank's part of
            it (properties; the defaults follow `torch.distributed` when read, see above).

    Other attributes are implementation details.
    """

    def __init__(self, source: Union[str, os.PathLike, D3File], batch_size: int = 256,
                 device: Union[str, torch.device] = "auto", seed: int = 0, mode: str = "mixed",
                 class_weights: Optional[Sequence[float]] = None, epoch_size: Optional[int] = None,
                 augment: Union[bool, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = False,
                 denormalize: bool = False, *, labels: str = "file", endless: bool = False,
                 drop_last: bool = False, options: Optional[DecodeOptions] = None, precision: str = "fp32",
                 channels_last: Optional[bool] = None, compile: bool = False, fold_bn: bool = True,
                 stem_matmul: Optional[bool] = None, rank: Optional[int] = None,
                 world_size: Optional[int] = None) -> None:
        super().__init__()
        speed = DecodeOptions(precision=precision, channels_last=channels_last, compile=compile, fold_bn=fold_bn,
                              stem_matmul=stem_matmul)
        if options is not None and speed != _SPEED_DEFAULTS:
            raise ConfigError("pass the speed options (precision, channels_last, compile, fold_bn, stem_matmul) "
                              "either in options=DecodeOptions(...) or as keywords, not both")
        if options is not None and not isinstance(options, DecodeOptions):
            raise ConfigError(f"options must be a DecodeOptions, not {type(options).__name__}")
        if isinstance(source, D3File):
            d3, self.source = source, None
        else:
            d3, self.source = load(source), os.fspath(source)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if labels not in ("file", "hard"):
            raise ConfigError(f"labels must be 'file' or 'hard', not {labels!r}")
        if epoch_size is not None and (isinstance(epoch_size, bool) or not isinstance(epoch_size, int) or epoch_size < 1):
            raise ConfigError(f"epoch_size must be a positive integer or None, got {epoch_size!r}")
        if world_size is not None and (isinstance(world_size, bool) or not isinstance(world_size, int)
                                       or world_size < 1):
            raise ConfigError(f"world_size must be a positive integer or None, got {world_size!r}")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
            raise ConfigError(f"rank must be a non-negative integer or None, got {rank!r}")
        self.d3, self.device = d3, check_device(device)
        self.batch_size, self.seed, self.mode = batch_size, int(seed), mode
        self.endless, self.drop_last, self.denormalize = endless, drop_last, denormalize
        self.options = options if options is not None else speed
        self._clock = EpochClock()
        self._rank, self._world = rank, world_size
        self.priors = PriorTensors.from_priors(d3.priors, self.device)
        n, k = self.priors.num_classes, self.priors.latents_per_class
        if n != d3.metadata.num_classes:
            raise ConfigError(f"the priors hold {n} classes but the metadata {d3.metadata.num_classes}; "
                              "the file is inconsistent: re-encode it")
        self.num_classes, self.latents_per_class = n, k
        self.stream = Stream(self.priors, self.device, seed=self.seed, mode=mode, batch_size=batch_size,
                             epoch_size=epoch_size, class_weights=class_weights, drop_last=drop_last)
        self.renderer = self.options.renderer(d3, self.device)
        self.output = OutputSpace(d3.metadata, denormalize=denormalize, device=self.device)
        self.labels = LabelTable(d3.labels, n, self.device, hard=labels == "hard")
        self.augment: Optional[Callable[..., torch.Tensor]] = DSA() if augment is True else (augment or None)

    @property
    def round(self) -> int:
        """Slots per round: every component once (twice in mixed mode: its mean and one draw)."""
        return self.stream.round

    @property
    def class_cdf(self) -> Optional[torch.Tensor]:
        """The cumulative class distribution of `class_weights` (None: balanced rounds)."""
        return self.stream.class_cdf

    # ---- ranks, sizes, epochs ----

    def _rank_world(self) -> tuple[int, int]:
        """(rank, world size): the overrides, else `torch.distributed`'s now (not at construction)."""
        dist_rank, dist_world = _dist_rank_world()
        rank = self._rank if self._rank is not None else dist_rank
        world = self._world if self._world is not None else dist_world
        if rank >= world:  # checked here: a rank given alone is valid once the process group exists
            raise ConfigError(f"rank {rank} is not below the world size {world}; pass rank and world_size "
                              "together, or neither under torch.distributed")
        return rank, world

    def __getstate__(self) -> dict[str, Any]:
        """Pickle with the current rank and world size when a process group exists: a DataLoader
        worker started by spawn unpickles the dataset in a process without one, and would
        otherwise draw rank 0's part of a one-rank epoch on every rank."""
        state = self.__dict__.copy()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            state["_rank"], state["_world"] = self._rank_world()
        return state

    @property
    def rank(self) -> int:
        """This process's rank: `rank` if given, else `torch.distributed`'s (0 without a process group)."""
        return self._rank_world()[0]

    @property
    def world_size(self) -> int:
        """Ranks sharing the stream: `world_size` if given, else `torch.distributed`'s (1 without one)."""
        return self._world if self._world is not None else _dist_rank_world()[1]

    @property
    def epoch_size(self) -> int:
        """Positions per epoch over all ranks: `epoch_size` if given, else the fewest whole rounds
        that fill one batch on each of the `world_size` ranks (so it follows the world size)."""
        return self.stream.sizes(self.world_size)[0]

    @property
    def shard_size(self) -> int:
        """Samples this rank draws per epoch (ceil(epoch_size / world_size))."""
        return self.stream.sizes(self.world_size)[1]

    def __len__(self) -> int:
        """Batches this rank yields per epoch: the indices `ds[i]` takes are `range(len(ds))`
        (and -len(ds) .. -1). An endless stream has no length."""
        if self.endless:
            raise TypeError("an endless D3Dataset has no length; pass endless=False for epochs")
        return self.stream.num_batches(self.world_size)

    @property
    def epoch(self) -> int:
        """The epoch the next iteration starts at: 0 for a new dataset, one past the last epoch any
        iteration began (in this process or its DataLoader workers), or what `set_epoch` pinned."""
        return self._clock.epoch

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """The next iteration uses epoch `epoch`, and later ones `epoch + 1`, ... (as
        `DistributedSampler.set_epoch`: a loop that calls it before every epoch gets exactly that epoch)."""
        try:
            e = -1 if isinstance(epoch, bool) else operator.index(epoch)
        except TypeError:
            e = -1
        if e < 0:
            raise ConfigError(f"epoch must be a non-negative integer, got {epoch!r}")
        self._clock.pin(e)

    # ---- batches ----

    def latents(self, start: int, stop: int, epoch: Optional[int] = None) -> Draw:
        """Classes, components and latents of global positions [start, stop) of `epoch` (default
        `self.epoch`, the next iteration's); positions past `epoch_size` wrap around (padding)."""
        epoch = self.epoch if epoch is None else epoch
        return self.stream.draw(start, stop, epoch, self.world_size)

    def decode(self, draw: Draw) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (in the output space) and labels of drawn latents."""
        values = self.renderer(draw.z, draw.classes)
        return self.output(values), self.labels.lookup(draw.classes, draw.comps)

    def batch(self, start: int, stop: int, epoch: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of global positions [start, stop) of `epoch`, augmented if asked."""
        epoch = self.epoch if epoch is None else epoch
        images, labels = self.decode(self.latents(start, stop, epoch))
        if self.augment is not None:
            gen = torch.Generator(device=self.device).manual_seed(self.stream.augment_seed(epoch, start))
            images = self.augment(images, gen)
        return images, labels

    def _epoch_batches(self, epoch: int, bounds: list[tuple[int, int]],
                       offset: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of `epoch` that fall to this DataLoader worker: the batches of the iteration
        are dealt round-robin, `offset` being how many earlier epochs of an endless one dealt."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for j, (start, stop) in enumerate(bounds):
            if (offset + j) % workers == worker:
                yield self.batch(start, stop, epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches of the next epoch (see `epoch`), and of the ones after it if endless."""
        info = get_worker_info()
        claim = self._clock.begin(*((info.id, info.num_workers) if info is not None else ()))
        return self._epochs(*claim)

    def _epochs(self, epoch: int, base: int, index: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        bounds = self.stream.batches(*self._rank_world())
        if self.endless and not bounds:
            raise ConfigError(f"this endless D3Dataset yields no batches: each rank's {self.shard_size} samples "
                              f"per epoch are fewer than batch_size={self.batch_size} with drop_last; raise "
                              "epoch_size or lower batch_size")
        dealt = 0  # an endless iteration deals its batches across epochs, so every worker gets its turn
        while True:
            yield from self._epoch_batches(epoch, bounds, dealt)
            if not self.endless:
                return
            dealt += len(bounds)
            epoch += 1
            self._clock.reached(epoch, base, index)

    # ---- map-style access ----

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The `index`-th batch the next iteration yields on this rank, augmentation included:
        `(images, labels)`; `index` runs over `len(ds)` batches (negative counts from the end), or
        on into the following epochs for an endless stream. Reading does not advance the epoch."""
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"D3Dataset indices are integers, not {type(index).__name__}")
        bounds = self.stream.batches(*self._rank_world())
        n = len(bounds)
        if self.endless:
            if index < 0 or n == 0:
                raise IndexError(f"batch {index} of an endless D3Dataset: index from 0 (an endless stream has no end)")
            epoch, j = self.epoch + index // n, index % n
        else:
            epoch, j = self.epoch, index + n if index < 0 else index
            if not 0 <= j < n:
                raise IndexError(f"batch {index} is out of range: this rank yields {n} batches per epoch")
        return self.batch(*bounds[j], epoch)

    @property
    def num_samples(self) -> int:
        """Positions per epoch (valid `sample(i)` positions are 0 .. num_samples - 1)."""
        return self.epoch_size

    def sample(self, index: int, epoch: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Position `index` of `epoch` (default `self.epoch`, the next iteration's) over all ranks,
        not augmented: `(image [C, H, W], label)`, deterministic; negative counts from the end."""
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"D3Dataset positions are integers, not {type(index).__name__}")
        size = self.epoch_size
        i = index + size if index < 0 else index
        if not 0 <= i < size:
            raise IndexError(f"position {index} is out of range for an epoch of {size} samples")
        images, labels = self.decode(self.latents(i, i + 1, epoch))
        return images[0], labels[0]

    def __repr__(self) -> str:
        src = self.source or self.d3.metadata.name
        return (f"D3Dataset({src!r}, batch_size={self.batch_size}, device={str(self.device)!r}, seed={self.seed}, "
                f"mode={self.mode!r}, epoch_size={self.epoch_size})")
