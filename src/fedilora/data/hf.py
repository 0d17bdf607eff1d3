"""Image-text data held as a Hugging Face dataset on local disk, read with the ``datasets`` library.

Three local forms are read, never a Hub id: a folder written by ``save_to_disk`` (``load_from_disk``,
memory-mapped), data files that ``load_dataset`` reads (parquet, arrow, csv, json; split names from the
file names or the folder's ``README.md`` configs), and an ``imagefolder`` with a ``metadata.csv`` or
``metadata.jsonl``. Loading runs with the Hub switched off, so a path that is not there is one error
naming it, never a download.

The image column is an ``Image`` feature (bytes or a path), raw bytes, or a path string (relative to
``path``). Images stay in the Arrow table and are decoded when a batch asks for them; texts and labels
are read and checked up front, with the same rules and ``on_bad_sample`` policy as ``MultimodalTable``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from fedilora.data.errors import DataError
from fedilora.data.files import (
    BadSamples,
    FileSource,
    Record,
    hold_out,
    text_problem,
)
from fedilora.data.generic import _natural_key
from fedilora.data.hf_images import HFImages, image_source, source_problem, undecoded_image_column
from fedilora.data.images import image_options
from fedilora.data.source import MultimodalData, Task
from fedilora.errors import ConfigError

Format = Literal["auto", "disk", "parquet", "arrow", "imagefolder", "csv", "json"]
_FILE_FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".tsv": "csv", ".json": "json",
                 ".jsonl": "json"}  # fmt: skip
_CHECK_BATCH = 256


@contextmanager
def _offline() -> Iterator[None]:
    """The Hub switched off while a dataset is read: a local read never turns into a download."""
    import datasets.config
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


@image_options(check_images="header")
class HuggingFaceDataset(FileSource):
    """Image-text data saved as a Hugging Face dataset, read locally with the ``datasets`` library.

    ``path`` is one of (``format: auto`` tells them apart):

    - a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``disk``);
    - a folder of data files (``parquet``, ``arrow``, ``csv``, ``json``) as the Hub keeps them, e.g.
      ``data/train-00000-of-00001.parquet`` and ``data/test-....parquet``, or a single such file;
    - an ``imagefolder``: images with a ``metadata.csv`` / ``metadata.jsonl`` (``file_name`` plus your
      text and label columns), per split in ``train/``, ``test/``.

    Needs the ``datasets`` package (``pip install -e ".[hf]"``). Nothing is downloaded: the Hub is
    switched off while reading, and a Hub id such as ``user/name`` is refused unless it is a local
    folder (download it first, e.g. ``hf download user/name --repo-type dataset
    --local-dir <folder>``). Data files other than ``save_to_disk`` folders are converted to Arrow
    once by ``datasets`` into its cache (``cache_dir``) and memory-mapped from there.

    Columns, labels and tasks are as in ``MultimodalTable``: ``multiclass`` (one class per sample),
    ``multilabel`` (a list, or names joined by ``label_separator``), ``binary`` (0/1, true/false). A
    ``ClassLabel`` column gives the class names in its own order; otherwise the default class list
    is the sorted distinct labels. The image column is an ``Image`` feature (bytes or path), bytes, or
    a path string relative to ``path``; images are decoded lazily, when a batch needs them.

    Args:
        path: The local dataset folder or file.
        format: ``auto``, ``disk`` (``load_from_disk``), or a ``load_dataset`` builder: ``parquet``,
            ``arrow``, ``imagefolder``, ``csv``, ``json``.
        train_split: The split(s) pooled and partitioned over the clients, e.g. ``[train, validation]``.
        test_split: The global test split; null holds out ``test_fraction`` of the pool.
        test_fraction: Fraction of the pool held out as the global test set without ``test_split``.
        task: ``multiclass``, ``multilabel`` or ``binary``.
        image_column: Column of the image.
        text_column: Column of the text.
        label_column: Column of the label(s).
        classes: Class names in label order. Default: a ``ClassLabel`` column's names, else the sorted
            distinct labels (numbers numerically); for ``binary``: ``["0", "1"]``. A label outside a
            given list is a bad sample.
        label_separator: Separator of several labels in one string (``multilabel``).
        cache_dir: Where ``datasets`` keeps the Arrow copy of data files (default: its own cache,
            ``HF_DATASETS_CACHE``); unused for ``save_to_disk`` folders.
    """

    name = "HuggingFaceDataset"

    def __init__(
        self,
        path: str,
        format: Format = "auto",
        train_split: str | list[str] = "train",
        test_split: str | None = "test",
        test_fraction: float = 0.2,
        task: Task = "multiclass",
        image_column: str = "image",
        text_column: str = "text",
        label_column: str = "label",
        classes: list[str] | None = None,
        label_separator: str = "|",
        cache_dir: str | None = None,
        **image: Any,
    ) -> None:
        super().__init__(**image)
        if format not in ("auto", "disk", "parquet", "arrow", "imagefolder", "csv", "json"):
            raise ConfigError(
                f"data.dataset.format: unknown {format!r}; allowed: auto, disk, parquet, arrow, imagefolder, csv, json"
            )
        if task not in ("multiclass", "multilabel", "binary"):
            raise ConfigError(f"data.dataset.task: unknown {task!r}; allowed: multiclass, multilabel, binary")
        self.train_splits = [train_split] if isinstance(train_split, str) else list(train_split)
        if not self.train_splits or test_split in self.train_splits:
            raise ConfigError(
                f"data.dataset.train_split: give at least one split, none of them the test split ({test_split!r})"
            )
        if test_split is None and not 0.0 < test_fraction < 1.0:
            raise ConfigError(
                f"data.dataset.test_fraction: must be in (0, 1) without a test_split, got {test_fraction}"
            )
        if classes is not None and (not classes or len(set(classes)) != len(classes)):
            raise ConfigError("data.dataset.classes: give at least one class name, each once")
        if task == "binary" and classes is not None and len(classes) != 2:
            raise ConfigError(f"data.dataset.classes: a binary task has 2 classes (negative, positive), got {classes}")
        if not label_separator:
            raise ConfigError("data.dataset.label_separator: must not be empty")
        self.path = Path(path).expanduser()
        if not self.path.exists():
            hub = " (a Hub id is not read: download it first, e.g. `hf download <id> --repo-type dataset --local-dir <folder>`)"  # noqa: E501
            raise ConfigError(
                f"data.dataset.path: {self.path} does not exist (fedilora never downloads data)"
                f"{hub if not Path(path).is_absolute() and path.count('/') == 1 else ''}"
            )
        self.base = self.path if self.path.is_dir() else self.path.parent
        self.format, self.test_split, self.test_fraction, self.task = format, test_split, test_fraction, task
        self.image_column, self.text_column, self.label_column = image_column, text_column, label_column
        self.label_separator, self.cache_dir = label_separator, cache_dir
        self._classes = [str(c) for c in classes] if classes is not None else None
        self._splits: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------- reading
    def splits(self) -> dict[str, Any]:
        """The dataset's splits (``datasets.Dataset`` each), read once, offline."""
        if self._splits is None:
            try:
                import datasets
            except ImportError:
                raise ConfigError(
                    'data.dataset: HuggingFaceDataset needs the `datasets` package: pip install -e ".[hf]"'
                ) from None
            with _offline():
                loaded = self._load(datasets)
            if isinstance(loaded, datasets.Dataset):
                loaded = {self.train_splits[0]: loaded}  # one table: it is the pool
            self._splits = dict(loaded)
            for split in [*self.train_splits, *([self.test_split] if self.test_split else [])]:
                if split not in self._splits:
                    option = "train_split" if split in self.train_splits else "test_split"
                    hint = "" if option == "train_split" else ", or null to hold out test_fraction of the pool"
                    raise ConfigError(
                        f"{self.path}: no split {split!r} (splits: {', '.join(self._splits)}); set "
                        f"data.dataset.{option} to one of them{hint}"
                    )
                if self._splits[split].num_rows == 0:
                    raise DataError(f"{self.path}: the dataset is empty (split {split!r} has no rows)")
                columns = self._splits[split].column_names
                for option, column in (("image_column", self.image_column), ("text_column", self.text_column),
                                       ("label_column", self.label_column)):  # fmt: skip
                    if column not in columns:
                        raise ConfigError(
                            f"{self.path} split {split!r}: no column {column!r} (columns: {', '.join(columns)}); "
                            f"set data.dataset.{option}"
                        )
        return self._splits

    def _load(self, datasets: Any) -> Any:
        kind = self.format
        if kind == "auto":
            if self.path.is_dir():
                saved = (self.path / "dataset_dict.json").is_file() or (self.path / "state.json").is_file()
                kind = "disk" if saved else "folder"
            else:
                kind = _FILE_FORMATS.get(self.path.suffix.lower(), "")
                if not kind:
                    raise ConfigError(
                        f"{self.path}: cannot tell the format from the extension {self.path.suffix!r}; set "
                        "data.dataset.format (disk, parquet, arrow, imagefolder, csv, json)"
                    )
        try:
            if kind == "disk":
                if empty := _empty_saved_splits(self.path):
                    which = f" (no rows in {', '.join(empty)})" if empty != [""] else ""
                    raise DataError(f"{self.path}: the dataset is empty{which}")
                return datasets.load_from_disk(str(self.path))
            if kind == "folder":  # datasets infers the builder and the splits from the files
                return datasets.load_dataset(str(self.path), cache_dir=self.cache_dir)
            where = {"data_dir": str(self.path)} if self.path.is_dir() else {"data_files": str(self.path)}
            return datasets.load_dataset(kind, **where, cache_dir=self.cache_dir)
        except ConfigError:
            raise
        except Exception as err:  # the library's own errors for unreadable or inconsistent files
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            if "corresponds to no data" in first:  # load_dataset's word for data files of no rows
                raise DataError(f"{self.path}: the dataset is empty (its data files hold no rows)") from None
            raise ConfigError(
                f"{self.path}: cannot read it as a Hugging Face dataset ({kind}): {type(err).__name__}: {first}"
            ) from None

    # ---------------------------------------------------------------------------------- classes
    @property
    def classes(self) -> list[str]:
        if self._classes is None:
            named = self._feature_names()
            if named is not None:
                if self.task == "binary" and len(named) != 2:
                    raise ConfigError(
                        f"{self.path}: column {self.label_column!r} has {len(named)} classes {named}; a binary task "
                        "has 2 (set data.dataset.task)"
                    )
                self._classes = named
            elif self.task == "binary":
                self._classes = ["0", "1"]
            else:
                # the training splits' labels only: a test label no training sample has is a bad test
                # sample (see _records), not a class the model could never learn
                found = {name for split in self.train_splits for _, names in self._labels(split) for name in names}
                if not found:
                    raise ConfigError(f"{self.path}: no labels found in column {self.label_column!r}")
                self._inferred = True
                self._classes = sorted(found, key=_natural_key)
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _used_splits(self) -> list[str]:
        return [*self.train_splits, *([self.test_split] if self.test_split else [])]

    def _feature_names(self) -> list[str] | None:
        """A ``ClassLabel`` label column's names (also inside a list, for multi-label), if all splits agree."""
        found = []
        for split in self._used_splits():
            feature = self.splits()[split].features[self.label_column]
            feature = getattr(feature, "feature", feature)  # Sequence / List of ClassLabel
            found.append(list(feature.names) if hasattr(feature, "names") else None)
        if found[0] is not None and any(names != found[0] for names in found):
            raise ConfigError(f"{self.path}: the splits' ClassLabel names of {self.label_column!r} differ")
        return found[0]

    def _labels(self, split: str) -> list[tuple[int, list[str]]]:
        """``(row, label names)`` of every row of ``split`` with a readable label (others: bad samples
        later, in ``_records``)."""
        table = self.splits()[split]
        feature = table.features[self.label_column]
        inner = getattr(feature, "feature", feature)
        names = list(inner.names) if hasattr(inner, "names") else None
        out = []
        for row, value in enumerate(table[self.label_column]):
            parsed = self._label_names(value, names)
            if parsed is not None:
                out.append((row, parsed))
        return out

    def _label_names(self, value: object, names: list[str] | None) -> list[str] | None:
        """Label names of one cell (ids of a ``ClassLabel`` column through its ``names``), or None."""

        def name(v: object) -> str:
            if names is not None and isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(names):
                return names[v]
            if isinstance(v, bool):
                return "1" if v else "0"
            if isinstance(v, float) and v.is_integer():
                return str(int(v))
            return str(v)

        if self.task == "multilabel":
            if value is None:
                return []
            parts = [name(v) for v in value] if isinstance(value, list) else name(value).split(self.label_separator)
            return [p.strip() for p in parts if p.strip()]
        if value is None or isinstance(value, (list, dict)) or (isinstance(value, int) and value < 0 and names):
            return None  # ClassLabel's -1 is "no label"
        label = name(value).strip()
        if self.task == "binary" and names is None:
            label = {"true": "1", "false": "0"}.get(label.lower(), label)
        return [label] if label else None

    # ------------------------------------------------------------------------------------ loading
    def load(self) -> tuple[MultimodalData, MultimodalData]:
        splits = self.splits()
        order = list(splits)
        pool_bad, test_bad = self.bad_samples("train"), self.bad_samples("test")
        pool = [r for split in self.train_splits for r in self._records(split, order.index(split), pool_bad)]
        if self.test_split is None:
            pool, test = hold_out(
                pool, self.test_fraction, self.seed, str(self.path), "data.dataset.test_split", pool_bad
            )
        else:
            test = self._records(self.test_split, order.index(self.test_split), test_bad)
        images = [undecoded_image_column(t, self.image_column) for t in splits.values()]
        pool, test = self._checked(pool, "train", pool_bad, images), self._checked(test, "test", test_bad, images)
        self.warn_untrained_classes(pool, test)
        self._splits = None  # a second load() reads the tables again, with fresh counts
        return self._data(pool, "train", images), self._data(test, "test", images)

    def _records(self, split: str, table: int, bad: BadSamples) -> list[Record]:
        """The split's samples whose text and label are usable; ``image`` holds ``(table, row)`` (the
        image is checked later, after ``max_samples``)."""
        labelled = dict(self._labels(split))
        index = {name: i for i, name in enumerate(self.classes)}
        unknown_count = Counter(n for names in labelled.values() for n in names if n not in index)
        records = []
        for row, text in enumerate(self.splits()[split][self.text_column]):
            where = f"{self.path} split {split!r} row {row}"
            if problem := text_problem(text):
                bad(where, f"{problem} (column {self.text_column!r})")
                continue
            names = labelled.get(row)
            if names is None:
                bad(where, f"no label in {self.label_column!r}")
                continue
            unknown = [n for n in names if n not in index]
            if unknown:
                bad(where, self.unknown_label(unknown[0], unknown_count[unknown[0]], split))
                continue
            label = sorted({index[n] for n in names}) if self.task == "multilabel" else index[names[0]]
            records.append(Record(where, (table, row), text, label))  # type: ignore[arg-type]
        return records

    def _checked(self, records: list[Record], split: str, bad: BadSamples, images: list[Any]) -> list[Record]:
        """Subset ``records`` (``max_samples``), check their images, report the split's skips."""
        records = self.subset(records, split)
        kept = []
        for start in range(0, len(records), _CHECK_BATCH):
            chunk = records[start : start + _CHECK_BATCH]
            cells: dict[tuple[int, int], Any] = {}
            for table in {r.image[0] for r in chunk}:  # type: ignore[index]
                rows = [r.image[1] for r in chunk if r.image[0] == table]  # type: ignore[index]
                cells.update(zip(((table, row) for row in rows), images[table][rows][self.image_column], strict=True))
            for record in chunk:
                source = image_source(cells[record.image], self.base)  # type: ignore[index]
                problem = (
                    "no image"
                    if source is None
                    else source_problem(source, record.where, self.check_images, self.image_size)
                )
                if problem is None:
                    kept.append(record)
                else:
                    bad(record.where, f"{problem} (column {self.image_column!r})")
        bad.report(len(kept))
        self.skipped[split] = bad.count
        self.skip_examples[split] = bad.summary()
        return kept

    def _data(self, records: list[Record], split: str, images: list[Any]) -> MultimodalData:
        data = self.to_data(records, split)  # labels as every file source builds them; images below
        data.images = HFImages(images, self.image_column, [r.image for r in records], [r.where for r in records],  # type: ignore[misc]
                               self.base, self.image_size, self.cache_size)  # fmt: skip
        return data


def _empty_saved_splits(path: Path) -> list[str]:
    """The splits of a ``save_to_disk`` folder written without a data file (``[""]`` for a folder of one
    ``Dataset``): a dataset of no rows, which ``load_from_disk`` cannot read back (an ``IndexError``)."""
    import json

    states = [("", path / "state.json")]
    if (path / "dataset_dict.json").is_file():
        try:
            names = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        except (OSError, ValueError, AttributeError):
            return []  # load_from_disk names what is wrong with the file
        states = [(f"split {name!r}", path / str(name) / "state.json") for name in names]
    empty = []
    for name, state in states:
        try:
            if json.loads(state.read_text()).get("_data_files") == []:
                empty.append(name)
        except (OSError, ValueError, AttributeError):
            continue
    return empty

