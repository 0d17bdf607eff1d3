"""What every file-based dataset shares: lazy image files, bad-sample handling, the common options.

Real datasets are never downloaded: a dataset reads the files a user already has. Images stay on disk
and are decoded when a batch asks for them (``ImageFiles``); texts, labels and paths are read up front
and checked, so that a malformed file fails before training starts, with one message naming the file,
the line and what is wrong, or (``on_bad_sample: skip``) is left out and counted.

A sample can only be skipped at load time: the partition over clients, their sample counts (which
weight the aggregation) and every split are fixed before the first round, and a sample leaving them
mid-run would change all of that. So ``on_bad_sample: skip`` decodes every image at load time
(``check_images: auto``), and an image that fails later anyway (a check level chosen below ``decode``,
or a file changed during the run) stops the run with a ``DataError`` naming the file, the line and
the client split that read it.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter, OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from fedilora.data.errors import DataError
from fedilora.data.images import CheckImages, ImageOptions, OnBadSample, image_options
from fedilora.data.source import MultimodalData, MultimodalSource
from fedilora.errors import ConfigError

log = logging.getLogger("fedilora.data")

_CHECK_THREADS = 8
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def to_rgb(image: Image.Image, size: int) -> Image.Image:
    """``image`` decoded to 8-bit RGB (16-bit and float images in their own range, see ``_to_8bit``)."""
    image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale that is still >= size
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit(image)
    return image.convert("RGB")  # reads every pixel: a truncated or corrupt file fails here


def _to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float grey image as 8-bit ``L``, read in its own range.

    PIL's ``convert`` clips such pixels to 0..255 as they are, so a 16-bit image turns almost white
    and a float image in [0, 1] black. The range is the mode's (``I;16``: 0..65535) or, where the
    mode does not fix one (``I``, ``F``), the one the values show: within 0..255 they are 8-bit
    values, within 0..65535 (integers) 16-bit ones, within [0, 1] (floats) fractions. Other values
    have no range to read them in and raise ``ValueError`` (a bad image)."""
    pixels = np.asarray(image)
    if image.mode.startswith("I;16"):
        top = 65535.0
    else:
        pixels = pixels.astype(np.float64)
        kind = "float" if image.mode == "F" else "32-bit integer"
        if not np.isfinite(pixels).all():
            raise ValueError(f"{kind} pixels that are not finite; save the image as 8-bit")
        low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
        if image.mode == "F" and low >= 0.0 and high <= 1.0:
            top = 1.0
        elif low >= 0.0 and high <= 255.0:
            top = 255.0
        elif image.mode == "I" and low >= 0.0 and high <= 65535.0:
            top = 65535.0
        else:
            expected = "[0, 1] or [0, 255]" if image.mode == "F" else "0..255 or 0..65535"
            raise ValueError(
                f"{kind} pixels in [{low:g}, {high:g}], outside the ranges read as such ({expected}); "
                "save the image as 8-bit"
            )
    scaled = np.rint(pixels.astype(np.float64) * (255.0 / top)).astype(np.uint8)
    return Image.fromarray(scaled, "L")


def decode_image(path: str | Path, size: int) -> Tensor:
    """Decode one image file to uint8 ``[3, size, size]``: RGB, shorter side resized to ``size`` (bicubic)
    and centre-cropped, as CLIP's preprocessing does. A file that does not decode raises ``DataError``."""
    try:
        with Image.open(path) as image:
            fitted = ImageOps.fit(to_rgb(image, size), (size, size), method=Image.Resampling.BICUBIC)
    except _DECODE_ERRORS as err:
        raise DataError(f"image file {path} cannot be decoded ({type(err).__name__}: {err})") from None
    return torch.from_numpy(_chw(fitted))


