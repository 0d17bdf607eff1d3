"""Data problems that show only once the federated datamodule is set up or read: images that fail to
decode while a client trains, copies of training samples in the test sets, and very long texts."""

from __future__ import annotations

import csv
import logging
import random
import re
import shutil

import open_clip
import pytest
import torch

from fedilora.backbone import register_model_configs
from fedilora.data import DataError, FederatedDataModule
from fedilora.data.datamodule import CHARS_PER_TOKEN, tokenize_texts, tokenizer_input
from fedilora.errors import ConfigError
from helpers import tiny_datamodule
from test_datasets_fixtures import COLOURS, make_table, table, write_image


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # PIL still reads the header: check_images "header" passes it


def _datamodule(dataset, **kwargs) -> FederatedDataModule:
    options = {"num_clients": 2, "val_fraction": 0.0, "test_fraction": 0.0, "tokenizer": "fedilora-tiny"}
    return FederatedDataModule(dataset=dataset, **{**options, **kwargs})


def _read_every_client(dm: FederatedDataModule) -> None:
    for client in range(dm.num_clients):
        for _ in dm.client_dataloader(client, "train", torch.Generator().manual_seed(0)):
            pass


LAZY = (
    r"client (\d)'s train split: .*data\.csv line 6: image file .*pics/004\.png cannot be decoded "
    r"\(OSError: image file is truncated\); the load-time check data\.dataset\.check_images: header does not "
    r"decode images; check_images: decode finds every such file before training"
)


# --------------------------------------------------------------------- images failing in training
@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_image_that_fails_in_training_is_a_data_error_with_file_line_and_client(tmp_path, num_workers):
    path = make_table(tmp_path)
    _truncate(tmp_path / "pics" / "004.png")
    dm = _datamodule(table(path, test_path=str(path)), num_workers=num_workers)
    dm.setup()  # the default check (header) lets the file through
    owner = next(c for c in range(2) if 4 in dm.clients[c]["train"][0].tolist())
    with pytest.raises(DataError) as error:
        _read_every_client(dm)
    message = str(error.value)
    assert isinstance(error.value, ConfigError)  # one line from the CLI, exit status 2
    assert re.fullmatch(LAZY + r", and on_bad_sample: skip then leaves it out", message), message
    assert re.match(LAZY, message).group(1) == str(owner)
    assert "\n" not in message and "Traceback" not in message  # also when a DataLoader worker raised it


def test_an_image_that_fails_in_the_global_test_set_names_it(tmp_path):
    path = make_table(tmp_path)
    test = make_table(tmp_path / "test", n=4)
    _truncate(tmp_path / "test" / "pics" / "002.png")
    dm = _datamodule(table(path, test_path=str(test)))
    dm.setup()
    _read_every_client(dm)
    with pytest.raises(DataError, match=r"^the global test set: .*test/data\.csv line 4: image file .*002\.png"):
        next(iter(dm.global_test_dataloader("complete")))
    next(iter(dm.global_test_dataloader("text_only")))  # a missing image is never decoded


def test_skip_finds_the_image_at_load_time_and_counts_it(tmp_path, caplog):
    path = make_table(tmp_path)
    _truncate(tmp_path / "pics" / "004.png")
    dm = _datamodule(table(path, test_path=str(path), on_bad_sample="skip"))
    with caplog.at_level(logging.WARNING, logger="fedilora.data"):
        dm.setup()
    assert dm.skipped == {"train": 1, "test": 1} and len(dm.pool) == len(dm.test) == 11
    assert any("skipped 1 bad sample(s), kept 11" in r.getMessage() for r in caplog.records)
    _read_every_client(dm)  # nothing left to fail
    assert len(next(iter(dm.global_test_dataloader("complete")))["image"]) == 11


def test_skip_with_a_header_check_still_stops_on_a_late_failure(tmp_path):
    # a sample cannot leave the partition mid-run: with the check lowered by hand, skip cannot apply
    path = make_table(tmp_path)
    _truncate(tmp_path / "pics" / "004.png")
    dm = _datamodule(table(path, test_path=str(path), on_bad_sample="skip", check_images="header"))
    dm.setup()
    assert dm.skipped == {"train": 0, "test": 0}
    with pytest.raises(DataError, match=LAZY):
        _read_every_client(dm)


# ------------------------------------------------------------------------------------ duplicates
def _write_table(path, rows):
    path.write_text("file,caption,tags\n" + "".join(f"{f},{c},{t}\n" for f, c, t in rows))


