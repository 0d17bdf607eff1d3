"""A user's own image-text data: one CSV or JSONL file per split, with configurable columns."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from fedilora.data.benchmarks import csv_rows, jsonl_rows
from fedilora.data.errors import DataError
from fedilora.data.files import (
    BadSamples,
    FileSource,
    Record,
    hold_out,
    text_problem,
    undecodable,
)
from fedilora.data.images import image_options
from fedilora.data.source import MultimodalData, Task
from fedilora.errors import ConfigError

_Row = tuple[str, Path, str, list[str]]  # where, image path, text, raw label names


def _natural_key(name: str) -> tuple:
    """Numbers sort numerically ("2" < "10"), everything else alphabetically."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


@image_options()
class MultimodalTable(FileSource):
    """A user's own data: a CSV or JSONL file of image path, text and label per sample.

    A CSV has a header row naming its columns; a JSONL file has one JSON object per line. Image paths
    are relative to the file's directory (or absolute). Labels:

    - ``multiclass``: one class name per sample;
    - ``multilabel``: several names, separated by ``label_separator`` in a CSV cell (a JSONL value may
      also be a list); an empty cell means no label; targets are multi-hot;
    - ``binary``: ``0``/``1`` (or ``true``/``false``); with two ``classes`` given, the second is the
      positive class.

    Example CSV (``label_separator: "|"`` for multi-label)::

        image,text,label
        photos/001.jpg,a bowl of ramen with egg,ramen
        photos/002.jpg,"pancakes, maple syrup",pancakes

    The client pool is ``path``; the global test set is ``test_path``, or, when that is null, a
    seeded random ``test_fraction`` of ``path``'s samples held out.

    Args:
        path: The CSV (``.csv``, ``.tsv``) or JSONL (``.jsonl``) file of the client pool.
        test_path: The file of the global test set (same columns); null holds out ``test_fraction``.
        test_fraction: Fraction of ``path``'s samples held out as the global test set without ``test_path``.
        task: ``multiclass``, ``multilabel`` or ``binary``.
        image_column: Column (CSV header name or JSON key) of the image path.
        text_column: Column of the text.
        label_column: Column of the label(s).
        classes: Class names in label order (at least 2). Default: the distinct labels found in the
            files, sorted (numbers numerically); for ``binary``: ``["0", "1"]``. A label outside a
            given list is a bad sample.
        label_separator: Separator of the labels in a multi-label CSV cell or string.
        delimiter: CSV field delimiter (default: tab for ``.tsv``, comma otherwise).
        format: ``auto`` (from the file extension), ``csv`` or ``jsonl``.
    """

    name = "MultimodalTable"

    def __init__(
        self,
        path: str,
        test_path: str | None = None,
        test_fraction: float = 0.2,
        task: Task = "multiclass",
        image_column: str = "image",
        text_column: str = "text",
        label_column: str = "label",
        classes: list[str] | None = None,
        label_separator: str = "|",
        delimiter: str | None = None,
        format: Literal["auto", "csv", "jsonl"] = "auto",
        **image: Any,
    ) -> None:
        super().__init__(**image)
        if task not in ("multiclass", "multilabel", "binary"):
            raise ConfigError(f"data.dataset.task: unknown {task!r}; allowed: multiclass, multilabel, binary")
        if format not in ("auto", "csv", "jsonl"):
            raise ConfigError(f"data.dataset.format: unknown {format!r}; allowed: auto, csv, jsonl")
        if test_path is None and not 0.0 < test_fraction < 1.0:
            raise ConfigError(f"data.dataset.test_fraction: must be in (0, 1) without a test_path, got {test_fraction}")
        if classes is not None and (len(classes) < 2 or len(set(classes)) != len(classes)):
            raise ConfigError("data.dataset.classes: give at least 2 class names, each once")
        if task == "binary" and classes is not None and len(classes) != 2:
            raise ConfigError(f"data.dataset.classes: a binary task has 2 classes (negative, positive), got {classes}")
        if not label_separator:
            raise ConfigError("data.dataset.label_separator: must not be empty")
        self.path = self._file(path, "data.dataset.path")
        self.test_path = self._file(test_path, "data.dataset.test_path") if test_path is not None else None
        self.test_fraction = test_fraction
        self.task = task
        self.image_column, self.text_column, self.label_column = image_column, text_column, label_column
        self.label_separator, self.delimiter, self.format = label_separator, delimiter, format
        self._classes = [str(c) for c in classes] if classes is not None else (["0", "1"] if task == "binary" else None)
        self._parsed: tuple[list[_Row], list[_Row] | None, BadSamples, BadSamples] | None = None

    @staticmethod
    def _file(path: str, option: str) -> Path:
        file = Path(path).expanduser()
        if not file.is_file():
            raise ConfigError(f"{option}: {file} does not exist or is not a file (fedilora never downloads data)")
        return file

    # ---------------------------------------------------------------------------------- classes
    @property
    def classes(self) -> list[str]:
        if self._classes is None:
            # the training file's labels only: a test label no training row has is a bad test sample
            # (see _records), not a class the model could never learn
            pool, _, pool_bad, _ = self._parse()
            found = {name for *_, names in pool for name in names}
            if not pool and pool_bad.count:  # rows there were, each left out before its label was read
                raise DataError(f"{self.path}: no usable row to read the classes from: all {pool_bad.summary()}")
            if not found:
                raise DataError(f"{self.path}: no labels found in column {self.label_column!r}")
            found_in = f"{self.path} (column {self.label_column!r})"
            self._inferred = True
            self._classes = self.enough_classes(sorted(found, key=_natural_key), found_in)
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # ------------------------------------------------------------------------------------ loading
    def load(self) -> tuple[MultimodalData, MultimodalData]:
        pool_rows, test_rows, pool_bad, test_bad = self._parse()
        self._parsed = None  # a second load() reads the files again, with fresh counts
        pool = self._records(pool_rows, pool_bad, "train")
        if test_rows is None:
            pool, test = hold_out(
                pool, self.test_fraction, self.seed, str(self.path), "data.dataset.test_path", pool_bad
            )
        else:
            test = self._records(test_rows, test_bad, "test")
        pool = self.checked(pool, "train", pool_bad)
        test = self.checked(test, "test", test_bad)
        self.warn_untrained_classes(pool, test)
        return self.to_data(pool, "train"), self.to_data(test, "test")

    def _parse(self) -> tuple[list[_Row], list[_Row] | None, BadSamples, BadSamples]:
        if self._parsed is None:
            pool_bad, test_bad = self.bad_samples("train"), self.bad_samples("test")
            pool = self._read(self.path, pool_bad)
            test = self._read(self.test_path, test_bad) if self.test_path is not None else None
            self._parsed = (pool, test, pool_bad, test_bad)
        return self._parsed

    def _records(self, rows: list[_Row], bad: BadSamples, split: str) -> list[Record]:
        index = {name: i for i, name in enumerate(self.classes)}
        unknown_count = Counter(n for *_, names in rows for n in names if n not in index)
        records = []
        for where, image, text, names in rows:
            unknown = [n for n in names if n not in index]
            if unknown:
                bad(where, self.unknown_label(unknown[0], unknown_count[unknown[0]], split))
                continue
            label = sorted({index[n] for n in names}) if self.task == "multilabel" else index[names[0]]
            records.append(Record(where, image, text, label))
        return records

    def _kind(self, path: Path) -> str:
        if self.format != "auto":
            return self.format
        suffix = path.suffix.lower()
        if suffix in (".csv", ".tsv"):
            return "csv"
        if suffix in (".jsonl", ".ndjson"):
            return "jsonl"
        raise ConfigError(f"{path}: cannot tell CSV from JSONL by the extension {suffix!r}; set data.dataset.format")

    def _read(self, path: Path, bad: BadSamples) -> list[_Row]:
        columns = (self.image_column, self.text_column, self.label_column)
        rows: list[_Row] = []
        if self._kind(path) == "csv":
            delimiter = self.delimiter or ("\t" if path.suffix.lower() == ".tsv" else ",")
            records = csv_rows(path, delimiter)
            first = next(records, None)
            if first is None:
                raise DataError(f"{path}: empty file (expected a header row naming the columns)")
            if problem := undecodable(first[1]):
                raise DataError(f"{path} line {first[0]}: the header row is {problem}")
            header = [cell.strip() for cell in first[1]]
            missing = [c for c in columns if c not in header]
            if missing:
                raise ConfigError(f"{path} line {first[0]}: no column {missing[0]!r} in the header row {header}")
            position = [header.index(c) for c in columns]
            for line, cells in records:
                where = f"{path} line {line}"
                if len(cells) != len(header):
                    bad(where, f"expected {len(header)} columns (as the header row), got {len(cells)}")
                    continue
                if problem := undecodable(cells):
                    bad(where, problem)
                    continue
                row = self._row(where, path, *(cells[p] for p in position), bad)
                if row is not None:
                    rows.append(row)
        else:
            for line, value in jsonl_rows(path, bad):
                where = f"{path} line {line}"
                missing = [c for c in columns if c not in value]
                if missing:
                    bad(where, f"no {missing[0]!r} field")
                    continue
                row = self._row(where, path, *(value[c] for c in columns), bad)
                if row is not None:
                    rows.append(row)
        return rows

    def _row(self, where: str, file: Path, image: object, text: object, label: object, bad: BadSamples) -> _Row | None:
        if not isinstance(image, str) or not image.strip():
            bad(where, f"no image path in {self.image_column!r}")
            return None
        if problem := text_problem(text):
            bad(where, problem)
            return None
        names = self._label_names(label)
        if names is None:
            bad(where, f"no label in {self.label_column!r}")
            return None
        if problem := undecodable(names, decoded=True):  # a JSON escape of a lone surrogate would be a new class
            bad(where, f"label {problem}")
            return None
        return where, file.parent / image.strip(), text, names

    def _label_names(self, value: object) -> list[str] | None:
        if self.task == "multilabel":
            if isinstance(value, list):
                parts = [self._name(v) for v in value]
            elif value is None:
                parts = []
            else:
                parts = self._name(value).split(self.label_separator)
            return [p.strip() for p in parts if p.strip()]
        if value is None or isinstance(value, (list, dict)):
            return None
        name = self._name(value).strip()
        if self.task == "binary" and self._classes == ["0", "1"]:
            name = {"true": "1", "false": "0"}.get(name.lower(), name)
        return [name] if name else None

    @staticmethod
    def _name(value: object) -> str:
        if isinstance(value, bool):
            return "1" if value else "0"
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value)
