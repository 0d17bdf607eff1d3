"""How the datamodule's batches are read: whole batches of one view (a client split, the pooled data, a
global test condition) at once, and one pool of DataLoader workers shared by every view."""

from __future__ import annotations

from collections.abc import Hashable, Iterator

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from fedilora.data.errors import DataError
from fedilora.data.source import MultimodalData


class Batches(Dataset):
    """Whole batches indexed at once (the sampler yields index lists), so a batch costs one gather
    per field rather than a Python collate over samples.

    Images held in a tensor are gathered as they are. Images from an ``ImageStore`` (decoded from
    files) are decoded only for the samples whose image is present: the model never looks at the
    pixels of a missing image (``zero`` multiplies them by 0, ``learned`` replaces the embedding), so
    those stay zero and cost no decoding.

    An image that fails to decode raises a ``DataError`` naming the sample's file and line and
    ``context`` (which client split or test set read it).
    """

    def __init__(
        self,
        data: MultimodalData,
        tokens: Tensor,
        index: Tensor,
        image_present: Tensor,
        text_present: Tensor,
        context: str = "",
    ):
        self.data, self.tokens, self.index = data, tokens, index
        self.image_present, self.text_present = image_present, text_present
        self.context = context

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, positions: list[int]) -> dict[str, Tensor]:
        positions = torch.as_tensor(positions, dtype=torch.long)
        rows = self.index[positions]
        image_present = self.image_present[positions]
        return {
            "image": self._images(rows, image_present),
            "tokens": self.tokens[rows],
            "label": self.data.labels[rows],
            "image_present": image_present,
            "text_present": self.text_present[positions],
        }

    def _images(self, rows: Tensor, present: Tensor) -> Tensor:
        images = self.data.images
        if isinstance(images, Tensor):
            return images[rows]
        try:
            decoded = images[rows if bool(present.all()) else rows[present]]
        except DataError as err:
            raise DataError(f"{self.context}: {err}" if self.context else str(err)) from None
        if bool(present.all()):
            return decoded
        out = decoded.new_zeros((len(rows), *decoded.shape[1:]))
        out[present] = decoded
        return out


class _Views(Dataset):
    """Every ``Batches`` view of a datamodule in one dataset, read as ``views[(view, positions)]``: the one
    dataset that a shared pool of DataLoader workers holds (each worker copies it when it starts)."""

    def __init__(self, views: dict[Hashable, Batches]):
        self.views = views

    def __len__(self) -> int:
        return sum(len(v) for v in self.views.values())

    def __getitem__(self, key: tuple[Hashable, list[int]]) -> dict[str, Tensor]:
        view, positions = key
        return self.views[view][positions]


class _Plan(Sampler):
    """The sampler of the shared pool: the ``(view, positions)`` batches of the view being read now."""

    def __init__(self) -> None:
        self.view: Hashable = None
        self.batches: BatchSampler | list = []

    def __iter__(self) -> Iterator[tuple[Hashable, list[int]]]:
        for positions in self.batches:
            yield self.view, positions

    def __len__(self) -> int:
        return len(self.batches)


class WorkerPool:
    """``num_workers`` DataLoader worker processes that decode the batches of every view of one datamodule
    (every client's splits, the pooled splits, the global test set) and live as long as the pool.

    Why one pool shared by all views rather than one persistent DataLoader per client: a round trains a
    handful of clients out of possibly thousands, so per-client loaders would either hold
    ``num_clients * num_workers`` processes or, behind an LRU, miss on almost every client and re-spawn
    anyway. One pool costs ``num_workers`` processes whatever the number of clients, is started once per
    run, and its workers' image caches (``ImageFiles``) serve every client.

    Reads happen one at a time (the main process trains or evaluates one view at a time); a read started
    while another is unfinished ends the unfinished one: reading it further raises ``RuntimeError``.
    Shuffling stays in the main process (the sampler runs there, with the caller's generator), so the
    batches are those of ``num_workers: 0`` whatever the workers.

    The workers copy the data when they start (at the first read): data changed in the main process after
    that is not seen by them.
    """

    def __init__(self, views: dict[Hashable, Batches], num_workers: int) -> None:
        self.views = views
        self.plan = _Plan()
        self.loader = DataLoader(
            _Views(views), sampler=self.plan, batch_size=None, num_workers=num_workers, persistent_workers=True
        )
        self.reads = 0  # reads started; counts the resets of the workers' iterator (the benchmark reports it)
        self.starts = 0  # times the worker processes were started

    def read(self, view: Hashable, batches: BatchSampler) -> Iterator[dict[str, Tensor]]:
        self.reads += 1
        token = self.reads
        self.plan.view, self.plan.batches = view, batches
        if self.loader._iterator is None:
            self.starts += 1
        else:
            # A fresh DataLoader iterator draws its workers' base seed from the global RNG; a persistent one
            # draws it only when it starts. Draw it here too, so that the global RNG (dropout, ...) is where
            # a run with num_workers: 0 leaves it and results do not depend on the workers.
            torch.empty((), dtype=torch.int64).random_()
        iterator = iter(self.loader)  # starts the workers, or resets them (drops what they prefetched)
        return self._batches(iterator, token)

    def _batches(self, iterator: Iterator, token: int) -> Iterator[dict[str, Tensor]]:
        while True:
            if self.reads != token:
                raise RuntimeError(
                    "two reads of the datamodule's DataLoader workers interleave: another loader was started "
                    "before this one was read to its end; read the loaders one after the other"
                )
            try:
                batch = next(iterator)
            except StopIteration:
                return
            yield batch

    def close(self) -> None:
        """Stop the worker processes (they also stop with the pool or the main process)."""
        iterator = self.loader._iterator
        if iterator is not None:
            iterator._shutdown_workers()
            self.loader._iterator = None


class PoolLoader:
    """One view's batches read through the datamodule's ``WorkerPool``: what the datamodule's loaders are
    when ``num_workers > 0``. Sized and iterable like a DataLoader; each ``iter()`` is one pass."""

    def __init__(self, pool: WorkerPool, view: Hashable, batches: BatchSampler | list[list[int]]) -> None:
        self.pool, self.view, self.batches = pool, view, batches
        self.dataset = pool.views[view]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self.pool.read(self.view, self.batches)
