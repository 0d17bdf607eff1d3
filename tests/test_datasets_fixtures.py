"""Small fixture trees in each dataset's published layout, built at test time, and reading them back.

The builders are imported by the other ``test_datasets_*`` files.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from fedilora.data import (
    FederatedDataModule,
    HatefulMemes,
    ImageFiles,
    MMIMDb,
    MultimodalTable,
    UPMCFood101,
)
from fedilora.data.benchmarks import MMIMDB_GENRES

COLOURS = [(220, 40, 40), (40, 180, 60), (40, 70, 220), (230, 210, 40)]


def write_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (48, 40)) -> None:
    """A solid image with a white stripe on the left (to see that cropping keeps the centre)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour)
    for x in range(4):
        for y in range(size[1]):
            image.putpixel((x, y), (255, 255, 255))
    image.save(path)


# ------------------------------------------------------------------------------------ Food-101
FOOD_CLASSES = ["apple_pie", "bibimbap", "churros"]


def make_food101(root: Path, per_class: dict[str, int] | None = None) -> Path:
    """images/{train,test}/<class>/<class>_<i>.jpg and texts/{train,test}_titles.csv (no header)."""
    per_class = per_class or {"train": 4, "test": 2}
    for split, n in per_class.items():
        rows = []
        for c, name in enumerate(FOOD_CLASSES):
            for i in range(n):
                file = f"{name}_{split}_{i}.jpg"
                write_image(root / "images" / split / name / file, COLOURS[c])
                rows.append([file, f"best {name.replace('_', ' ')} recipe, number {i}", name])
        (root / "texts").mkdir(parents=True, exist_ok=True)
        with open(root / "texts" / f"{split}_titles.csv", "w", newline="") as handle:
            csv.writer(handle).writerows(rows)
    return root


# ------------------------------------------------------------------------------------- MM-IMDb
MMIMDB_MOVIES = {
    "0000001": (
        ["A detective hunts a killer.", "Longer: a tired detective hunts a clever killer."],
        ["Crime", "Thriller"],
    ),
    "0000002": (["Two friends fall in love."], ["Comedy", "Romance", "News"]),  # News is not one of the 23
    "0000003": (["A family goes to space."], ["Sci-Fi", "Family", "Adventure"]),
    "0000004": (["A war story."], ["Drama", "War"]),
    "0000005": (["A haunted house."], ["Horror"]),
    "0000006": (["A musical about cats."], ["Musical", "Comedy"]),
    "0000007": (["Cowboys ride again."], ["Western"]),
    "0000008": (["The history of jazz."], ["Documentary", "Music", "History"]),
    "0000009": (["A boxer's comeback."], ["Drama", "Sport"]),
    "0000010": (["Robots in love."], ["Sci-Fi", "Romance"]),
    "0000011": (["A heist in Paris."], ["Crime", "Action"]),
    "0000012": (["An animated fable."], ["Animation", "Family", "Fantasy"]),
}
MMIMDB_SPLIT = {
    "train": [f"{i:07d}" for i in range(1, 7)],
    "dev": ["0000007", "0000008"],
    "test": [f"{i:07d}" for i in range(9, 13)],
}


def make_mmimdb(root: Path) -> Path:
    """split.json and dataset/<id>.jpeg + dataset/<id>.json (plot list, genres list)."""
    (root / "dataset").mkdir(parents=True, exist_ok=True)
    for k, (item, (plots, genres)) in enumerate(MMIMDB_MOVIES.items()):
        write_image(root / "dataset" / f"{item}.jpeg", COLOURS[k % 4], size=(36, 52))
        meta = {"title": f"Movie {item}", "plot": plots, "genres": genres, "year": 2000 + k}
        (root / "dataset" / f"{item}.json").write_text(json.dumps(meta))
    (root / "split.json").write_text(json.dumps(MMIMDB_SPLIT))
    return root