def _chw(image: Image.Image) -> np.ndarray:
    # The HWC -> CHW copy in numpy, not torch: a torch copy this small is split over the intra-op threads,
    # whose OpenMP spin-waits cost 4.6x the decode's CPU time on a busy 2-core machine (bench_loader.py).
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def image_problem(path: Path, level: CheckImages, size: int = 224) -> str | None:
    """What is wrong with an image file at check ``level``, or None.

    ``exists``: the file is there; ``header``: PIL recognises it as an image (reads its header only,
    so a truncated file passes); ``decode``: it decodes to RGB as training will decode it, at
    ``size`` (reads every pixel).
    """
    if not path.is_file():
        if path.is_dir():
            return f"image path {path} is a directory, not an image file"
        return f"image file {path} does not exist" if not path.exists() else f"image path {path} is not a regular file"
    if level == "exists":
        return None
    try:
        with Image.open(path) as image:
            if level == "decode":
                to_rgb(image, size)
    except _DECODE_ERRORS as err:
        return f"image file {path} cannot be decoded ({type(err).__name__}: {err})"
    return None


def undecodable(values: Sequence[str], decoded: bool = False) -> str | None:
    """Where the first character that is not valid Unicode text sits in ``values``, or None.

    Files are read with ``errors="surrogateescape"``: a byte that is not UTF-8 becomes a lone surrogate
    (U+DC80..U+DCFF) instead of being replaced by U+FFFD, so it is found here and the sample is bad,
    rather than trained on with a changed text or a changed label. ``decoded``: the values come out of
    a JSON decoder whose input line was already checked, so a lone surrogate in them was a ``\\u``
    escape, not a byte.
    """
    for field, value in enumerate(values, start=1):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            char = ord(value[err.start])
            at = f"at {f'field {field}, ' if len(values) > 1 else ''}character {err.start + 1}"
            if decoded or not 0xDC80 <= char <= 0xDCFF:
                return f"not UTF-8 text (a lone surrogate U+{char:04X} {at}, from a \\u escape)"
            return f"not UTF-8 text (byte 0x{char - 0xDC00:02x} {at}; save the file as UTF-8)"
    return None


