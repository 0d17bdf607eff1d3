"""Hugging Face datasets on local disk, built with the `datasets` library itself, read by HuggingFaceDataset."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value
from datasets import Image as HFImage
from PIL import Image

from fedilora.cli import main
from fedilora.data import FederatedDataModule, HuggingFaceDataset
from fedilora.errors import ConfigError

COLOURS = [(220, 40, 40), (40, 180, 60), (40, 70, 220)]


def png(colour: tuple[int, int, int], size: tuple[int, int] = (24, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def image_split(n: int, names: list[str], offset: int = 0) -> Dataset:
    """n samples, class i % len(names), an image whose colour is the class, a text naming the sample."""
    features = Features({"image": HFImage(), "text": Value("string"), "label": ClassLabel(names=names)})
    labels = [(i + offset) % len(names) for i in range(n)]
    return Dataset.from_dict(
        {
            "image": [{"bytes": png(COLOURS[c]), "path": None} for c in labels],
            "text": [f"sample {i + offset}" for i in range(n)],
            "label": labels,
        },
        features=features,
    )


def saved(root: Path, names=("zebra", "apple", "mango"), sizes=(9, 6)) -> Path:
    """A DatasetDict written with save_to_disk; ClassLabel names deliberately not sorted."""
    DatasetDict(train=image_split(sizes[0], list(names)), test=image_split(sizes[1], list(names), 100)).save_to_disk(
        str(root)
    )
    return root


def colour_class(images: torch.Tensor) -> list[int]:
    """The class each decoded image shows (the index of its colour), read at the centre pixel."""
    centre = images[:, :, images.shape[2] // 2, images.shape[3] // 2].tolist()
    distance = lambda pixel, c: sum((a - b) ** 2 for a, b in zip(pixel, COLOURS[c], strict=True))  # noqa: E731
    return [min(range(3), key=lambda c: distance(pixel, c)) for pixel in centre]


def test_save_to_disk_reads_classlabel_order_texts_and_decodes_images_lazily(tmp_path):
    source = HuggingFaceDataset(str(saved(tmp_path / "ds")), image_size=16)
    assert source.classes == ["zebra", "apple", "mango"]  # ClassLabel's own order, not sorted
    pool, test = source.load()
    assert (len(pool), len(test)) == (9, 6)
    assert pool.labels.tolist() == [i % 3 for i in range(9)]
    assert test.labels.tolist() == [(i + 100) % 3 for i in range(6)]
    assert pool.texts[4] == "sample 4" and test.texts[0] == "sample 100"
    assert not pool.images._cache  # nothing decoded up front
    batch = pool.images[torch.tensor([5, 0, 1])]
    assert batch.shape == (3, 3, 16, 16) and batch.dtype == torch.uint8
    assert colour_class(batch) == [2, 0, 1]  # each image is its sample's, in the order asked
    assert sorted(pool.images._cache) == [0, 1, 5]


def test_parquet_files_with_path_column_multilabel_and_held_out_test(tmp_path):
    root = tmp_path / "pq"
    (root / "pics").mkdir(parents=True)
    rows = {"file": [], "caption": [], "tags": []}
    for i in range(10):
        Image.new("RGB", (20, 20), COLOURS[i % 3]).save(root / "pics" / f"{i}.png")
        rows["file"].append(f"pics/{i}.png")  # relative to the dataset folder
        rows["caption"].append(f"caption {i}")
        rows["tags"].append(["b", "a"] if i % 2 else ["c"])
    (root / "data").mkdir()
    Dataset.from_dict(rows).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    source = HuggingFaceDataset(str(root), task="multilabel", image_column="file", text_column="caption",
                                label_column="tags", test_split=None, test_fraction=0.3, image_size=16,
                                cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert source.classes == ["a", "b", "c"]
    pool, test = source.load()
    assert (len(pool), len(test)) == (7, 3)
    for data in (pool, test):
        for text, target in zip(data.texts, data.labels.tolist(), strict=True):
            i = int(text.split()[1])
            assert target == ([1, 1, 0] if i % 2 else [0, 0, 1])
        indices = [int(t.split()[1]) for t in data.texts]
        assert colour_class(data.images[torch.arange(len(data))]) == [i % 3 for i in indices]
    assert sorted(int(t.split()[1]) for t in pool.texts + test.texts) == list(range(10))


def test_list_of_classlabel_is_multilabel_in_the_features_order(tmp_path):
    genres = ["Drama", "Comedy", "Action"]  # not sorted: the feature's order is the target order
    features = Features({"poster": HFImage(), "plot": Value("string"),
                         "genres": getattr(datasets, "List", Sequence)(ClassLabel(names=genres))})  # fmt: skip
    tags = [[0, 2], [1], [], [2, 1, 0]]
    split = Dataset.from_dict({"poster": [{"bytes": png(COLOURS[i % 3]), "path": None} for i in range(4)],
                               "plot": [f"plot {i}" for i in range(4)], "genres": tags}, features=features)  # fmt: skip
    DatasetDict(train=split, test=split).save_to_disk(str(tmp_path / "mm"))
    source = HuggingFaceDataset(str(tmp_path / "mm"), task="multilabel", image_column="poster", text_column="plot",
                                label_column="genres", image_size=16)  # fmt: skip
    assert source.classes == genres
    pool, _ = source.load()
    assert pool.labels.tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 1]]


@pytest.mark.parametrize("metadata", ["csv", "jsonl"])
def test_imagefolder_with_metadata_binary(tmp_path, metadata):
    root = tmp_path / "imf"
    for split, n in (("train", 8), ("test", 4)):
        (root / split).mkdir(parents=True)
        rows = []
        for i in range(n):
            Image.new("RGB", (20, 20), COLOURS[i % 2]).save(root / split / f"{i}.png")
            rows.append({"file_name": f"{i}.png", "text": f"meme {split} {i}", "hateful": i % 2})
        if metadata == "csv":
            lines = ["file_name,text,hateful", *(f"{r['file_name']},{r['text']},{r['hateful']}" for r in rows)]
            (root / split / "metadata.csv").write_text("\n".join(lines) + "\n")
        else:
            (root / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = HuggingFaceDataset(str(root), format="imagefolder", task="binary", label_column="hateful", image_size=16,
                                cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert source.classes == ["0", "1"] and source.num_classes == 2
    pool, test = source.load()
    assert (len(pool), len(test)) == (8, 4)
    for data in (pool, test):
        labels = [int(t.split()[2]) % 2 for t in data.texts]
        assert data.labels.tolist() == labels
        assert colour_class(data.images[torch.arange(len(data))]) == labels  # colour i % 2 follows the label


def test_raw_bytes_column_and_string_labels_in_one_parquet_file(tmp_path):
    rows = {"jpg": [png(COLOURS[i % 3]) for i in range(9)], "text": [f"t {i}" for i in range(9)],
            "label": [["10", "2", "1"][i % 3] for i in range(9)]}  # fmt: skip
    file = tmp_path / "one.parquet"
    Dataset.from_dict(rows, features=Features({"jpg": Value("binary"), "text": Value("string"),
                                               "label": Value("string")})).to_parquet(str(file))  # fmt: skip
    source = HuggingFaceDataset(str(file), image_column="jpg", test_split=None, test_fraction=0.25, image_size=16,
                                cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert source.classes == ["1", "2", "10"]  # numbers sort numerically
    pool, test = source.load()
    for data in (pool, test):
        assert colour_class(data.images[torch.arange(len(data))]) == [int(t.split()[1]) % 3 for t in data.texts]
        assert [source.classes[c] for c in data.labels.tolist()] == [["10", "2", "1"][int(t.split()[1]) % 3]
                                                                      for t in data.texts]  # fmt: skip


def broken(root: Path) -> Path:
    """train rows: 1 has an empty text, 3 has an undecodable image, 5 has ClassLabel -1 (no label)."""
    split = image_split(8, ["a", "b"]).to_dict()
    split["text"][1] = "   "
    split["image"][3] = {"bytes": b"not an image at all", "path": None}
    split["label"][5] = -1
    features = Features({"image": HFImage(), "text": Value("string"), "label": ClassLabel(names=["a", "b"])})
    DatasetDict(train=Dataset.from_dict(split, features=features), test=image_split(4, ["a", "b"])).save_to_disk(
        str(root)
    )
    return root


def test_bad_samples_are_one_error_naming_split_and_row_or_skipped_and_counted(tmp_path):
    root = broken(tmp_path / "bad")
    with pytest.raises(ConfigError, match=r"split 'train' row 1: empty text \(column 'text'\).*on_bad_sample"):
        HuggingFaceDataset(str(root)).load()
    source = HuggingFaceDataset(str(root), on_bad_sample="skip", image_size=16)
    pool, test = source.load()
    assert source.skipped == {"train": 3, "test": 0}
    assert sorted(int(t.split()[1]) for t in pool.texts) == [0, 2, 4, 6, 7]
    assert len(test) == 4


def test_an_undecodable_image_names_its_row(tmp_path):
    root = broken(tmp_path / "bad")
    source = HuggingFaceDataset(str(root), on_bad_sample="skip", check_images="exists", image_size=16)
    pool, _ = source.load()  # `exists` does not open the bytes: the broken image is kept ...
    assert source.skipped["train"] == 2
    broken_at = [int(t.split()[1]) for t in pool.texts].index(3)
    with pytest.raises(ConfigError, match=r"image file .*split 'train' row 3 cannot be decoded"):
        pool.images[torch.tensor([broken_at])]  # ... and named when a batch decodes it


def test_classes_given_map_names_and_unknown_labels_are_bad_samples(tmp_path):
    source = HuggingFaceDataset(str(saved(tmp_path / "ds")), classes=["mango", "zebra"], on_bad_sample="skip",
                                image_size=16)  # fmt: skip
    pool, _ = source.load()
    assert source.skipped["train"] == 3  # the "apple" samples
    assert pool.labels.tolist() == [1, 0, 1, 0, 1, 0]  # zebra -> 1, mango -> 0


def test_missing_path_split_and_column_are_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data.dataset.path: .*nowhere does not exist \(fedilora never downloads"):
        HuggingFaceDataset(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"biecho/hateful_memes does not exist.*`hf download <id>"):
        HuggingFaceDataset("biecho/hateful_memes")
    root = saved(tmp_path / "ds")
    with pytest.raises(ConfigError, match=r"no split 'test_seen' \(splits: train, test\); set data.dataset.test_split"):
        HuggingFaceDataset(str(root), test_split="test_seen").load()
    with pytest.raises(ConfigError, match=r"split 'train': no column 'caption' \(columns: image, text, label\)"):
        HuggingFaceDataset(str(root), text_column="caption").load()
    with pytest.raises(ConfigError, match=r"has 3 classes .* a binary task has 2"):
        _ = HuggingFaceDataset(str(root), task="binary").classes
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match=r"notes.txt: cannot tell the format from the extension '.txt'"):
        HuggingFaceDataset(str(tmp_path / "notes.txt")).load()


def test_reading_never_touches_the_network(tmp_path, monkeypatch):
    root = tmp_path / "pq"
    (root / "data").mkdir(parents=True)
    image_split(6, ["a", "b"]).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    image_split(3, ["a", "b"]).to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    seen = []

    def no_network(*args, **kwargs):
        seen.append(datasets.config.HF_HUB_OFFLINE)
        raise OSError("network access during a local read")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # even where the user left the Hub on
    flags = []
    real_load = datasets.load_dataset

    def spy(*args, **kwargs):
        flags.append(datasets.config.HF_HUB_OFFLINE)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    pool, test = HuggingFaceDataset(str(root), image_size=16, cache_dir=str(tmp_path / "cache")).load()
    assert (len(pool), len(test)) == (6, 3)
    assert flags == [True] and seen == []  # read with the Hub off, and no connection was attempted
    assert datasets.config.HF_HUB_OFFLINE is False  # the user's setting is restored afterwards


def test_datamodule_partitions_an_hf_dataset_and_decodes_only_present_images(tmp_path):
    source = HuggingFaceDataset(str(saved(tmp_path / "ds", sizes=(24, 6))), image_size=32)
    datamodule = FederatedDataModule(dataset=source, num_clients=3, missing_rate=0.5, missing_kind="image",
                                     val_fraction=0.0, test_fraction=0.25, batch_size=4)  # fmt: skip
    datamodule.setup()
    assert datamodule.num_classes == 3
    seen = 0
    for client in range(3):
        for batch in datamodule.client_dataloader(client, "train", torch.Generator().manual_seed(0)):
            present = batch["image_present"]
            assert batch["image"].shape[1:] == (3, 32, 32)
            assert (batch["image"][~present] == 0).all()  # missing images are never decoded
            if present.any():
                assert colour_class(batch["image"][present]) == batch["label"][present].tolist()
            seen += len(batch["label"])
    assert seen == sum(datamodule.num_train_samples(c) for c in range(3))
    batch = next(iter(datamodule.global_test_dataloader("complete")))
    assert colour_class(batch["image"]) == batch["label"].tolist()


def hub_hateful_memes(root: Path) -> Path:
    """The layout of the Hub dataset biecho/hateful_memes, saved with save_to_disk: splits train,
    dev_seen, dev_unseen, test_seen, test_unseen; columns id, image, text, label (int 0/1); one dev_seen
    meme without its image, as in that copy."""
    features = Features({"id": Value("string"), "image": HFImage(), "text": Value("string"), "label": Value("int64")})
    splits = {}
    for k, (split, n) in enumerate((("train", 16), ("dev_seen", 4), ("dev_unseen", 4), ("test_seen", 8),
                                    ("test_unseen", 4))):  # fmt: skip
        ids = [f"{k}{i:04d}" for i in range(n)]
        images = [{"bytes": png(COLOURS[i % 2]), "path": None} for i in range(n)]
        if split == "dev_seen":
            images[3] = None  # that copy lacks some dev images
        splits[split] = Dataset.from_dict({"id": ids, "image": images,
                                           "text": [f"meme {x}" for x in ids], "label": [i % 2 for i in range(n)]},
                                          features=features)  # fmt: skip
    DatasetDict(splits).save_to_disk(str(root))
    return root


@pytest.mark.filterwarnings("ignore:No (positive|negative) samples in targets")  # tiny client test splits
def test_one_federated_round_through_the_cli_with_the_hub_hateful_memes_config(tmp_path, capsys):
    root = hub_hateful_memes(tmp_path / "hm")
    main(["fit", "--config", "configs/fedilora.yaml", "--data", "configs/datasets/hf_hateful_memes.yaml",
          "--data.dataset.init_args.path", str(root), "--data.dataset.init_args.image_size", "32",
          "--data.num_workers", "0", "--data.num_clients", "2", "--data.test_fraction", "0.25",
          "--trainer.ranks", "[4, 2]", "--trainer.clients_per_round", "2", "--trainer.rounds", "1",
          "--trainer.max_local_steps", "2", "--trainer.root_dir", str(tmp_path / "runs"),
          "--trainer.progress", "false"])  # fmt: skip
    results = json.loads((tmp_path / "runs" / "fedilora" / "version_0" / "results.json").read_text())
    assert list(results["global"]) == ["complete", "image_only", "text_only"]
    for values in results["global"].values():
        assert list(values)[:2] == ["auroc", "acc"]
    assert results["personalized_clients"] == 2
    assert "| auroc" in capsys.readouterr().out
    source = HuggingFaceDataset(str(root), train_split=["train", "dev_seen"], test_split="test_seen", task="binary",
                                on_bad_sample="skip")  # fmt: skip
    pool, test = source.load()
    assert (len(pool), len(test)) == (19, 8)  # train + dev_seen pooled, less the meme without image
    assert source.skipped == {"train": 1, "test": 0}
    with pytest.raises(ConfigError, match=r"split 'dev_seen' row 3: no image \(column 'image'\)"):
        HuggingFaceDataset(str(root), train_split=["train", "dev_seen"], test_split="test_seen", task="binary").load()


# ------------------------------------------------------------------------------ issue 22's cases
def test_repeated_captions_count_exact_copies_across_splits(tmp_path):
    features = Features({"image": HFImage(), "text": Value("string"), "label": ClassLabel(names=["a", "b"])})
    train = image_split(8, ["a", "b"]).to_dict()
    train["text"][2] = train["text"][0]  # a caption twice within the pool, with two different images
    train["image"][2] = {"bytes": png(COLOURS[2]), "path": None}
    test = image_split(4, ["a", "b"], offset=100).to_dict()
    test["text"][0] = train["text"][0]  # same caption, same image bytes as train row 0: an exact copy
    test["text"][1] = train["text"][1]  # same caption as train row 1, another image: not a copy
    test["image"][1] = {"bytes": png(COLOURS[2]), "path": None}
    root = tmp_path / "rep"
    DatasetDict(train=Dataset.from_dict(train, features=features),
                test=Dataset.from_dict(test, features=features)).save_to_disk(str(root))  # fmt: skip
    datamodule = FederatedDataModule(dataset=HuggingFaceDataset(str(root), image_size=16), num_clients=2,
                                     val_fraction=0.0, test_fraction=0.0)  # fmt: skip
    datamodule.setup()
    assert datamodule.duplicates["global_test"] == 1 and datamodule.duplicates["global_test_total"] == 4
    images = datamodule.pool.images
    assert images.digest(0) != images.digest(2)  # one caption, two images
    assert images.digest(0) == datamodule.test.images.digest(0) and images.digest(0) == images.digest(4)


def test_an_empty_dataset_is_said_to_be_empty(tmp_path):
    features = Features({"image": HFImage(), "text": Value("string"), "label": ClassLabel(names=["a", "b"])})
    empty = Dataset.from_dict({"image": [], "text": [], "label": []}, features=features)
    empty.save_to_disk(str(tmp_path / "one"))
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'one'}: the dataset is empty$"):
        _ = HuggingFaceDataset(str(tmp_path / "one"), test_split=None).classes
    DatasetDict(train=empty, test=image_split(3, ["a", "b"])).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ConfigError, match=r"dict: the dataset is empty \(no rows in split 'train'\)$"):
        HuggingFaceDataset(str(tmp_path / "dict")).load()
    empty.to_parquet(str(tmp_path / "none.parquet"))
    with pytest.raises(ConfigError, match=r"none\.parquet: the dataset is empty \(its data files hold no rows\)"):
        HuggingFaceDataset(str(tmp_path / "none.parquet"), test_split=None, cache_dir=str(tmp_path / "c")).load()


def test_all_rows_skipped_for_their_empty_text_say_so(tmp_path):
    train = image_split(6, ["a", "b"]).to_dict()
    train["text"] = [""] * 6
    features = Features({"image": HFImage(), "text": Value("string"), "label": ClassLabel(names=["a", "b"])})
    DatasetDict(train=Dataset.from_dict(train, features=features),
                test=image_split(3, ["a", "b"])).save_to_disk(str(tmp_path / "ds"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"train: no usable sample is left: all 6 skipped as bad samples "
                                          r"\(on_bad_sample: skip\), e\.g\. .*split 'train' row 0: empty text"):
        HuggingFaceDataset(str(tmp_path / "ds"), on_bad_sample="skip", image_size=16).load()
    with pytest.raises(ConfigError, match=r"0 usable samples are too few .*; 6 skipped as bad samples .*empty text"):
        HuggingFaceDataset(str(tmp_path / "ds"), on_bad_sample="skip", test_split=None, image_size=16).load()


def test_a_test_label_absent_from_training_is_a_bad_sample_or_a_warning(tmp_path, caplog):
    features = Features({"image": HFImage(), "text": Value("string"), "label": Value("string")})
    rows = lambda labels: {"image": [{"bytes": png(COLOURS[0]), "path": None}] * len(labels),  # noqa: E731
                           "text": [f"t {i}" for i in range(len(labels))], "label": labels}  # fmt: skip
    DatasetDict(train=Dataset.from_dict(rows(["a", "b"] * 3), features=features),
                test=Dataset.from_dict(rows(["a", "c", "c", "b"]), features=features)).save_to_disk(str(tmp_path / "s"))
    with pytest.raises(ConfigError, match=r"split 'test' row 1: label 'c' is not one of the classes \['a', 'b'\], the "
                                          r"labels of the training data \(2 test sample\(s\) have it"):
        HuggingFaceDataset(str(tmp_path / "s"), image_size=16).load()
    source = HuggingFaceDataset(str(tmp_path / "s"), on_bad_sample="skip", image_size=16)
    _, test = source.load()
    assert source.classes == ["a", "b"] and source.skipped == {"train": 0, "test": 2} and len(test) == 2
    # a ClassLabel declares its classes: one without a training sample is kept, and said
    labelled = Features({"image": HFImage(), "text": Value("string"), "label": ClassLabel(names=["a", "b", "c"])})
    DatasetDict(train=Dataset.from_dict(rows([0, 1] * 3), features=labelled),
                test=Dataset.from_dict(rows([0, 2, 2, 1]), features=labelled)).save_to_disk(str(tmp_path / "cl"))
    with caplog.at_level("WARNING", logger="fedilora.data"):
        _, test = HuggingFaceDataset(str(tmp_path / "cl"), image_size=16).load()
    assert len(test) == 4
    warned = [r.getMessage() for r in caplog.records if "never learns" in r.getMessage()]
    assert warned == ["HuggingFaceDataset: 1 test class(es) have no training sample, the model never learns them: "
                      "'c' (2 test sample(s))"]  # fmt: skip


def test_16_bit_image_bytes_decode_in_their_range(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 20), 65535 // 4, np.uint16)).save(buffer, "PNG")  # I;16, a quarter of white
    features = Features({"image": HFImage(), "text": Value("string"), "label": ClassLabel(names=["a", "b"])})
    split = Dataset.from_dict({"image": [{"bytes": buffer.getvalue(), "path": None}] * 2, "text": ["x", "y"],
                               "label": [0, 1]}, features=features)  # fmt: skip
    DatasetDict(train=split, test=split).save_to_disk(str(tmp_path / "deep"))
    pool, _ = HuggingFaceDataset(str(tmp_path / "deep"), image_size=16, check_images="decode").load()
    assert pool.images[torch.tensor([0])].unique().tolist() == [64]  # 16383 / 65535 * 255 = 63.75