# ------------------------------------------------------------------------------- Hateful Memes
def make_hateful_memes(root: Path, sizes: dict[str, int] | None = None) -> Path:
    """img/<id>.png and train.jsonl, dev_seen.jsonl, test_seen.jsonl with id, img, label, text."""
    sizes = sizes or {"train": 8, "dev_seen": 2, "test_seen": 4}
    next_id = 10001
    for split, n in sizes.items():
        lines = []
        for i in range(n):
            label = i % 2
            write_image(root / "img" / f"{next_id}.png", COLOURS[label], size=(40, 40))
            lines.append(json.dumps({"id": next_id, "img": f"img/{next_id}.png", "label": label,
                                     "text": f"meme {next_id} says {'hate' if label else 'love'}"}))  # fmt: skip
            next_id += 1
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


# ---------------------------------------------------------------------------------- generic table
def make_table(root: Path, kind: str = "csv", task: str = "multiclass", n: int = 12) -> Path:
    """A user's own file: image paths relative to the file, text, and a label column."""
    labels = {
        "multiclass": lambda i: ["cat", "dog", "bird"][i % 3],
        "multilabel": lambda i: ["red|round", "green", "red|green|round", ""][i % 4],
        "binary": lambda i: i % 2,
    }[task]
    rows = []
    for i in range(n):
        write_image(root / "pics" / f"{i:03d}.png", COLOURS[i % 4], size=(32, 32))
        rows.append({"file": f"pics/{i:03d}.png", "caption": f"sample number {i}", "tags": labels(i)})
    if kind == "csv":
        path = root / "data.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["file", "caption", "tags"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        path = root / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def table(path: Path, **kwargs) -> MultimodalTable:
    return MultimodalTable(str(path), image_column="file", text_column="caption", label_column="tags",
                           image_size=32, **kwargs)  # fmt: skip


# ======================================================================================== tests
def test_food101_reads_samples_labels_and_splits(tmp_path):
    root = make_food101(tmp_path / "food")
    dataset = UPMCFood101(str(root), image_size=32)
    assert dataset.num_classes == 3 and dataset.task == "multiclass"
    pool, test = dataset.load()
    assert len(pool) == 12 and len(test) == 6
    assert pool.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert pool.texts[5] == "best bibimbap recipe, number 1"  # the quoted comma stays in the text
    assert test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    images = pool.images[torch.tensor([0, 4, 8])]
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8
    centre = images[:, :, 16, 16].int()
    assert (centre - torch.tensor(COLOURS[:3])).abs().max() <= 8  # JPEG is lossy


def test_food101_skips_a_header_row_if_a_copy_has_one(tmp_path):
    root = make_food101(tmp_path / "food")
    path = root / "texts" / "train_titles.csv"
    path.write_text("image_path,text,food\n" + path.read_text())
    pool, _ = UPMCFood101(str(root), image_size=32).load()
    assert len(pool) == 12


def test_mmimdb_reads_multi_hot_genres_and_splits(tmp_path):
    root = make_mmimdb(tmp_path / "mmimdb")
    dataset = MMIMDb(str(root), image_size=32)
    assert dataset.num_classes == 23 and dataset.task == "multilabel"
    pool, test = dataset.load()
    assert len(pool) == 8 and len(test) == 4  # train + dev in the pool, test apart
    assert pool.labels.shape == (8, 23) and set(pool.labels.unique().tolist()) <= {0, 1}
    genre = {g: i for i, g in enumerate(MMIMDB_GENRES)}
    assert pool.labels[0].nonzero().flatten().tolist() == sorted([genre["Crime"], genre["Thriller"]])
    assert pool.labels[1].sum() == 2  # Comedy, Romance; News is ignored
    assert pool.texts[0] == "A detective hunts a killer."  # the first plot
    assert pool.texts[6] == "Cowboys ride again."  # dev follows train
    longest = MMIMDb(str(root), image_size=32, plot="longest", include_dev=False).load()[0]
    assert len(longest) == 6 and longest.texts[0].startswith("Longer:")
    assert test.labels[0].nonzero().flatten().tolist() == sorted([genre["Drama"], genre["Sport"]])
    assert pool.images[torch.tensor([0, 7])].shape == (2, 3, 32, 32)


