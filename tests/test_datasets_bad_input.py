"""Every kind of bad input gives one clear error naming the file and line (or option), or a counted skip."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image

from fedilora.data import DataError, FederatedDataModule, HatefulMemes, MMIMDb, MultimodalTable, UPMCFood101
from fedilora.data.files import decode_image, image_problem
from fedilora.errors import ConfigError
from test_datasets_fixtures import make_food101, make_hateful_memes, make_mmimdb, make_table, table


def _append_line(path, line):
    path.write_text(path.read_text() + line + "\n")


def _replace_line(path, number, line):
    lines = path.read_text().splitlines()
    lines[number - 1] = line
    path.write_text("\n".join(lines) + "\n")


def _replace_line_bytes(path, number, line: bytes):
    lines = path.read_bytes().splitlines()
    lines[number - 1] = line
    path.write_bytes(b"\n".join(lines) + b"\n")


# ------------------------------------------------------------------------------ missing paths
def test_a_root_that_does_not_exist(tmp_path):
    for cls in (UPMCFood101, MMIMDb, HatefulMemes):
        with pytest.raises(ConfigError, match=r"data\.dataset\.root: .*nowhere does not exist.*never downloads"):
            cls(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"data\.dataset\.path: .*nowhere\.csv does not exist"):
        table(tmp_path / "nowhere.csv")


@pytest.mark.parametrize(
    ("build", "cls", "remove", "message"),
    [
        (make_food101, UPMCFood101, "texts/test_titles.csv", r"test_titles\.csv: missing split file"),
        (make_food101, UPMCFood101, "images/train", r"images/train: missing split directory"),
        (make_mmimdb, MMIMDb, "split.json", r"split\.json: missing split file split\.json"),
        (make_hateful_memes, HatefulMemes, "test_seen.jsonl", r"test_seen\.jsonl: missing split file"),
    ],
)
def test_a_missing_split_file(tmp_path, build, cls, remove, message):
    root = build(tmp_path / "data")
    target = root / remove
    if target.is_dir():
        for child in sorted(target.rglob("*"), reverse=True):
            child.unlink() if child.is_file() else child.rmdir()
        target.rmdir()
    else:
        target.unlink()
    with pytest.raises(ConfigError, match=message):
        cls(str(root), image_size=32).load()


def test_mmimdb_split_file_without_a_split(tmp_path):
    root = make_mmimdb(tmp_path / "mmimdb")
    (root / "split.json").write_text(json.dumps({"train": ["0000001"], "test": ["0000002"]}))
    with pytest.raises(ConfigError, match=r"split\.json: no 'dev' list of ids"):
        MMIMDb(str(root), image_size=32).load()
    assert len(MMIMDb(str(root), image_size=32, include_dev=False).load()[0]) == 1


# ---------------------------------------------------------------------------- per-sample problems
def _food_row(line):
    def corrupt(root):
        _replace_line(root / "texts" / "train_titles.csv", 3, line)

    return corrupt


def _food_image(kind):
    def corrupt(root):
        path = root / "images" / "train" / "apple_pie" / "apple_pie_train_2.jpg"
        if kind == "missing":
            path.unlink()
        else:
            path.write_bytes(b"this is not a jpeg")

    return corrupt


def _mmimdb_json(root):
    (root / "dataset" / "0000002.json").write_text('{"plot": ["Two friends"], "genres": ["Comedy"')


def _mmimdb_empty_plot(root):
    (root / "dataset" / "0000002.json").write_text(json.dumps({"plot": [""], "genres": ["Comedy"]}))


def _mmimdb_missing_item(root):
    (root / "dataset" / "0000002.json").unlink()


def _memes_line(line):
    def corrupt(root):
        _replace_line(root / "train.jsonl", 2, line)

    return corrupt


def _memes_image(root):
    (root / "img" / "10002.png").write_bytes(b"\x89PNG broken")


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _food_latin1(root):  # "café" saved as Latin-1: the byte 0xe9 is not UTF-8
    _replace_line_bytes(root / "texts" / "train_titles.csv", 3, b"apple_pie_train_2.jpg,caf\xe9 apple pie,apple_pie")


def _memes_latin1(root):
    _replace_line_bytes(
        root / "train.jsonl", 2, b'{"id": 10002, "img": "img/10002.png", "label": 1, "text": "caf\xe9 hate"}'
    )


def _memes_lone_surrogate(root):  # valid JSON and valid UTF-8, but the text is not valid Unicode
    _replace_line(root / "train.jsonl", 2, '{"id": 10002, "img": "img/10002.png", "label": 1, "text": "a \\ud800 b"}')


FOOD_LINE = r"train_titles\.csv line 3: "
MEMES_LINE = r"train\.jsonl line 2: "
CASES = {
    # name: (builder, dataset class, corruption, expected message, split that loses one sample)
    "csv row with the wrong number of columns": (
        make_food101, UPMCFood101, _food_row("apple_pie_train_2.jpg,only two columns"),
        FOOD_LINE + r"expected 3 columns \(image file name, text, class\), got 2", "train"),
    "label not in the class list": (
        make_food101, UPMCFood101, _food_row("apple_pie_train_2.jpg,some pizza,pizza"),
        FOOD_LINE + r"class 'pizza' is not one of the 3 classes", "train"),
    "empty text": (
        make_food101, UPMCFood101, _food_row('apple_pie_train_2.jpg,"  ",apple_pie'), FOOD_LINE + "empty text",
        "train"),
    "missing image file": (
        make_food101, UPMCFood101, _food_image("missing"),
        FOOD_LINE + r"image file .*apple_pie_train_2\.jpg does not exist", "train"),
    "image that cannot be decoded": (
        make_food101, UPMCFood101, _food_image("garbage"),
        FOOD_LINE + r"image file .*apple_pie_train_2\.jpg cannot be decoded", "train"),
    "json file that does not parse": (
        make_mmimdb, MMIMDb, _mmimdb_json, r"dataset/0000002\.json: not valid JSON \(Expecting", "train"),
    "mmimdb empty plot": (
        make_mmimdb, MMIMDb, _mmimdb_empty_plot, r"dataset/0000002\.json: empty text \('plot'\)", "train"),
    "mmimdb id without metadata": (
        make_mmimdb, MMIMDb, _mmimdb_missing_item,
        r"split\.json 'train' entry 1: metadata file .*0000002\.json does not exist", "train"),
    "jsonl line that does not parse": (
        make_hateful_memes, HatefulMemes, _memes_line('{"id": 10002, "img": "img/10002.png", "label": 1,'),
        MEMES_LINE + "not valid JSON", "train"),
    "memes label out of range": (
        make_hateful_memes, HatefulMemes,
        _memes_line('{"id": 10002, "img": "img/10002.png", "label": 2, "text": "x"}'),
        MEMES_LINE + "label 2 is not 0 or 1", "train"),
    "memes empty text": (
        make_hateful_memes, HatefulMemes, _memes_line('{"id": 10002, "img": "img/10002.png", "label": 1, "text": ""}'),
        MEMES_LINE + "empty text", "train"),
    "memes image that cannot be decoded": (
        make_hateful_memes, HatefulMemes, _memes_image, MEMES_LINE + r"image file .*10002\.png cannot be decoded",
        "train"),
    "text that is not UTF-8": (
        make_food101, UPMCFood101, _food_latin1,
        FOOD_LINE + r"not UTF-8 text \(byte 0xe9 at field 2, character 4; save the file as UTF-8\)", "train"),
    "jsonl line that is not UTF-8": (
        make_hateful_memes, HatefulMemes, _memes_latin1, MEMES_LINE + r"not UTF-8 text \(byte 0xe9", "train"),
    "jsonl text with a lone surrogate escape": (
        make_hateful_memes, HatefulMemes, _memes_lone_surrogate,
        MEMES_LINE + r"not UTF-8 text \(a lone surrogate U\+D800 at character 3, from a \\u escape\)",
        "train"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_sample_is_one_clear_error(tmp_path, case):
    build, cls, corrupt, message, _ = CASES[case]
    root = build(tmp_path / "data")
    corrupt(root)
    with pytest.raises(DataError, match=message) as error:
        cls(str(root), image_size=32).load()
    assert isinstance(error.value, ConfigError)  # the CLI prints it as one line, exit status 2
    assert "on_bad_sample" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_sample_is_a_counted_skip(tmp_path, case, caplog):
    build, cls, corrupt, message, split = CASES[case]
    root = build(tmp_path / "data")
    clean = cls(str(root), image_size=32).load()
    corrupt(root)
    dataset = cls(str(root), image_size=32, on_bad_sample="skip")
    with caplog.at_level(logging.WARNING, logger="fedilora.data"):
        pool, test = dataset.load()
    assert dataset.skipped[split] == 1
    assert sum(dataset.skipped.values()) == 1
    assert len(pool) == len(clean[0]) - 1 and len(test) == len(clean[1])
    logged = [r.getMessage() for r in caplog.records if r.name == "fedilora.data"]
    assert len(logged) == 1 and f"{cls.name} {split}: skipped 1 bad sample(s)" in logged[0]
    assert re.search(message, logged[0])


def test_a_second_bad_split_is_counted_apart(tmp_path):
    root = make_food101(tmp_path / "food")
    _replace_line(root / "texts" / "train_titles.csv", 1, "a.jpg,x,nope")
    _replace_line(root / "texts" / "train_titles.csv", 2, "b.jpg,x")
    _replace_line(root / "texts" / "test_titles.csv", 1, "c.jpg,,apple_pie")
    dataset = UPMCFood101(str(root), image_size=32, on_bad_sample="skip")
    pool, test = dataset.load()
    assert dataset.skipped == {"train": 2, "test": 1}
    assert (len(pool), len(test)) == (10, 5)


# --------------------------------------------------------------------------------- generic table
@pytest.mark.parametrize(
    ("kind", "corrupt", "kwargs", "message"),
    [
        ("csv", lambda p: _append_line(p, "pics/000.png,too,many,columns"), {},
         r"data\.csv line 14: expected 3 columns \(as the header row\), got 4"),
        ("csv", lambda p: _append_line(p, "pics/000.png,a caption,lion"), {"classes": ["bird", "cat", "dog"]},
         r"data\.csv line 14: label 'lion' is not one of the classes"),
        ("csv", lambda p: _append_line(p, 'pics/000.png," ",cat'), {}, r"data\.csv line 14: empty text"),
        ("csv", lambda p: _append_line(p, "pics/999.png,a caption,cat"), {},
         r"data\.csv line 14: image file .*999\.png does not exist"),
        ("jsonl", lambda p: _append_line(p, '{"file": "pics/000.png", "caption": '), {},
         r"data\.jsonl line 13: not valid JSON"),
        ("jsonl", lambda p: _append_line(p, '{"file": "pics/000.png", "caption": "x"}'), {},
         r"data\.jsonl line 13: no 'tags' field"),
    ],
)  # fmt: skip
def test_table_bad_rows(tmp_path, kind, corrupt, kwargs, message):
    path = make_table(tmp_path, kind)
    corrupt(path)
    with pytest.raises(ConfigError, match=message):
        table(path, test_path=str(path), **kwargs).load()
    dataset = table(path, test_path=str(path), on_bad_sample="skip", **kwargs)
    pool, test = dataset.load()
    assert dataset.skipped == {"train": 1, "test": 1} and len(pool) == len(test) == 12


def test_table_header_must_name_the_columns(tmp_path):
    path = make_table(tmp_path)
    dataset = MultimodalTable(str(path), image_column="file", text_column="caption")  # no "label" column
    with pytest.raises(ConfigError, match=r"data\.csv line 1: no column 'label' in the header row"):
        dataset.load()


def test_a_split_file_that_does_not_parse(tmp_path):
    root = make_mmimdb(tmp_path / "mmimdb")
    (root / "split.json").write_text('{"train": ["0000001",]}')
    with pytest.raises(ConfigError, match=r"split\.json: not valid JSON \(.* at line 1, column \d+\)"):
        MMIMDb(str(root), image_size=32, on_bad_sample="skip").load()  # a broken split file is never skipped


# ------------------------------------------------------------------------------- non-UTF-8 bytes
def _table_bytes(path, old: bytes, new: bytes):
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new, 1))


@pytest.mark.parametrize(
    ("kind", "old", "new", "message"),
    [
        ("csv", b"sample number 3", b"sample n\xfamber 3", r"data\.csv line 5: not UTF-8 text \(byte 0xfa at field 2"),
        ("csv", b"number 4,dog", b"number 4,d\xf6g", r"data\.csv line 6: not UTF-8 text \(byte 0xf6 at field 3"),
        ("jsonl", b'"sample number 3"', b'"sample n\xfamber 3"', r"data\.jsonl line 4: not UTF-8 text \(byte 0xfa"),
        ("jsonl", b'"tags": "dog"', b'"tags": "d\xf6g"', r"data\.jsonl line 2: not UTF-8 text \(byte 0xf6"),
        ("jsonl", b'"tags": "dog"', b'"tags": "d\\udcf6g"', r"data\.jsonl line 2: label not UTF-8 text \(a lone"),
    ],
)  # fmt: skip
def test_bytes_that_are_not_utf8_make_a_bad_sample_not_a_new_class(tmp_path, kind, old, new, message):
    path = make_table(tmp_path, kind)
    _table_bytes(path, old, new)
    with pytest.raises(DataError, match=message):
        table(path, test_path=str(path)).load()
    dataset = table(path, test_path=str(path), on_bad_sample="skip")
    pool, test = dataset.load()
    assert dataset.classes == ["bird", "cat", "dog"]  # no class made of a replacement character
    assert dataset.skipped == {"train": 1, "test": 1} and len(pool) == len(test) == 11
    assert not any("\ufffd" in text for text in pool.texts)


def test_a_header_row_that_is_not_utf8(tmp_path):
    path = make_table(tmp_path)
    _table_bytes(path, b"caption", b"capti\xf3n")
    with pytest.raises(DataError, match=r"data\.csv line 1: the header row is not UTF-8 text \(byte 0xf3"):
        table(path, on_bad_sample="skip").load()


# ------------------------------------------------------------------------------------ one class
def _relabel(path, label):
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], *(line.rsplit(",", 1)[0] + f",{label}" for line in lines[1:])]) + "\n")


def test_a_single_class_table_is_a_clear_error(tmp_path):
    path = make_table(tmp_path)
    _relabel(path, "cat")
    with pytest.raises(DataError, match=r"data\.csv \(column 'tags'\): only one class \('cat'\) found; .* at least 2"):
        _ = table(path).num_classes  # what the CLI reads first, to size the model's head and metrics
    with pytest.raises(ConfigError, match=r"data\.dataset\.classes: give at least 2 class names"):
        table(path, classes=["cat"])


def test_a_training_pool_of_one_class_is_a_clear_error(tmp_path):
    path = make_table(tmp_path)
    _relabel(path, "cat")
    dm = FederatedDataModule(dataset=table(path, classes=["cat", "dog"]), num_clients=2, tokenizer="fedilora-tiny")
    with pytest.raises(DataError, match=r"every one of the 10 training samples has the label 0 \('cat'\); "):
        dm.setup()

    memes = make_hateful_memes(tmp_path / "hm")
    for file in ("train.jsonl", "dev_seen.jsonl"):
        (memes / file).write_text((memes / file).read_text().replace('"label": 1', '"label": 0'))
    dm = FederatedDataModule(dataset=HatefulMemes(str(memes), image_size=32), num_clients=2, tokenizer="fedilora-tiny")
    with pytest.raises(DataError, match=r"HatefulMemes: every one of the 10 training samples has the label 0"):
        dm.setup()


def test_food101_with_one_class_directory(tmp_path):
    root = make_food101(tmp_path / "food")
    with pytest.raises(ConfigError, match=r"data\.dataset\.classes: give at least 2 class names"):
        UPMCFood101(str(root), classes=["apple_pie"])
    for name in ("bibimbap", "churros"):
        for split in ("train", "test"):
            for file in (root / "images" / split / name).iterdir():
                file.unlink()
            (root / "images" / split / name).rmdir()
    with pytest.raises(DataError, match=r"images/train \(its class directories\): only one class \('apple_pie'\)"):
        _ = UPMCFood101(str(root), image_size=32).num_classes


# ------------------------------------------------------------------------------------ long texts
@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_a_text_over_128_kib_is_kept_for_the_tokenizer_to_truncate(tmp_path, kind):
    path = make_table(tmp_path, kind)
    long = "a very long caption " * 10_000  # 200 kB, more than the csv module's default field limit
    _table_bytes(path, b"sample number 3", long.encode())
    for policy in ("error", "skip"):
        dataset = table(path, test_path=str(path), on_bad_sample=policy)
        pool, _ = dataset.load()
        assert len(pool) == 12 and pool.texts[3] == long and dataset.skipped == {"train": 0, "test": 0}


# ---------------------------------------------------------------------------- image check levels
def test_check_images_auto_decodes_when_skipping(tmp_path):
    path = make_table(tmp_path)
    _truncated(tmp_path / "pics" / "004.png")  # its header is intact: the header check passes it
    assert table(path).check_images == "header" and table(path, on_bad_sample="skip").check_images == "decode"
    assert len(table(path, test_path=str(path)).load()[0]) == 12
    with pytest.raises(DataError, match=r"data\.csv line 6: image file .*004\.png cannot be decoded \(OSError"):
        table(path, test_path=str(path), check_images="decode").load()
    dataset = table(path, test_path=str(path), on_bad_sample="skip")
    pool, test = dataset.load()
    assert dataset.skipped == {"train": 1, "test": 1} and len(pool) == len(test) == 11
    with pytest.raises(ConfigError, match=r"check_images: unknown 'full'; allowed: auto, exists, header, decode"):
        table(path, check_images="full")


# ------------------------------------------------------------------ a test label no training row has
def _test_file_with(path, label, rows):
    """A test file next to ``path``: its rows, then ``rows`` more whose label is ``label``."""
    lines = path.read_text().splitlines()
    extra = [f"pics/{i:03d}.png,unseen sample {i},{label}" for i in range(rows)]
    test = path.with_name("test.csv")
    test.write_text("\n".join([*lines, *extra]) + "\n")
    return test


def test_a_test_label_absent_from_training_is_a_bad_sample_naming_it_and_its_count(tmp_path, caplog):
    path = make_table(tmp_path)
    test = _test_file_with(path, "lion", 2)
    expected = (r"test\.csv line 14: label 'lion' is not one of the classes \['bird', 'cat', 'dog'\], the labels of "
                r"the training data \(2 test sample\(s\) have it, no training sample; list it in data\.dataset")
    with pytest.raises(DataError, match=expected):
        table(path, test_path=str(test)).load()
    dataset = table(path, test_path=str(test), on_bad_sample="skip")
    with caplog.at_level(logging.WARNING, logger="fedilora.data"):
        pool, held = dataset.load()
    assert dataset.classes == ["bird", "cat", "dog"]  # no class without a training sample
    assert dataset.skipped == {"train": 0, "test": 2} and (len(pool), len(held)) == (12, 12)
    assert any("test: skipped 2 bad sample(s)" in r.getMessage() and "'lion'" in r.getMessage()
               for r in caplog.records)  # fmt: skip


def test_a_listed_class_with_test_samples_and_no_training_sample_is_warned_about(tmp_path, caplog):
    path = make_table(tmp_path)
    test = _test_file_with(path, "lion", 3)
    dataset = table(path, test_path=str(test), classes=["bird", "cat", "dog", "lion"])
    with caplog.at_level(logging.WARNING, logger="fedilora.data"):
        _, held = dataset.load()
    assert held.labels.tolist().count(3) == 3  # kept, as the user listed it ...
    warned = [r.getMessage() for r in caplog.records if "no training sample" in r.getMessage()]
    assert warned == ["MultimodalTable: 1 test class(es) have no training sample, the model never learns them: "
                      "'lion' (3 test sample(s))"]  # fmt: skip
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedilora.data"):
        table(path, test_path=str(path), classes=["bird", "cat", "dog", "lion"]).load()
    assert not [r for r in caplog.records if "no training sample" in r.getMessage()]  # a class in neither split


# --------------------------------------------------------------------- every row skipped, and why
def test_all_rows_with_empty_text_under_skip_say_so_not_no_labels(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("file,caption,tags\n" + "".join(f"pics/{i}.png,,{'ab'[i % 2]}\n" for i in range(1000)))
    with pytest.raises(DataError, match=r"data\.csv: no usable row to read the classes from: all 1000 skipped as bad "
                                        r"samples \(on_bad_sample: skip\), e\.g\. .*data\.csv line 2: empty text"):
        _ = table(path, on_bad_sample="skip").num_classes
    with pytest.raises(DataError, match=r"MultimodalTable train: no usable sample is left: all 1000 skipped as bad "
                                        r"samples .*line 2: empty text"):
        table(path, test_path=str(path), on_bad_sample="skip", classes=["a", "b"]).load()
    with pytest.raises(DataError, match=r"0 usable samples are too few to hold out a test set .*; 1000 skipped as "
                                        r"bad samples .*line 2: empty text"):
        table(path, on_bad_sample="skip", classes=["a", "b"]).load()


# --------------------------------------------------------------------- an image path that is a folder
def test_an_image_path_that_is_a_directory_says_so(tmp_path):
    path = make_table(tmp_path)
    _append_line(path, "pics,a caption,cat")
    with pytest.raises(DataError, match=r"data\.csv line 14: image path .*pics is a directory, not an image file"):
        table(path, test_path=str(path), check_images="exists").load()


# ------------------------------------------------------------------- 16-bit and float images
def _grey(path, pixels):
    Image.fromarray(pixels).save(path)  # PIL picks the mode of the array: I;16, F, I
    return path


@pytest.mark.parametrize(
    ("name", "pixels", "expected"),
    [
        ("16bit.png", np.full((12, 12), 32768, np.uint16), 128),  # 32768 / 65535 * 255 = 127.5
        ("16bit.tif", np.full((12, 12), 13107, np.uint16), 51),  # 13107 / 65535 * 255 = 51.0
        ("float.tif", np.full((12, 12), 0.25, np.float32), 64),  # a fraction of white: 0.25 * 255 = 63.75
        ("float255.tif", np.full((12, 12), 200.0, np.float32), 200),  # float values of the 8-bit range
        ("int32.tif", np.full((12, 12), 40000, np.int32), 156),  # 16-bit values held as 32-bit: 155.6
    ],
)
def test_16_bit_and_float_images_decode_in_their_own_range(tmp_path, name, pixels, expected):
    file = _grey(tmp_path / name, pixels)
    decoded = decode_image(file, 8)
    assert decoded.dtype == torch.uint8 and decoded.unique().tolist() == [expected]
    assert image_problem(file, "decode", 8) is None


def test_a_float_image_outside_a_known_range_is_refused_with_the_reason(tmp_path):
    for name, pixels, message in [
        ("wide.tif", np.linspace(-3.0, 900.0, 144, dtype=np.float32).reshape(12, 12),
         r"float pixels in \[-3, 900\], outside the ranges read as such \(\[0, 1\] or \[0, 255\]\); save the image as"),
        ("nan.tif", np.full((12, 12), np.nan, np.float32), r"float pixels that are not finite"),
    ]:  # fmt: skip
        file = _grey(tmp_path / name, pixels)
        with pytest.raises(DataError, match=rf"image file .*{name} cannot be decoded \(ValueError: {message}"):
            decode_image(file, 8)
        assert re.search(message, image_problem(file, "decode", 8))