def test_duplicates_across_train_and_the_global_test_set_are_counted_by_image_bytes(tmp_path, caplog):
    pool = make_table(tmp_path)  # pics/<i>.png, "sample number <i>", 12 distinct samples
    shutil.copy(tmp_path / "pics" / "000.png", tmp_path / "copy_of_000.png")
    write_image(tmp_path / "other_001.png", (1, 2, 3), size=(32, 32))
    test = tmp_path / "test.csv"
    _write_table(
        test,
        [
            ("copy_of_000.png", "sample number 0", "cat"),  # same bytes under another name, same text: a copy
            ("other_001.png", "sample number 1", "dog"),  # same text, another image
            ("pics/002.png", "another caption", "bird"),  # same image, another text
            ("pics/003.png", "sample number 3", "cat"),  # the very same sample
            ("pics/005.png", "sample number 5", "bird"),  # and another
        ],
    )
    dm = _datamodule(table(pool, test_path=str(test)))
    with caplog.at_level(logging.WARNING, logger="fedilora.data"):
        dm.setup()
    assert dm.duplicates["global_test"] == 3 and dm.duplicates["global_test_total"] == 5
    warnings = [r.getMessage() for r in caplog.records if "duplicates" in r.getMessage()]
    assert warnings == [
        "duplicates: 3 of the 5 global test samples are exact copies (same image bytes and text) of samples in the "
        "clients' data; global test metrics overstate generalisation"
    ]


def test_duplicates_between_clients_train_and_evaluation_splits(tmp_path, caplog):
    rows = []
    for i in range(20):
        write_image(tmp_path / f"{i}.png", COLOURS[i % 4], size=(20 + i, 24))
        rows.append((f"{i}.png", f"caption {i}", ["cat", "dog"][i % 2]))
    twins = rows[:10]  # rows 20..29 repeat rows 0..9
    _write_table(tmp_path / "pool.csv", rows + twins)
    _write_table(tmp_path / "test.csv", rows[10:14])
    dm = _datamodule(table(tmp_path / "pool.csv", test_path=str(tmp_path / "test.csv")), val_fraction=0.2)
    dm.setup()
    train = {i for entry in dm.clients for i in entry["train"][0].tolist()}
    held = [i for entry in dm.clients for split in ("val", "test") for i in entry[split][0].tolist()]
    twin = {i: i + 20 for i in range(10)} | {i + 20: i for i in range(10)}
    expected = sum(1 for i in held if twin.get(i) in train)
    assert expected > 0  # the seeded split puts some twins on either side
    assert dm.duplicates["client_eval"] == expected and dm.duplicates["client_eval_total"] == len(held)
    assert dm.duplicates["global_test"] == 4


def test_the_embedded_benchmark_has_no_duplicates(caplog):
    dm = tiny_datamodule()
    with caplog.at_level(logging.WARNING, logger="fedilora.data"):
        dm.setup()
    assert dm.duplicates == {"global_test": 0, "global_test_total": 120, "client_eval": 0, "client_eval_total": 80}
    assert not [r for r in caplog.records if "duplicates" in r.getMessage()]


# ------------------------------------------------------------------------------------- long texts
@pytest.fixture(scope="module")
def clip_tokenizer():
    register_model_configs()
    return open_clip.get_tokenizer("fedilora-tiny")


def test_the_cut_before_tokenizing_keeps_every_token_of_ordinary_text(clip_tokenizer):
    rng = random.Random(0)
    vocabulary = ["a", "photo", "of", "the", "extraordinarily", "café", "🙂", "x" * 40, "&amp;", "42", "--"]
    spaces = [" ", "  ", "\n", "\t ", " \u00a0 "]
    max_chars = CHARS_PER_TOKEN * clip_tokenizer.context_length
    for _ in range(20):
        text = "".join(rng.choice(vocabulary) + rng.choice(spaces) for _ in range(rng.randint(400, 1500)))
        cut = tokenizer_input(text, max_chars)
        assert len(text) > max_chars and max_chars * 3 // 4 <= len(cut) <= max_chars
        assert torch.equal(clip_tokenizer([cut]), clip_tokenizer([text]))
    short = "a  short\ntext"
    assert tokenizer_input(short, max_chars) == short  # untouched: texts within the limit are never changed


def test_a_word_without_spaces_is_cut_inside(clip_tokenizer):
    blob = "".join(random.Random(1).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(200_000))
    max_chars = CHARS_PER_TOKEN * clip_tokenizer.context_length
    assert tokenizer_input(blob, max_chars) == blob[:max_chars]
    tokens = tokenize_texts(clip_tokenizer, [blob])  # the whole blob would take open_clip's BPE hours
    assert tokens.shape == (1, clip_tokenizer.context_length) and tokens[0, -1] == clip_tokenizer.eot_token_id


def test_a_text_over_128_kib_trains_with_its_first_tokens(tmp_path, clip_tokenizer):
    path = make_table(tmp_path, "csv")
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    rows[4][1] = "a very long caption, about a cat " * 7_000  # sample 3: 231 kB, over the csv module's 128 KiB
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    dm = _datamodule(table(path, test_path=str(path)))
    dm.setup()
    assert dm.pool.texts[3] == rows[4][1]
    assert torch.equal(dm.pool_tokens[3], clip_tokenizer([rows[4][1]])[0])
    assert dm.pool_tokens[3, -1] == clip_tokenizer.eot_token_id  # truncated to the context, as any long text
