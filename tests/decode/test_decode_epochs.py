"""Each new iteration over a `D3Dataset` draws the next epoch (as FFCV's Loader), in a plain loop, through
DataLoader workers (fork and spawn, persistent or not) and across loaders; `set_epoch` pins an epoch."""
from __future__ import annotations

import copy
import itertools
import pickle

import pytest
import torch
from torch.utils.data import DataLoader

from d3codec.decode import D3Dataset
from d3codec.errors import ConfigError


def _epoch(ds: D3Dataset) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The batches of one iteration: (images, labels)."""
    xs, ys = zip(*list(ds))
    return list(xs), list(ys)


def _reference(d3, epoch: int, **kwargs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Epoch `epoch` of a fresh dataset, pinned with set_epoch, drawn in this process."""
    ds = D3Dataset(d3, **kwargs)
    ds.set_epoch(epoch)
    return _epoch(ds)


def _same(got: tuple[list, list], want: tuple[list, list], exact: bool = True) -> bool:
    """Same batches: labels exactly; images exactly in one process, within float rounding across processes."""
    (gx, gy), (wx, wy) = got, want
    close = torch.equal if exact else (lambda a, b: torch.allclose(a, b, atol=1e-5))
    return len(gx) == len(wx) and all(torch.equal(a, b) for a, b in zip(gy, wy)) and \
        all(close(a, b) for a, b in zip(gx, wx))


KW = {"batch_size": 4, "seed": 3, "labels": "hard", "mode": "random"}


def test_each_iteration_draws_the_next_epoch_and_a_new_dataset_repeats_the_sequence(make_d3) -> None:
    d3 = make_d3("small", num_classes=4, k=2)
    ds = D3Dataset(d3, **KW)
    assert ds.epoch == 0
    epochs = [_epoch(ds) for _ in range(3)]
    assert ds.epoch == 3
    for e, got in enumerate(epochs):
        assert _same(got, _reference(d3, e, **KW))
    assert not torch.equal(torch.cat(epochs[0][0]), torch.cat(epochs[1][0]))  # fresh draws
    again = D3Dataset(d3, **KW)  # the same seed: the same sequence of epochs
    assert all(_same(_epoch(again), got) for got in epochs)


def test_set_epoch_pins_the_next_iteration_and_later_ones_follow_it(make_d3) -> None:
    d3 = make_d3("small", num_classes=4, k=2)
    ds = D3Dataset(d3, **KW)
    _epoch(ds), _epoch(ds)
    ds.set_epoch(0)  # the DistributedSampler pattern: exactly epoch e, every time
    assert ds.epoch == 0 and _same(_epoch(ds), _reference(d3, 0, **KW))
    ds.set_epoch(0)
    assert _same(_epoch(ds), _reference(d3, 0, **KW))
    ds.set_epoch(5)
    assert _same(_epoch(ds), _reference(d3, 5, **KW)) and ds.epoch == 6
    ds.epoch = 2  # assigning the attribute pins too
    assert _same(_epoch(ds), _reference(d3, 2, **KW))
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ConfigError, match="epoch must be a non-negative integer"):
            ds.set_epoch(bad)


def test_breaking_early_endless_streams_and_concurrent_iterators(make_d3) -> None:
    d3 = make_d3("small", num_classes=4, k=2)  # random mode: an epoch is 8 samples, 2 batches of 4
    ds = D3Dataset(d3, **KW)
    first = next(iter(ds))  # an iteration broken after one batch still used epoch 0
    assert ds.epoch == 1 and _same(_epoch(ds), _reference(d3, 1, **KW))
    a, b = iter(ds), iter(ds)  # two iterators at once: epochs 2 and 3, claimed when created
    assert _same(_epoch(b), _reference(d3, 3, **KW)) and _same(_epoch(a), _reference(d3, 2, **KW))
    assert torch.equal(first[1], _reference(d3, 0, **KW)[1][0])

    endless = D3Dataset(d3, **KW, endless=True)
    got = list(itertools.islice(endless, 5))  # epochs 0, 1 and the first batch of 2
    assert endless.epoch == 3  # the next iteration starts after every epoch the stream began
    assert torch.equal(next(iter(endless))[1], _reference(d3, 3, **KW)[1][0])
    assert torch.equal(got[4][1], _reference(d3, 2, **KW)[1][0])


