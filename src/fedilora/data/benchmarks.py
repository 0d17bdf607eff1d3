"""The three standard missing-modality benchmarks, read from a local copy in their published layouts.

fedilora never downloads them: ``root`` points at the files a user already has. Each layout below is
the one the dataset's release ships, as read by public loaders (checked against the MMF / transformers
MM-IMDb scripts, the missing-aware-prompts ``make_arrow`` scripts for all three, and several UPMC
Food-101 loaders that read the title CSVs with ``header=None``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from fedilora.data.errors import DataError
from fedilora.data.files import (
    BadSamples,
    FileSource,
    Record,
    text_problem,
    undecodable,
)
from fedilora.data.images import image_options
from fedilora.data.source import MultimodalData
from fedilora.errors import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
_MAX_FIELD = 2**31 - 1  # the largest limit every platform's csv module accepts (a C long)

# MM-IMDb's 23 genres (Arevalo et al. 2017), in the order of the published multi-hot targets. The
# metadata files also carry rarer genres (News, Adult, Talk-Show, Reality-TV, ...); they are ignored.
MMIMDB_GENRES = [
    "Drama", "Comedy", "Romance", "Thriller", "Crime", "Action", "Adventure", "Horror", "Documentary",
    "Mystery", "Sci-Fi", "Fantasy", "Family", "Biography", "War", "History", "Music", "Animation",
    "Musical", "Western", "Sport", "Short", "Film-Noir",
]  # fmt: skip


def read_json(path: Path) -> object:
    """A JSON file's content, or one DataError naming the file and where it stops parsing."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def csv_rows(path: Path, delimiter: str = ",") -> Iterator[tuple[int, list[str]]]:
    """``(line number, fields)`` of every non-blank CSV record (quoted fields may span lines).

    Bytes that are not UTF-8 stay in the fields as lone surrogates for ``undecodable`` to find. A field
    may be of any length (the csv module's default limit, 128 KiB, would end the whole file at one long
    text; the tokenizer keeps the start of a long text anyway).
    """
    limit = csv.field_size_limit(_MAX_FIELD)
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            try:
                for row in reader:
                    if row and any(cell.strip() for cell in row):
                        yield reader.line_num, row
            except csv.Error as err:
                raise DataError(f"{path} line {reader.line_num}: not valid CSV ({err})") from None
    finally:
        csv.field_size_limit(limit)


