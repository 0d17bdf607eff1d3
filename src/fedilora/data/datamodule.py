"""The federated datamodule: one dataset partitioned over clients, with missing-modality dropout."""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Literal

import lightning as L
import open_clip
import torch
from jsonargparse import lazy_instance
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from fedilora.backbone import TINY_MODEL, register_model_configs
from fedilora.data.duplicates import count_copies
from fedilora.data.errors import DataError
from fedilora.data.loaders import Batches, PoolLoader, WorkerPool
from fedilora.data.missing import MissingKind, missing_masks
from fedilora.data.partition import dirichlet_partition, iid_partition, split_client
from fedilora.data.source import MultimodalData, MultimodalSource
from fedilora.data.synthetic import SyntheticBenchmark
from fedilora.data.tokens import CHARS_PER_TOKEN as CHARS_PER_TOKEN  # re-exported: imported from here
from fedilora.data.tokens import tokenize_texts
from fedilora.data.tokens import tokenizer_input as tokenizer_input
from fedilora.errors import ConfigError

log = logging.getLogger("fedilora.data")

Split = Literal["train", "val", "test"]
Condition = Literal["complete", "image_only", "text_only", "missing"]
CONDITIONS: tuple[Condition, ...] = ("complete", "image_only", "text_only")


class FederatedDataModule(L.LightningDataModule):
    """Partitions one multimodal dataset over clients and drops modalities per client.

    Args:
        dataset: The dataset (default: the embedded synthetic benchmark).
        num_clients: Number of clients the training pool is partitioned over.
        partition: ``iid`` (equal random shares) or ``dirichlet`` (label skew with ``dirichlet_alpha``).
        dirichlet_alpha: Concentration of the Dirichlet label skew; smaller is more skewed.
        missing_rate: Fraction of each client's train/val samples missing a modality: one value for
            all clients or one per client.
        missing_kind: Which modality goes missing: ``image``, ``text`` or ``both`` (each incomplete
            sample loses the image or the text with equal probability, never both); one kind for all
            clients or one per client. An image-only client is ``missing_kind: text`` with
            ``missing_rate: 1.0``; a text-only client is ``image`` with ``1.0``.
        test_missing_rate: Missing rate of the clients' test splits and of the ``missing`` condition of
            the global test set (complete / image-only / text-only are always reported).
        personal_test_missing: ``test_missing_rate`` (default): the clients' test splits lose modalities
            at ``test_missing_rate``; ``own``: each client's test split loses them like its train split
            (its own rate and kind), so personalized accuracy is measured on the client's own kind of data.
        val_fraction: Fraction of each client's samples held out for validation.
        test_fraction: Fraction of each client's samples held out for its personalized test.
        batch_size: Local training batch size.
        eval_batch_size: Evaluation batch size.
        tokenizer: open_clip model name whose tokenizer encodes the texts (the CLI links it to
            ``model.model_name``).
        seed: Seed of partitioning, splits and missing masks.
        num_workers: DataLoader worker processes that decode image files in parallel (0: in the main
            process; the embedded benchmark needs none). They are started once, at the first read, and
            serve every client and round (``WorkerPool``); ``teardown()`` stops them.
    """

    def __init__(
        self,
        dataset: MultimodalSource = lazy_instance(SyntheticBenchmark),
        num_clients: int = 10,
        partition: Literal["iid", "dirichlet"] = "iid",
        dirichlet_alpha: float = 0.5,
        missing_rate: float | list[float] = 0.0,
        missing_kind: MissingKind | list[MissingKind] = "both",
        test_missing_rate: float = 0.0,
        personal_test_missing: Literal["test_missing_rate", "own"] = "test_missing_rate",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        batch_size: int = 32,
        eval_batch_size: int = 256,
        tokenizer: str = TINY_MODEL,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if num_clients < 1:
            raise ConfigError(f"data.num_clients: must be >= 1, got {num_clients}")
        if partition not in ("iid", "dirichlet"):
            raise ConfigError(f"data.partition: unknown {partition!r}; allowed: iid, dirichlet")
        kinds = [missing_kind] * num_clients if isinstance(missing_kind, str) else list(missing_kind)
        for client, kind in enumerate(kinds):
            if kind not in ("image", "text", "both"):
                where = "" if isinstance(missing_kind, str) else f" (client {client})"
                raise ConfigError(f"data.missing_kind: unknown {kind!r}{where}; allowed: image, text, both")
        if len(kinds) != num_clients:
            raise ConfigError(
                f"data.missing_kind: {len(kinds)} kinds given for {num_clients} clients; "
                "give one kind or one per client"
            )
        rates = [missing_rate] * num_clients if isinstance(missing_rate, (int, float)) else list(missing_rate)
        if len(rates) != num_clients:
            raise ConfigError(
                f"data.missing_rate: {len(rates)} rates given for {num_clients} clients; "
                "give one value or one per client"
            )
        if personal_test_missing not in ("test_missing_rate", "own"):
            raise ConfigError(
                f"data.personal_test_missing: unknown {personal_test_missing!r}; allowed: test_missing_rate, own"
            )
        for name, values in (("missing_rate", rates), ("test_missing_rate", [test_missing_rate])):
            for value in values:
                if not 0.0 <= value <= 1.0:
                    raise ConfigError(f"data.{name}: {value} is outside [0, 1]")
        if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
            raise ConfigError("data.val_fraction and data.test_fraction must be in [0, 1) and sum to less than 1")
        if batch_size < 1 or eval_batch_size < 1:
            raise ConfigError("data.batch_size and data.eval_batch_size must be >= 1")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers: must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.num_clients = num_clients
        self.partition, self.dirichlet_alpha = partition, dirichlet_alpha
        self.missing_rates = [float(r) for r in rates]
        self.missing_kinds: list[MissingKind] = kinds
        self.test_missing_rate = test_missing_rate
        self.personal_test_missing = personal_test_missing
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.tokenizer, self.seed = tokenizer, seed
        self.num_workers = num_workers
        self.clients: list[dict[Split, tuple[Tensor, Tensor, Tensor]]] = []
        self.skipped: dict[str, int] = {}  # bad samples left out per split (on_bad_sample: skip)
        self.duplicates: dict[str, int] = {}  # evaluation samples that copy a training sample (setup)
        self.class_counts: dict[str, Tensor] = {}  # samples per class of "train" (the pool) and "test" (setup)
        self._pool: WorkerPool | None = None  # the DataLoader workers (num_workers > 0), started at the first read

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def task(self) -> str:
        return self.dataset.task

    def setup(self, stage: str | None = None) -> None:
        if self.clients:
            return
        pool, test = self.dataset.load()
        self.skipped = dict(getattr(self.dataset, "skipped", {}))
        self._require_two_classes(pool)
        register_model_configs()
        tokenize = open_clip.get_tokenizer(self.tokenizer)
        self.pool, self.test = pool, test
        self.pool_tokens, self.test_tokens = tokenize_texts(tokenize, pool.texts), tokenize_texts(tokenize, test.texts)
        if len(pool) < self.num_clients:
            raise ConfigError(
                f"data.num_clients: {self.num_clients} clients but the training pool has only {len(pool)} samples"
            )
        if self.partition == "iid":
            parts = iid_partition(len(pool), self.num_clients, self.seed)
        else:
            parts = dirichlet_partition(pool.labels, self.num_clients, self.dirichlet_alpha, self.seed)
        for client, part in enumerate(parts):
            splits = split_client(part, self.val_fraction, self.test_fraction, seed=self.seed * 7919 + client)
            if len(splits["train"]) == 0:
                raise ConfigError(
                    f"data.num_clients: client {client} gets no training sample ({len(part)} samples in all); "
                    "use fewer clients, a larger dataset or a milder data.dirichlet_alpha"
                )
            entry = {}
            for k, (split, index) in enumerate(splits.items()):
                own = split != "test" or self.personal_test_missing == "own"
                rate = self.missing_rates[client] if own else self.test_missing_rate
                kind = self.missing_kinds[client]
                masks = missing_masks(len(index), rate, kind, seed=(self.seed * 7919 + client) * 4 + k)
                entry[split] = (index, *masks)
            self.clients.append(entry)
        # the global "missing" condition: the kind of the clients when they all share one, else both
        kind = self.missing_kinds[0] if len(set(self.missing_kinds)) == 1 else "both"
        self.test_masks = missing_masks(len(test), self.test_missing_rate, kind, seed=self.seed * 7919 - 1)
        self.duplicates = self._count_duplicates()
        self.class_counts = {split: _class_counts(data.labels, self.num_classes) for split, data in
                             (("train", pool), ("test", test))}  # fmt: skip

    def class_names(self) -> list[str]:
        """The dataset's class names (``classes``), else the class indices as strings."""
        names = getattr(self.dataset, "classes", None)
        count = len(next(iter(self.class_counts.values()))) if self.class_counts else self.num_classes
        return [str(n) for n in names] if names and len(names) == count else [str(k) for k in range(count)]

    def majority(self) -> tuple[str, float] | None:
        """The most frequent class of the global test set and its share: the accuracy of predicting it for
        every sample, the most any one-class predictor scores. None for multi-label data (after setup)."""
        counts = self.class_counts.get("test")
        if counts is None or self.task == "multilabel" or int(counts.sum()) == 0:
            return None
        top = int(counts.argmax())
        return self.class_names()[top], float(counts[top]) / float(counts.sum())

    def class_summary(self, with_train: bool = True, shown: int = 10) -> str:
        """One line: samples per class of the training pool and the global test set, largest first (the
        ``shown`` largest; a multi-label sample counts for each of its labels), and the majority share."""
        names, train, test = self.class_names(), self.class_counts["train"], self.class_counts["test"]
        order = sorted(range(len(names)), key=lambda k: (-int(train[k]), k))
        if with_train:
            head = f"classes (training pool {len(self.pool)} / global test {len(self.test)} samples): "
            cells = [f"{names[k]} {int(train[k])}/{int(test[k])}" for k in order[:shown]]
        else:  # under differential privacy: nothing about the clients' data
            head = f"classes (global test, {len(self.test)} samples): "
            cells = [f"{names[k]} {int(test[k])}" for k in order[:shown]]
        more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
        majority = self.majority()
        share = f"; majority class {majority[0]!r}: {majority[1]:.1%} of the global test set" if majority else ""
        return head + ", ".join(cells) + more + share

    def _require_two_classes(self, pool: MultimodalData) -> None:
        """A training pool of one class trains nothing and breaks the metrics: stop at setup instead."""
        name = type(self.dataset).__name__
        if self.task != "binary" and self.num_classes < 2:
            raise DataError(f"{name}: {self.num_classes} class; a classifier needs at least 2")
        labels = pool.labels
        present = labels.unique().numel() if labels.dim() == 1 else int((labels.sum(dim=0) > 0).sum())
        if present < 2:
            if labels.dim() == 1:
                label = int(labels[0])
                classes = getattr(self.dataset, "classes", None)
                what = f"the label {label}" + (f" ({classes[label]!r})" if classes else "")
            else:
                what = f"{present} label(s) in all"
            raise DataError(
                f"{name}: every one of the {len(pool)} training samples has {what}; a classifier needs samples of "
                "at least 2 classes (check the label column and data.dataset.classes)"
            )

    def _count_duplicates(self) -> dict[str, int]:
        """Count (and warn about) evaluation samples that are exact copies of training samples."""
        train = torch.cat([entry["train"][0] for entry in self.clients])
        held = torch.cat([torch.cat([entry["val"][0], entry["test"][0]]) for entry in self.clients])
        everything = torch.arange(len(self.pool))
        counts = {
            "global_test": count_copies(self.pool, everything, self.test, torch.arange(len(self.test))),
            "global_test_total": len(self.test),
            "client_eval": count_copies(self.pool, train, self.pool, held),
            "client_eval_total": len(held),
        }
        if counts["global_test"]:
            log.warning(
                "duplicates: %d of the %d global test samples are exact copies (same image bytes and text) of "
                "samples in the clients' data; global test metrics overstate generalisation",
                counts["global_test"],
                counts["global_test_total"],
            )
        if counts["client_eval"]:
            log.warning(
                "duplicates: %d of the %d client validation/test samples are exact copies (same image bytes and "
                "text) of client training samples; personalized metrics overstate generalisation",
                counts["client_eval"],
                counts["client_eval_total"],
            )
        return counts

    # ---------------------------------------------------------------------------- client views
    def num_train_samples(self, client: int) -> int:
        return len(self.clients[client]["train"][0])

    def client_dataloader(
        self, client: int, split: Split, generator: torch.Generator | None = None
    ) -> DataLoader | PoolLoader:
        """Client ``client``'s ``split``; training batches are shuffled with ``generator``."""
        return self._loader(("client", client, split), split, generator)

    def global_test_dataloader(
        self, condition: Condition = "complete", shard: tuple[int, int] = (0, 1)
    ) -> DataLoader | PoolLoader:
        """The global test set with every sample in ``condition``: ``complete``, ``image_only``,
        ``text_only``, or ``missing`` (the masks of ``test_missing_rate``).

        ``shard=(i, n)``: only the ``i``-th of ``n`` contiguous runs of the whole set's batches (one per
        process), without padding: the shards' batches are exactly the whole set's, each sample once.
        """
        part, parts = shard
        if not 0 <= part < parts:
            raise ValueError(f"shard {part} of {parts}: needs 0 <= shard < number of shards")
        return self._loader(("global_test", condition), "test", None, shard)

    def conditions(self) -> tuple[Condition, ...]:
        return (*CONDITIONS, "missing") if self.test_missing_rate > 0 else CONDITIONS

    def _view(self, view: Hashable) -> Batches:
        """The ``Batches`` of ``("client", k, split)``, ``("global_test", condition)`` or ``("pooled", split)``."""
        if view[0] == "client":
            _, client, split = view
            index, image_present, text_present = self.clients[client][split]
            return Batches(
                self.pool, self.pool_tokens, index, image_present, text_present, f"client {client}'s {split} split"
            )
        if view[0] == "global_test":
            condition = view[1]
            n = len(self.test)
            if condition == "missing":
                image_present, text_present = self.test_masks
            else:
                image_present = torch.full((n,), condition != "text_only")
                text_present = torch.full((n,), condition != "image_only")
            return Batches(
                self.test, self.test_tokens, torch.arange(n), image_present, text_present, "the global test set"
            )
        return self._pooled(view[1])

    def _every_view(self) -> dict[Hashable, Batches]:
        views: list[Hashable] = [("client", k, s) for k in range(self.num_clients) for s in ("train", "val", "test")]
        views += [("global_test", c) for c in (*CONDITIONS, "missing")] + [
            ("pooled", s) for s in ("train", "val", "test")
        ]
        return {view: self._view(view) for view in views}

    def _batches(
        self, dataset: Batches, split: Split, generator: torch.Generator | None, shard: tuple[int, int] = (0, 1)
    ) -> BatchSampler | list[list[int]]:
        if split == "train":
            return BatchSampler(RandomSampler(dataset, generator=generator), self.batch_size, drop_last=False)
        batches = BatchSampler(SequentialSampler(dataset), self.eval_batch_size, drop_last=False)
        part, parts = shard
        if parts == 1:
            return batches
        # cut at batch boundaries so that every batch holds the same samples as without sharding
        count = len(batches)
        return list(batches)[count * part // parts : count * (part + 1) // parts]

    def _loader(
        self, view: Hashable, split: Split, generator: torch.Generator | None, shard: tuple[int, int] = (0, 1)
    ) -> DataLoader | PoolLoader:
        if self.num_workers == 0:  # building a DataLoader without workers costs nothing: one per read
            return self._dataloader(self._view(view), split, generator, shard)
        if self._pool is None:
            self._pool = WorkerPool(self._every_view(), self.num_workers)
        return PoolLoader(self._pool, view, self._batches(self._pool.views[view], split, generator, shard))

    def _dataloader(
        self, dataset: Batches, split: Split, generator: torch.Generator | None, shard: tuple[int, int] = (0, 1)
    ) -> DataLoader:
        """A DataLoader of its own (workers started per pass), for ``lightning.Trainer``'s hooks."""
        sampler = self._batches(dataset, split, generator, shard)
        return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=self.num_workers)

    def teardown(self, stage: str | None = None) -> None:
        """Stop the DataLoader workers (a later read starts them again)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __getstate__(self) -> dict:  # worker processes do not pickle; a copy starts its own
        return {**self.__dict__, "_pool": None}

    def _pooled(self, split: Split) -> Batches:
        parts = [self.clients[k][split] for k in range(self.num_clients)]
        index, image_present, text_present = (torch.cat(p) for p in zip(*parts, strict=True))
        return Batches(self.pool, self.pool_tokens, index, image_present, text_present, f"the pooled {split} split")

    # --------------------------------------------- pooled views (centralized training, lightning.Trainer)
    def pooled_dataloader(self, split: Split, generator: torch.Generator | None = None) -> DataLoader | PoolLoader:
        """The union of every client's ``split`` (with the clients' masks), e.g. for centralized training."""
        return self._loader(("pooled", split), split, generator)

    def train_dataloader(self) -> DataLoader:
        return self._dataloader(self._pooled("train"), "train", torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return self._dataloader(self._pooled("val"), "val", None)

    def test_dataloader(self) -> DataLoader:
        return self._dataloader(self._view(("global_test", "complete")), "test", None)

    def missing_masks(self) -> dict[str, Tensor]:
        """Every mask of the run, flat, for storing next to its logs."""
        masks = {}
        for client, entry in enumerate(self.clients):
            for split, (index, image_present, text_present) in entry.items():
                masks[f"client{client}.{split}.index"] = index
                masks[f"client{client}.{split}.image_present"] = image_present
                masks[f"client{client}.{split}.text_present"] = text_present
        masks["global_test.image_present"], masks["global_test.text_present"] = self.test_masks
        return masks


def _class_counts(labels: Tensor, num_classes: int) -> Tensor:
    """Samples per class: class indices (multiclass, binary 0/1) or multi-hot rows (multilabel)."""
    if labels.dim() == 2:
        return labels.sum(dim=0).long()
    return torch.bincount(labels.long(), minlength=max(num_classes, 2))