def test_copies_count_their_own_epochs(make_d3) -> None:
    d3 = make_d3("small", num_classes=4, k=2)
    ds = D3Dataset(d3, **KW)
    _epoch(ds)
    for clone in (pickle.loads(pickle.dumps(ds)), copy.deepcopy(ds)):
        assert clone.epoch == 1 and _same(_epoch(clone), _reference(d3, 1, **KW))
        assert clone.epoch == 2 and ds.epoch == 1  # the original has not moved
        assert clone._clock.t.is_shared()  # its own DataLoader workers can still advance it


def test_a_dataloader_in_the_main_process_is_a_new_iteration(make_d3) -> None:
    d3 = make_d3("small", num_classes=4, k=2)
    ds = D3Dataset(d3, **KW)
    _epoch(ds)
    loaded = _epoch(DataLoader(ds, batch_size=None))
    assert _same(loaded, _reference(d3, 1, **KW)) and ds.epoch == 2


@pytest.mark.parametrize("context,persistent", [("fork", False), ("fork", True), ("spawn", False)])
def test_dataloader_workers_draw_the_next_epoch_each_epoch(make_d3, context: str, persistent: bool) -> None:
    """Two workers split each epoch's batches; every DataLoader epoch is the next epoch of the
    stream (fresh worker processes, or persistent ones), the batches those of the main process."""
    d3 = make_d3("small", num_classes=4, k=3)  # random mode: 12 samples, 3 batches of 4
    ds = D3Dataset(d3, **KW)
    loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context=context,
                        persistent_workers=persistent)
    for e in range(2):
        assert _same(_epoch(loader), _reference(d3, e, **KW), exact=False), f"DataLoader epoch {e}"
    assert ds.epoch == 2
    if context == "fork":
        ds.set_epoch(7)  # seen by the workers (shared memory), persistent or not
        assert _same(_epoch(loader), _reference(d3, 7, **KW), exact=False)
        # a loader with another number of workers, then the main process, carry on from there
        assert _same(_epoch(DataLoader(ds, batch_size=None, num_workers=1)), _reference(d3, 8, **KW), exact=False)
        assert _same(_epoch(loader), _reference(d3, 9, **KW), exact=False)
        assert _same(_epoch(ds), _reference(d3, 10, **KW))


def test_more_workers_than_the_counters_serve_is_a_clear_error(make_d3, monkeypatch) -> None:
    from d3codec.decode import dataset as dataset_mod
    from torch.utils.data import _utils

    ds = D3Dataset(make_d3("small"), **KW)
    info = _utils.worker.WorkerInfo(id=0, num_workers=dataset_mod.MAX_WORKERS + 1, seed=0, dataset=ds)
    monkeypatch.setattr(dataset_mod, "get_worker_info", lambda: info)
    with pytest.raises(ConfigError, match=f"at most {dataset_mod.MAX_WORKERS} workers"):
        iter(ds)


@pytest.mark.parametrize("workers", [2, 4])
def test_endless_streams_through_workers_keep_the_order_of_one_process(make_d3, workers: int) -> None:
    """An endless stream's batches are dealt to the workers across epochs: 3 batches per epoch
    split over 2 workers keep their order, and 4 workers (more than the batches) do not hang."""
    d3 = make_d3("small", num_classes=4, k=3)  # random mode: 12 samples, 3 batches of 4 per epoch
    want = list(itertools.islice(D3Dataset(d3, **KW, endless=True), 8))
    loader = DataLoader(D3Dataset(d3, **KW, endless=True), batch_size=None, num_workers=workers,
                        multiprocessing_context="fork", timeout=60)
    got = list(itertools.islice(loader, 8))
    assert _same((*zip(*got),), (*zip(*want),), exact=False)
