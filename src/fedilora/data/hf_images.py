"""The image column of a Hugging Face dataset: a cell's bytes or file, its up-front check, and ``HFImages``,
the ``ImageStore`` that decodes a batch's images from the (memory-mapped) Arrow tables."""

from __future__ import annotations

import hashlib
import io
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from fedilora.data.errors import DataError
from fedilora.data.files import CheckImages, decode_image, image_problem, to_rgb
from fedilora.errors import ConfigError


class _NamedBytes(io.BytesIO):
    """Image bytes that print as the sample they belong to, so that ``decode_image``'s and PIL's
    messages name the dataset, split and row rather than a buffer address."""

    def __init__(self, data: bytes, where: str) -> None:
        super().__init__(data)
        self.where = where

    def __str__(self) -> str:
        return self.where

    __repr__ = __str__


def image_source(value: Any, base: Path) -> bytes | Path | None:
    """The bytes or the file of one image cell: an ``Image`` feature's ``{"bytes", "path"}`` (with
    ``decode=False``), raw bytes, or a path string (relative paths against ``base``)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value) if value else None
    if isinstance(value, str) and value.strip():
        path = Path(value.strip())
        return path if path.is_absolute() else base / path
    return None


def _decode(source: bytes | Path, where: str, size: int) -> Tensor:
    return decode_image(_NamedBytes(source, where) if isinstance(source, bytes) else source, size)


def source_problem(source: bytes | Path, where: str, level: CheckImages, size: int) -> str | None:
    if isinstance(source, Path):
        return image_problem(source, level, size)
    if level == "exists":
        return None
    try:
        with Image.open(_NamedBytes(source, where)) as image:
            if level == "decode":
                to_rgb(image, size)  # as a batch decodes it (the range of 16-bit and float images included)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"image bytes cannot be decoded ({type(err).__name__}: {err})"
    return None


class HFImages:
    """An ``ImageStore`` over the image column of Hugging Face datasets: ``store[index]`` reads the
    images of a LongTensor of sample indices from the (memory-mapped) Arrow tables and decodes them to
    uint8 ``[B, 3, image_size, image_size]``.

    ``rows[i]`` is ``(table, row)`` of sample i. Nothing is decoded up front; the last ``cache_size``
    decoded images are kept (LRU), as in ``ImageFiles``.
    """

    def __init__(
        self,
        tables: Sequence[Any],
        column: str,
        rows: Sequence[tuple[int, int]],
        names: Sequence[str],
        base: Path,
        image_size: int,
        cache_size: int = 1024,
    ) -> None:
        self.tables = list(tables)
        self.column, self.rows, self.names, self.base = column, list(rows), list(names), base
        self.image_size, self.cache_size = image_size, cache_size
        self._cache: OrderedDict[int, Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: Tensor) -> Tensor:
        samples = torch.as_tensor(index, dtype=torch.long).reshape(-1).tolist()
        out = torch.empty(len(samples), 3, self.image_size, self.image_size, dtype=torch.uint8)
        wanted: dict[int, list[int]] = {}  # table -> positions in `samples` not in the cache
        for k, sample in enumerate(samples):
            cached = self._cache.get(sample)
            if cached is None:
                wanted.setdefault(self.rows[sample][0], []).append(k)
            else:
                self._cache.move_to_end(sample)
                out[k] = cached
        for table, positions in wanted.items():
            cells = self.tables[table][[self.rows[samples[k]][1] for k in positions]][self.column]
            for k, cell in zip(positions, cells, strict=True):
                sample = samples[k]
                source = image_source(cell, self.base)
                if source is None:
                    raise ConfigError(f"{self.names[sample]}: the image is empty")
                out[k] = image = _decode(source, self.names[sample], self.image_size)
                if self.cache_size > 0:
                    self._cache[sample] = image
                    if len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
        return out

    def __getstate__(self) -> dict:  # dataloader workers start with an empty cache
        return {**self.__dict__, "_cache": OrderedDict()}

    def digest(self, sample: int) -> bytes:
        """A hash of sample ``sample``'s image bytes (the cell's bytes, or the file's for a path), for
        ``duplicates.count_copies``: two copies of one image hash alike whichever form holds them."""
        table, row = self.rows[sample]
        source = image_source(self.tables[table][[row]][self.column][0], self.base)
        if source is None:
            raise DataError(f"{self.names[sample]}: the image is empty")
        digest = hashlib.blake2b(digest_size=16)
        if isinstance(source, bytes):
            digest.update(source)
            return digest.digest()
        try:
            with open(source, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
        except OSError as err:
            why = err.strerror or err
            raise DataError(f"{self.names[sample]}: image file {source} cannot be read ({why})") from None
        return digest.digest()


def undecoded_image_column(table: Any, column: str) -> Any:
    """Only the image column, with image decoding off (an ``Image`` feature then yields ``{"bytes", "path"}``)."""
    import datasets

    table = table.select_columns([column])
    if isinstance(table.features[column], datasets.Image):
        table = table.cast_column(column, datasets.Image(decode=False))
    return table
