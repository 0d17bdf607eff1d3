"""An embedded image+text benchmark that needs no download.

The label is a pair ``(g, h)``: the image shows a coloured square whose colour encodes ``g``; the
text is a short caption containing one keyword whose topic encodes ``h``. Either modality alone
therefore narrows the label down to one row or column of the ``image_groups x text_groups`` grid,
and only both together identify it, the way missing modalities cost accuracy on the real benchmarks.
With corruption probability ``noise`` per modality, the Bayes-optimal accuracies are
``(1 - noise)^2`` with both modalities (one corrupted cue cannot be told apart),
``(1 - noise) / text_groups`` from the image alone and ``(1 - noise) / image_groups`` from the text
alone; chance is ``1 / num_classes``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedilora.data.source import MultimodalData, MultimodalSource, default_cache_dir
from fedilora.errors import ConfigError

PALETTE = [
    (220, 40, 40), (40, 180, 60), (40, 70, 220), (230, 210, 40),
    (200, 50, 200), (40, 200, 210), (240, 130, 30), (120, 60, 30),
]  # fmt: skip
KEYWORDS = [
    ["apple", "cherry", "plum"],
    ["car", "truck", "bus"],
    ["river", "lake", "ocean"],
    ["chair", "table", "sofa"],
    ["eagle", "sparrow", "owl"],
    ["hammer", "wrench", "saw"],
    ["rain", "snow", "storm"],
    ["guitar", "violin", "drum"],
]
FILLER = [
    "a",
    "the",
    "photo",
    "of",
    "some",
    "with",
    "near",
    "seen",
    "today",
    "small",
    "large",
    "old",
    "new",
    "picture",
    "this",
    "is",
    "very",
    "quite",
    "and",
    "there",
]


class SyntheticBenchmark(MultimodalSource):
    """Embedded image+text classification benchmark, generated deterministically and cached.

    Args:
        num_train: Samples in the pool partitioned over clients.
        num_test: Samples in the global test set.
        image_groups: Label factor carried by the image (number of square colours, at most 8).
        text_groups: Label factor carried by the text (number of keyword topics, at most 8).
        image_size: Side of the square RGB images in pixels.
        noise: Probability that a modality carries a wrong, random cue.
        seed: Generation seed.
        cache_dir: Where generated data is cached (default ``$FEDILORA_CACHE_DIR`` or
            ``~/.cache/fedilora``).
    """

    task = "multiclass"

    def __init__(
        self,
        num_train: int = 5000,
        num_test: int = 1200,
        image_groups: int = 4,
        text_groups: int = 3,
        image_size: int = 32,
        noise: float = 0.05,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        if num_train < 1 or num_test < 1:
            raise ConfigError("data.dataset.num_train and num_test must be >= 1")
        if not 2 <= image_groups <= len(PALETTE) or not 2 <= text_groups <= len(KEYWORDS):
            raise ConfigError(
                f"data.dataset.image_groups and text_groups must be in [2, {len(PALETTE)}], "
                f"got {image_groups} and {text_groups}"
            )
        if image_size < 8:
            raise ConfigError(f"data.dataset.image_size: must be >= 8, got {image_size}")
        if not 0.0 <= noise < 1.0:
            raise ConfigError(f"data.dataset.noise: must be in [0, 1), got {noise}")
        self.num_train, self.num_test = num_train, num_test
        self.image_groups, self.text_groups = image_groups, text_groups
        self.image_size, self.noise, self.seed = image_size, noise, seed
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir() / "synthetic"
        self.num_classes = image_groups * text_groups

    def bayes_accuracy(self) -> dict[str, float]:
        """The best accuracy any model can reach per modality condition."""
        keep = 1.0 - self.noise
        return {"complete": keep**2, "image_only": keep / self.text_groups, "text_only": keep / self.image_groups}

    def load(self) -> tuple[MultimodalData, MultimodalData]:
        prefix, fields = self._cache_key()
        stem = self.cache_dir / f"{prefix}-{hashlib.sha1(json.dumps(fields).encode()).hexdigest()[:12]}"
        try:
            tensors = load_file(f"{stem}.safetensors")
            texts = json.loads(Path(f"{stem}.json").read_text())
            if len(texts) != self.num_train + self.num_test or len(tensors["labels"]) != len(texts):
                raise ValueError("stale cache entry")
        except (OSError, ValueError, KeyError, RuntimeError):  # absent or damaged: regenerate, never trust
            tensors = self._generate()
            texts = tensors.pop("texts")
            self._store(stem, tensors, texts)
        n = self.num_train
        pool = MultimodalData(tensors["images"][:n], texts[:n], tensors["labels"][:n])
        test = MultimodalData(tensors["images"][n:], texts[n:], tensors["labels"][n:])
        return pool, test

    def _cache_key(self) -> tuple[str, list]:
        """The cache file's prefix and the generation parameters it is keyed by."""
        return "synthetic-v1", [
            self.num_train, self.num_test, self.image_groups, self.text_groups, self.image_size, self.noise, self.seed
        ]  # fmt: skip

    def _store(self, stem: Path, tensors: dict, texts: list[str]) -> None:
        try:
            stem.parent.mkdir(parents=True, exist_ok=True)
            # write then rename, so a crash never leaves a half-written cache entry behind
            save_file(tensors, f"{stem}.safetensors.tmp{os.getpid()}")
            Path(f"{stem}.json.tmp{os.getpid()}").write_text(json.dumps(texts))
            os.replace(f"{stem}.safetensors.tmp{os.getpid()}", f"{stem}.safetensors")
            os.replace(f"{stem}.json.tmp{os.getpid()}", f"{stem}.json")
        except OSError:
            pass  # an unwritable cache only costs regeneration next time

    def _generate(self) -> dict:
        n = self.num_train + self.num_test
        g = torch.Generator().manual_seed(self.seed)
        image_group = torch.randint(self.image_groups, (n,), generator=g)
        text_group = torch.randint(self.text_groups, (n,), generator=g)
        labels = image_group * self.text_groups + text_group
        shown_image = _corrupt(image_group, self.image_groups, self.noise, g)
        shown_text = _corrupt(text_group, self.text_groups, self.noise, g)

        size = self.image_size
        background = 128 + 40 * torch.randn(n, 3, size, size, generator=g)
        side = torch.randint(size * 3 // 10, size // 2 + 1, (n,), generator=g)
        y0 = (torch.rand(n, generator=g) * (size - side + 1)).long()
        x0 = (torch.rand(n, generator=g) * (size - side + 1)).long()
        pos = torch.arange(size)
        rows = (pos >= y0[:, None]) & (pos < (y0 + side)[:, None])
        cols = (pos >= x0[:, None]) & (pos < (x0 + side)[:, None])
        square = (rows[:, :, None] & cols[:, None, :])[:, None]
        palette = torch.tensor(PALETTE[: self.image_groups], dtype=torch.float32)
        colour = palette[shown_image] + 20 * torch.randn(n, 3, generator=g)
        fill = colour[:, :, None, None] + 15 * torch.randn(n, 3, size, size, generator=g)
        images = torch.where(square, fill, background).clamp(0, 255).to(torch.uint8)

        texts = []
        n_filler = torch.randint(3, 8, (n,), generator=g).tolist()
        for i, topic in enumerate(shown_text.tolist()):
            words = [FILLER[j] for j in torch.randint(len(FILLER), (n_filler[i],), generator=g).tolist()]
            synonyms = KEYWORDS[topic]
            keyword = synonyms[int(torch.randint(len(synonyms), (1,), generator=g))]
            words.insert(int(torch.randint(len(words) + 1, (1,), generator=g)), keyword)
            texts.append(" ".join(words))
        return {"images": images, "labels": labels, "texts": texts}


def _corrupt(groups: torch.Tensor, num_groups: int, noise: float, g: torch.Generator) -> torch.Tensor:
    """Replace a ``noise`` fraction of the cues by a different, random group."""
    flip = torch.rand(len(groups), generator=g) < noise
    shift = torch.randint(1, num_groups, (len(groups),), generator=g)
    return torch.where(flip, (groups + shift) % num_groups, groups)


# The hard variant's text vocabulary: more synonyms per topic and more filler, so that the keyword is
# a smaller part of a longer caption and every topic has more surface forms to learn.
HARD_KEYWORDS = [
    ["apple", "cherry", "plum", "pear", "melon"],
    ["car", "truck", "bus", "tractor", "van"],
    ["river", "lake", "ocean", "pond", "stream"],
    ["chair", "table", "sofa", "bench", "stool"],
    ["eagle", "sparrow", "owl", "hawk", "pigeon"],
    ["hammer", "wrench", "saw", "drill", "chisel"],
    ["rain", "snow", "storm", "fog", "hail"],
    ["guitar", "violin", "drum", "flute", "piano"],
]
HARD_FILLER = [
    *FILLER,
    "it", "was", "we", "found", "here", "after", "before", "during", "under", "over", "behind", "beside",
    "morning", "evening", "yesterday", "bright", "dark", "soft", "warm", "quiet", "one", "two", "three", "many",
]  # fmt: skip


class HardSyntheticBenchmark(SyntheticBenchmark):
    """A harder embedded benchmark: more classes, weaker and noisier cues, same complementary structure.

    The label is again a pair ``(g, h)``: ``g`` is carried only by the image, ``h`` only by the text, so
    neither modality alone suffices. What makes it hard:

    - more classes (default ``6 x 4 = 24``) and more cue noise (default 0.1);
    - the image cue is the colour of one small square (``square_size`` pixels a side) on a grey,
      textured background among ``distractors`` grey squares of the same size, so it covers a few
      percent of the pixels;
    - the text cue is one keyword (5 synonyms per topic) among ``filler_words`` filler words (default 4-10)
      drawn from 44.

    The Bayes-optimal accuracies are those of :class:`SyntheticBenchmark`: ``(1 - noise)^2`` complete,
    ``(1 - noise) / text_groups`` image only, ``(1 - noise) / image_groups`` text only, chance
    ``1 / num_classes``. The cue itself is never ambiguous: the square is the only coloured region
    (background and distractors are grey), and the palette colours are >= 81 apart against a colour
    jitter of 10 per channel, so an observer that reads the square's mean colour and the keyword
    reaches these accuracies (a test checks it).

    Args:
        num_train: Samples in the pool partitioned over clients.
        num_test: Samples in the global test set.
        image_groups: Label factor carried by the image (number of square colours, at most 8).
        text_groups: Label factor carried by the text (number of keyword topics, at most 8).
        image_size: Side of the square RGB images in pixels.
        noise: Probability that a modality carries a wrong, random cue.
        square_size: ``[min, max]`` side of the coloured square (and of the distractors) in pixels.
        distractors: Grey squares drawn under the coloured one.
        filler_words: ``[min, max]`` number of filler words around the keyword.
        seed: Generation seed.
        cache_dir: Where generated data is cached (default ``$FEDILORA_CACHE_DIR`` or
            ``~/.cache/fedilora``).
    """

    def __init__(
        self,
        num_train: int = 6000,
        num_test: int = 1500,
        image_groups: int = 6,
        text_groups: int = 4,
        image_size: int = 32,
        noise: float = 0.1,
        square_size: list[int] = [5, 8],  # noqa: B006 (jsonargparse shows the default)
        distractors: int = 2,
        filler_words: list[int] = [4, 10],  # noqa: B006
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(num_train, num_test, image_groups, text_groups, image_size, noise, seed, cache_dir)
        if len(square_size) != 2 or not 2 <= square_size[0] <= square_size[1] <= image_size:
            raise ConfigError(
                f"data.dataset.square_size: [min, max] with 2 <= min <= max <= image_size ({image_size}), "
                f"got {square_size}"
            )
        if distractors < 0:
            raise ConfigError(f"data.dataset.distractors: must be >= 0, got {distractors}")
        if len(filler_words) != 2 or not 0 <= filler_words[0] <= filler_words[1] <= 25:
            raise ConfigError(
                "data.dataset.filler_words: [min, max] with 0 <= min <= max <= 25 (the text context), "
                f"got {filler_words}"
            )
        self.square_size, self.distractors, self.filler_words = list(square_size), distractors, list(filler_words)

    def _cache_key(self) -> tuple[str, list]:
        _, fields = super()._cache_key()
        return "synthetic-hard-v1", [*fields, self.square_size, self.distractors, self.filler_words]

    def _generate(self) -> dict:
        n, size = self.num_train + self.num_test, self.image_size
        g = torch.Generator().manual_seed(self.seed)
        image_group = torch.randint(self.image_groups, (n,), generator=g)
        text_group = torch.randint(self.text_groups, (n,), generator=g)
        labels = image_group * self.text_groups + text_group
        shown_image = _corrupt(image_group, self.image_groups, self.noise, g)
        shown_text = _corrupt(text_group, self.text_groups, self.noise, g)

        # grey background: a per-image level and grey texture, with a little per-channel noise
        level = 70 + 120 * torch.rand(n, 1, 1, 1, generator=g)
        texture = 30 * torch.randn(n, 1, size, size, generator=g)
        images = level + texture + 6 * torch.randn(n, 3, size, size, generator=g)
        for _ in range(self.distractors):
            grey = 30 + 195 * torch.rand(n, 1, 1, 1, generator=g) + 8 * torch.randn(n, 1, size, size, generator=g)
            images = torch.where(self._squares(n, g), grey, images)
        palette = torch.tensor(PALETTE[: self.image_groups], dtype=torch.float32)
        colour = palette[shown_image] + 10 * torch.randn(n, 3, generator=g)
        fill = colour[:, :, None, None] + 8 * torch.randn(n, 3, size, size, generator=g)
        images = torch.where(self._squares(n, g), fill, images).clamp(0, 255).to(torch.uint8)

        texts = []
        n_filler = torch.randint(self.filler_words[0], self.filler_words[1] + 1, (n,), generator=g).tolist()
        for i, topic in enumerate(shown_text.tolist()):
            picks = torch.randint(len(HARD_FILLER), (n_filler[i],), generator=g).tolist()
            words = [HARD_FILLER[j] for j in picks]
            synonyms = HARD_KEYWORDS[topic]
            keyword = synonyms[int(torch.randint(len(synonyms), (1,), generator=g))]
            words.insert(int(torch.randint(len(words) + 1, (1,), generator=g)), keyword)
            texts.append(" ".join(words))
        return {"images": images, "labels": labels, "texts": texts}

    def _squares(self, n: int, g: torch.Generator) -> torch.Tensor:
        """``[n, 1, size, size]`` masks of one axis-aligned square per image, at a random place."""
        size, (low, high) = self.image_size, self.square_size
        side = torch.randint(low, high + 1, (n,), generator=g)
        y0 = (torch.rand(n, generator=g) * (size - side + 1)).long()
        x0 = (torch.rand(n, generator=g) * (size - side + 1)).long()
        pos = torch.arange(size)
        rows = (pos >= y0[:, None]) & (pos < (y0 + side)[:, None])
        cols = (pos >= x0[:, None]) & (pos < (x0 + side)[:, None])
        return (rows[:, :, None] & cols[:, None, :])[:, None]