class ImageFiles:
    """An ``ImageStore`` over image files: ``store[index]`` decodes the images of a LongTensor of sample
    indices to uint8 ``[B, 3, image_size, image_size]``.

    Nothing is decoded up front, so a large dataset never sits in memory. The last ``cache_size``
    decoded images are kept (LRU), which spares re-decoding when a client's data or a test set that
    fits is visited every round; 0 disables the cache.

    ``where`` names each sample's file and line for the ``DataError`` of an image that fails to decode;
    ``checked`` is the load-time check its files passed (for that message's advice).
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        image_size: int,
        cache_size: int = 1024,
        where: Sequence[str] | None = None,
        checked: CheckImages = "exists",
    ) -> None:
        self.paths = [str(p) for p in paths]
        if where is not None and len(where) != len(self.paths):
            raise ValueError(f"{len(where)} sample names for {len(self.paths)} image paths")
        self.where = list(where) if where is not None else None
        self.image_size = image_size
        self.cache_size = cache_size
        self.checked = checked
        self._cache: OrderedDict[int, Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: Tensor) -> Tensor:
        rows = torch.as_tensor(index, dtype=torch.long).reshape(-1).tolist()
        out = np.empty((len(rows), 3, self.image_size, self.image_size), dtype=np.uint8)  # numpy: see _chw
        for k, row in enumerate(rows):
            out[k] = self.image(row).numpy()
        return torch.from_numpy(out)

    def image(self, row: int) -> Tensor:
        cached = self._cache.get(row)
        if cached is not None:
            self._cache.move_to_end(row)
            return cached
        try:
            image = decode_image(self.paths[row], self.image_size)
        except DataError as err:
            where = f"{self.where[row]}: " if self.where is not None else ""
            raise DataError(f"{where}{err}; {self._advice()}") from None
        if self.cache_size > 0:
            self._cache[row] = image
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return image

    def __getstate__(self) -> dict:  # dataloader workers start with an empty cache
        return {**self.__dict__, "_cache": OrderedDict()}

    def digest(self, row: int) -> bytes:
        """A hash of the image file's bytes (two copies of one image under two names hash alike)."""
        digest = hashlib.blake2b(digest_size=16)
        with open(self.paths[row], "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        return digest.digest()

    def _advice(self) -> str:
        if self.checked == "decode":
            return "it decoded when the dataset was loaded: did the file change during the run?"
        return (
            f"the load-time check data.dataset.check_images: {self.checked} does not decode images; "
            "check_images: decode finds every such file before training, and on_bad_sample: skip then leaves it out"
        )


@dataclass
class Record:
    """One sample read from a dataset's files: ``where`` (file and line) names it in messages."""

    where: str
    image: Path
    text: str
    label: int | list[int]


class BadSamples:
    """Collects the problems of one split: raises a ``DataError`` at the first (``error``) or counts them
    (``skip``)."""

    def __init__(self, dataset: str, split: str, policy: OnBadSample) -> None:
        self.dataset, self.split, self.policy = dataset, split, policy
        self.count = 0
        self.examples: list[str] = []

    def __call__(self, where: str, problem: str) -> None:
        if self.policy == "error":
            raise DataError(
                f"{where}: {problem} (data.dataset.on_bad_sample is 'error'; set it to 'skip' to leave such "
                "samples out)"
            )
        self.count += 1
        if len(self.examples) < 3:
            self.examples.append(f"{where}: {problem}")

    def summary(self) -> str:
        """How many samples were skipped and why (the first problems), for the error of a split left empty."""
        return f"{self.count} skipped as bad samples (on_bad_sample: skip), e.g. {'; '.join(self.examples)}"

    def report(self, kept: int) -> None:
        if self.count:
            log.warning(
                "%s %s: skipped %d bad sample(s), kept %d (on_bad_sample: skip); e.g. %s",
                self.dataset,
                self.split,
                self.count,
                kept,
                "; ".join(self.examples),
            )


def hold_out(
    pool: list, fraction: float, seed: int, where: str, instead: str, bad: BadSamples | None = None
) -> tuple[list, list]:
    """``(pool, test)``: a seeded ``fraction`` of ``pool`` held out as the test set, for data that ships
    none. ``where`` names the data in the error; ``instead`` is the option that gives a test split;
    ``bad`` (the pool's skipped samples) says why so few were usable."""
    order = list(range(len(pool)))
    random.Random(f"{seed}:holdout").shuffle(order)
    n_test = max(1, round(fraction * len(pool)))
    if n_test >= len(pool):
        raise DataError(
            f"{where}: {len(pool)} usable samples are too few to hold out a test set "
            f"(data.dataset.test_fraction {fraction}); give {instead}"
            + (f"; {bad.summary()}" if bad is not None and bad.count else "")
        )
    held = set(order[:n_test])
    return [r for i, r in enumerate(pool) if i not in held], [r for i, r in enumerate(pool) if i in held]


def text_problem(text: object) -> str | None:
    if text is None or not isinstance(text, str):
        return f"text is {type(text).__name__}, not a string" if text is not None else "empty text"
    if not text.strip():
        return "empty text"
    return undecodable([text], decoded=True)  # the lines and rows holding it were checked for bytes


@image_options()
class FileSource(MultimodalSource):
    """Base of the datasets read from local files (see the subclasses for their layouts).

    Args:
    """

    name = "dataset"

    def __init__(self, **image: Any) -> None:
        self.image_options = options = ImageOptions(**image)
        self.image_size, self.on_bad_sample = options.image_size, options.on_bad_sample
        self.check_images = options.check  # the level applied: ``auto`` resolved
        self.cache_size, self.max_samples, self.seed = options.cache_size, options.max_samples, options.seed
        self.skipped: dict[str, int] = {}
        self.skip_examples: dict[str, str] = {}  # per split: how many were skipped and why, for to_data
        self._inferred = False  # the classes were read from the training data (not given by the user)

    # ------------------------------------------------------------------------------ helpers
    @staticmethod
    def existing_dir(path: str | Path, option: str, what: str) -> Path:
        path = Path(path).expanduser()
        if not path.is_dir():
            raise ConfigError(
                f"{option}: {path} does not exist or is not a directory; point it at your local copy of {what} "
                "(fedilora never downloads data)"
            )
        return path

    @staticmethod
    def existing_file(path: Path, what: str) -> Path:
        if not path.is_file():
            raise ConfigError(f"{path}: missing {what}")
        return path

    def bad_samples(self, split: str) -> BadSamples:
        return BadSamples(self.name, split, self.on_bad_sample)

    def subset(self, records: list[Record], split: str) -> list[Record]:
        if self.max_samples is None or len(records) <= self.max_samples:
            return records
        keep = sorted(random.Random(f"{self.seed}:{split}").sample(range(len(records)), self.max_samples))
        return [records[i] for i in keep]

    def checked(self, records: list[Record], split: str, bad: BadSamples) -> list[Record]:
        """Subset ``records`` (``max_samples``), check their images, report the split's skips."""
        records = self.subset(records, split)
        with ThreadPoolExecutor(_CHECK_THREADS) as pool:
            problems = list(pool.map(lambda r: image_problem(r.image, self.check_images, self.image_size), records))
        kept = []
        for record, problem in zip(records, problems, strict=True):
            if problem is None:
                kept.append(record)
            else:
                bad(record.where, problem)
        bad.report(len(kept))
        self.skipped[split] = bad.count
        self.skip_examples[split] = bad.summary()
        return kept

    @staticmethod
    def enough_classes(classes: list[str], found_in: str) -> list[str]:
        """``classes`` if there are at least 2 (a classifier's metrics need 2), else a ``DataError``."""
        if len(classes) < 2:
            raise DataError(
                f"{found_in}: only one class ({classes[0]!r}) found; a classifier needs at least 2 "
                "(give data.dataset.classes to name them all, or use data with several labels)"
            )
        return classes

    def unknown_label(self, label: str, count: int, split: str) -> str:
        """The problem of a sample whose label is not a class; ``count`` samples of ``split`` have it."""
        problem = f"label {label!r} is not one of the classes {self.classes}"
        if self._inferred:
            return (
                f"{problem}, the labels of the training data ({count} {split} sample(s) have it, no training "
                "sample; list it in data.dataset.classes to keep it as a class)"
            )
        return f"{problem} ({count} {split} sample(s) have it)"

    def warn_untrained_classes(self, pool: list[Record], test: list[Record]) -> None:
        """Warn about classes the test set has and the training pool has not: a class listed in
        ``classes`` (or a ``ClassLabel``), or one whose every sample was held out or skipped, is
        evaluated but never trained."""
        counts = [Counter(c for r in records for c in (r.label if isinstance(r.label, list) else [r.label]))
                  for records in (pool, test)]  # fmt: skip
        untrained = [(self.classes[c], n) for c, n in sorted(counts[1].items()) if c not in counts[0]]
        if untrained:
            log.warning(
                "%s: %d test class(es) have no training sample, the model never learns them: %s",
                self.name,
                len(untrained),
                ", ".join(f"{name!r} ({n} test sample(s))" for name, n in untrained),
            )

    def to_data(self, records: list[Record], split: str) -> MultimodalData:
        """The split's ``MultimodalData``: labels are class ids, or multi-hot rows for a multi-label task."""
        if not records:
            if self.skipped.get(split):
                raise DataError(f"{self.name} {split}: no usable sample is left: all {self.skip_examples[split]}")
            raise DataError(f"{self.name} {split}: no usable sample")
        if self.task == "multilabel":
            labels = torch.zeros(len(records), self.num_classes, dtype=torch.long)
            for i, record in enumerate(records):
                labels[i, record.label] = 1
        else:
            labels = torch.tensor([r.label for r in records], dtype=torch.long)
        images = ImageFiles(
            [r.image for r in records], self.image_size, self.cache_size, [r.where for r in records], self.check_images
        )
        return MultimodalData(images, [r.text for r in records], labels)