def test_hateful_memes_reads_binary_labels_and_splits(tmp_path):
    root = make_hateful_memes(tmp_path / "hm")
    dataset = HatefulMemes(str(root), image_size=32)
    assert dataset.task == "binary" and dataset.num_classes == 2
    pool, test = dataset.load()
    assert len(pool) == 10 and len(test) == 4
    assert pool.labels.tolist() == [0, 1] * 5 and test.labels.tolist() == [0, 1, 0, 1]
    assert pool.texts[1] == "meme 10002 says hate"
    assert pool.images[torch.tensor([1])][0, :, 16, 16].tolist() == list(COLOURS[1])
    assert len(HatefulMemes(str(root), include_dev=False, image_size=32).load()[0]) == 8


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_table_reads_each_task(tmp_path, kind):
    path = make_table(tmp_path, kind, "multiclass")
    dataset = table(path, test_fraction=0.25)
    assert dataset.classes == ["bird", "cat", "dog"]
    pool, test = dataset.load()
    assert len(pool) == 9 and len(test) == 3
    everything = sorted(pool.texts + test.texts, key=lambda t: int(t.split()[-1]))
    assert everything == [f"sample number {i}" for i in range(12)]
    for data in (pool, test):
        for text, label in zip(data.texts, data.labels.tolist(), strict=True):
            assert dataset.classes[label] == ["cat", "dog", "bird"][int(text.split()[-1]) % 3]

    multi = make_table(tmp_path / "multi", kind, "multilabel")
    dataset = table(multi, task="multilabel", test_path=str(multi))
    assert dataset.classes == ["green", "red", "round"]
    pool, _ = dataset.load()
    assert pool.labels.tolist()[:4] == [[0, 1, 1], [1, 0, 0], [1, 1, 1], [0, 0, 0]]

    binary = make_table(tmp_path / "binary", kind, "binary")
    pool, test = table(binary, task="binary", test_path=str(binary)).load()
    assert pool.labels.tolist() == [0, 1] * 6 and test.labels.tolist() == [0, 1] * 6


def test_image_files_decode_lazily_resize_and_cache(tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        write_image(paths[-1], COLOURS[i], size=(80, 60))
    store = ImageFiles(paths, image_size=24, cache_size=2)
    assert len(store) == 3 and not store._cache
    batch = store[torch.tensor([2, 0, 2])]
    assert batch.shape == (3, 3, 24, 24) and batch[0, :, 12, 12].tolist() == list(COLOURS[2])
    assert torch.equal(batch[0], batch[2])
    assert list(store._cache) == [0, 2]  # least recently used first, at most cache_size
    store[torch.tensor([1])]
    assert list(store._cache) == [2, 1]


def test_datamodule_decodes_only_present_images(tmp_path):
    class Counting(ImageFiles):
        decoded = 0

        def image(self, row):
            Counting.decoded += 1
            return super().image(row)

    root = make_food101(tmp_path / "food")
    dataset = UPMCFood101(str(root), image_size=32, cache_size=0)
    dm = FederatedDataModule(dataset=dataset, num_clients=2, val_fraction=0.0, test_fraction=0.0)
    dm.setup()
    dm.test.images = Counting(dm.test.images.paths, 32, cache_size=0)
    batch = next(iter(dm.global_test_dataloader("text_only")))
    assert Counting.decoded == 0 and batch["image"].abs().sum() == 0
    batch = next(iter(dm.global_test_dataloader("complete")))
    assert Counting.decoded == 6 and batch["image"].float().mean() > 0
    assert batch["tokens"].shape[0] == 6 and batch["label"].tolist() == [0, 0, 1, 1, 2, 2]