def jsonl_rows(path: Path, bad: BadSamples) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` of every non-blank JSON line; a line that does not parse, or is not
    UTF-8, is a bad sample."""
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if problem := undecodable([line]):
                bad(f"{path} line {number}", problem)
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                bad(f"{path} line {number}", f"not valid JSON ({err.msg} at column {err.colno})")
                continue
            if not isinstance(value, dict):
                bad(f"{path} line {number}", f"expected a JSON object, got {type(value).__name__}")
                continue
            yield number, value


@image_options(check_images="header")
class UPMCFood101(FileSource):
    """UPMC Food-101 (Wang et al. 2015): 101 food classes, an image and a web-page title per sample.

    Published layout under ``root``::

        images/train/<class>/<image file>      e.g. images/train/apple_pie/apple_pie_0.jpg
        images/test/<class>/<image file>
        texts/train_titles.csv                 rows: image file name, text, class — no header row
        texts/test_titles.csv

    The client pool is the official train split, the global test set the official test split. The
    class list is ``classes`` or, by default, the sorted class directories of ``images/train``; a row
    whose class is not in it is a bad sample. A first row that looks like a header (no image file
    name, no known class) is skipped. Metrics: top-1 and top-5 accuracy, macro F1.

    Args:
        root: The dataset's directory (the one holding ``images/`` and ``texts/``).
        classes: The class names, in label order (default: the directories of ``images/train``).
    """

    name = "UPMCFood101"
    task = "multiclass"

    def __init__(
        self,
        root: str,
        classes: list[str] | None = None,
        **image: Any,
    ) -> None:
        super().__init__(**image)
        self.root = self.existing_dir(root, "data.dataset.root", "UPMC Food-101")
        if classes is not None and (len(classes) < 2 or len(set(classes)) != len(classes)):
            raise ConfigError("data.dataset.classes: give at least 2 class names, each once")
        self._classes = list(classes) if classes is not None else None

    @property
    def classes(self) -> list[str]:
        if self._classes is None:
            train = self.root / "images" / "train"
            if not train.is_dir():
                raise ConfigError(f"{train}: missing split directory (expected images/train/<class>/<file>.jpg)")
            found = sorted(p.name for p in train.iterdir() if p.is_dir())
            if not found:
                raise ConfigError(f"{train}: no class directories (expected images/train/<class>/<file>.jpg)")
            self._classes = self.enough_classes(found, f"{train} (its class directories)")
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def load(self) -> tuple[MultimodalData, MultimodalData]:
        return self._split("train"), self._split("test")

    def _split(self, split: str) -> MultimodalData:
        path = self.existing_file(self.root / "texts" / f"{split}_titles.csv", f"split file texts/{split}_titles.csv")
        index = {name: i for i, name in enumerate(self.classes)}
        bad = self.bad_samples(split)
        records = []
        for k, (line, row) in enumerate(csv_rows(path)):
            where = f"{path} line {line}"
            if problem := undecodable(row):
                bad(where, problem)
                continue
            if k == 0 and not row[0].strip().lower().endswith(IMAGE_SUFFIXES) and row[-1].strip() not in index:
                continue  # a header row; the published files have none
            if len(row) != 3:
                bad(where, f"expected 3 columns (image file name, text, class), got {len(row)}")
                continue
            file, text, name = row[0].strip(), row[1], row[2].strip()
            if name not in index:
                bad(where, f"class {name!r} is not one of the {len(index)} classes (the directories of images/train)")
                continue
            if problem := text_problem(text):
                bad(where, problem)
                continue
            records.append(Record(where, self.root / "images" / split / name / file, text, index[name]))
        return self.to_data(self.checked(records, split, bad), split)


@image_options(check_images="header")
class MMIMDb(FileSource):
    """MM-IMDb (Arevalo et al. 2017): movie posters and plots, 23 genres, multi-label.

    Published layout (the ``mmimdb/`` directory of the release) under ``root``::

        split.json                {"train": [ids], "dev": [ids], "test": [ids]}
        dataset/<id>.jpeg         the poster
        dataset/<id>.json         metadata; "plot": [plot texts], "genres": [genre names], ...

    Targets are multi-hot over the 23 genres (``genres``); other genres in the metadata are ignored.
    The client pool is ``train`` plus ``dev`` (``include_dev``: the clients hold out their own
    validation data), the global test set is ``test``. Metrics: micro, macro and samples F1.

    Args:
        root: The ``mmimdb/`` directory (holding ``split.json`` and ``dataset/``).
        include_dev: Add the ``dev`` ids to the client pool.
        plot: Which plot is the text when a movie has several: ``first`` (as the missing-aware-prompts
            code), ``longest`` (as MMF) or ``all`` (joined).
        genres: The label set, in target order (default: the 23 published genres).
        items_dir: Directory of the ``<id>.json`` / ``<id>.jpeg`` files, relative to ``root``.
    """

    name = "MMIMDb"
    task = "multilabel"

    def __init__(
        self,
        root: str,
        include_dev: bool = True,
        plot: Literal["first", "longest", "all"] = "first",
        genres: list[str] | None = None,
        items_dir: str = "dataset",
        **image: Any,
    ) -> None:
        super().__init__(**image)
        self.root = self.existing_dir(root, "data.dataset.root", "MM-IMDb (the mmimdb/ directory)")
        if plot not in ("first", "longest", "all"):
            raise ConfigError(f"data.dataset.plot: unknown {plot!r}; allowed: first, longest, all")
        self.include_dev, self.plot, self.items_dir = include_dev, plot, items_dir
        self.genres = list(genres) if genres is not None else list(MMIMDB_GENRES)
        if len(self.genres) < 2 or len(set(self.genres)) != len(self.genres):
            raise ConfigError("data.dataset.genres: give at least 2 genres, each once")
        self.num_classes = len(self.genres)

    def load(self) -> tuple[MultimodalData, MultimodalData]:
        split_path = self.root / "split.json"
        if not split_path.is_file():
            below = " (found mmimdb/split.json below it: point data.dataset.root at that mmimdb/)" if (
                self.root / "mmimdb" / "split.json").is_file() else ""  # fmt: skip
            raise ConfigError(f"{split_path}: missing split file split.json (MM-IMDb's train/dev/test ids){below}")
        splits = read_json(split_path)
        items = self.existing_dir(self.root / self.items_dir, "data.dataset.items_dir", "MM-IMDb's dataset/ files")
        wanted = ["train", "dev", "test"] if self.include_dev else ["train", "test"]
        for split in wanted:
            if not isinstance(splits, dict) or not isinstance(splits.get(split), list):
                raise ConfigError(f"{split_path}: no {split!r} list of ids (expected keys train, dev, test)")
        pool = self._checked(splits["train"], "train", split_path, items)
        if self.include_dev:
            pool += self._checked(splits["dev"], "dev", split_path, items)
        test = self._checked(splits["test"], "test", split_path, items)
        return self.to_data(pool, "train"), self.to_data(test, "test")

    def _checked(self, ids: list, split: str, split_path: Path, items: Path) -> list[Record]:
        index = {name: i for i, name in enumerate(self.genres)}
        bad = self.bad_samples(split)
        records = []
        for position, item in enumerate(ids):
            meta_path = items / f"{item}.json"
            if not meta_path.is_file():
                bad(f"{split_path} {split!r} entry {position}", f"metadata file {meta_path} does not exist")
                continue
            try:
                meta = read_json(meta_path)
            except ConfigError as err:
                bad(str(meta_path), str(err).removeprefix(f"{meta_path}: "))
                continue
            where = str(meta_path)
            if not isinstance(meta, dict):
                bad(where, f"expected a JSON object, got {type(meta).__name__}")
                continue
            text = self._text(meta.get("plot"))
            if problem := text_problem(text):
                bad(where, f"{problem} ('plot')")
                continue
            genres = meta.get("genres")
            if not isinstance(genres, list):
                bad(where, "no 'genres' list")
                continue
            labels = sorted({index[g] for g in genres if g in index})
            records.append(Record(where, items / f"{item}.jpeg", text, labels))
        return self.checked(records, split, bad)

    def _text(self, plots: object) -> object:
        if isinstance(plots, str) or plots is None:
            return plots
        if not isinstance(plots, list) or not plots:
            return None
        plots = [p for p in plots if isinstance(p, str) and p.strip()]
        if not plots:
            return ""
        if self.plot == "first":
            return plots[0]
        if self.plot == "longest":
            return max(plots, key=len)
        return " ".join(plots)


@image_options(check_images="header")
class HatefulMemes(FileSource):
    """Hateful Memes (Kiela et al. 2020): meme images with their overlaid text, hateful or not (binary).

    Published layout under ``root``::

        img/<id>.png
        train.jsonl, dev_seen.jsonl, test_seen.jsonl
            one JSON object per line: {"id": 42953, "img": "img/42953.png", "label": 0, "text": "..."}

    ``img`` is relative to ``root``. ``test_seen.jsonl`` has labels in the Phase 2 release (Phase 1's
    ``test.jsonl`` has none and cannot be the test set). The client pool is ``train.jsonl`` plus
    ``dev_seen.jsonl`` (``include_dev``), the global test set ``test_seen.jsonl``. Metrics: AUROC and
    accuracy.

    Args:
        root: The dataset's directory (holding ``img/`` and the ``.jsonl`` files).
        include_dev: Add ``dev_file`` to the client pool.
        train_file: Training split file.
        dev_file: Development split file (``dev_seen.jsonl``; ``dev_unseen.jsonl`` also exists in Phase 2).
        test_file: Global test split file (``test_seen.jsonl`` or ``test_unseen.jsonl``).
    """

    name = "HatefulMemes"
    task = "binary"
    num_classes = 2

    def __init__(
        self,
        root: str,
        include_dev: bool = True,
        train_file: str = "train.jsonl",
        dev_file: str = "dev_seen.jsonl",
        test_file: str = "test_seen.jsonl",
        **image: Any,
    ) -> None:
        super().__init__(**image)
        self.root = self.existing_dir(root, "data.dataset.root", "Hateful Memes")
        self.include_dev = include_dev
        self.train_file, self.dev_file, self.test_file = train_file, dev_file, test_file

    def load(self) -> tuple[MultimodalData, MultimodalData]:
        files = [("train", self.train_file)] + ([("dev", self.dev_file)] if self.include_dev else [])
        pool = [record for split, file in files for record in self._checked(file, split)]
        test = self._checked(self.test_file, "test")
        return self.to_data(pool, "train"), self.to_data(test, "test")

    def _checked(self, file: str, split: str) -> list[Record]:
        path = self.existing_file(self.root / file, f"split file {file}")
        bad = self.bad_samples(split)
        records = []
        for line, row in jsonl_rows(path, bad):
            where = f"{path} line {line}"
            if not isinstance(row.get("img"), str) or not row["img"].strip():
                bad(where, "no 'img' path")
                continue
            if problem := text_problem(row.get("text")):
                bad(where, problem)
                continue
            if "label" not in row:
                hint = " (Phase 1's test.jsonl is unlabelled; use test_seen.jsonl of the Phase 2 release)"
                bad(where, f"no 'label'{hint if split == 'test' else ''}")
                continue
            label = row["label"]
            if isinstance(label, bool) or label not in (0, 1):
                bad(where, f"label {label!r} is not 0 or 1")
                continue
            records.append(Record(where, self.root / row["img"], row["text"], int(label)))
        return self.checked(records, split, bad)
