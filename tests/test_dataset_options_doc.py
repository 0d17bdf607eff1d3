"""Every dataset that reads image files takes the image options (declared once, in data/images.py) as flat
init arguments, with its own defaults, documented as the code has them."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from fedilora.checkpoint import describe
from fedilora.data import FileSource, HatefulMemes, HuggingFaceDataset, MMIMDb, MultimodalTable, UPMCFood101
from fedilora.data.images import image_options
from fedilora.errors import ConfigError


def documented_default(cls: type, option: str) -> str | None:
    """The value the docstring's ``option:`` entry marks as the default: ``value`` (default...) or
    (default: ``value``...), None if it names none."""
    doc = inspect.getdoc(cls) or ""
    match = re.search(rf"^\s*{option}: (.*?)(?=^\s*\w+: |\Z)", doc, re.S | re.M)
    assert match, f"{cls.__name__} does not document {option}"
    entry = " ".join(match.group(1).split())
    found = re.search(r"``(\w+)`` \(default|\(default: ``(\w+)``", entry)
    return (found.group(1) or found.group(2)) if found else None


@pytest.mark.parametrize("cls", [FileSource, UPMCFood101, MMIMDb, HatefulMemes, MultimodalTable, HuggingFaceDataset])
def test_check_images_default_is_the_documented_one(cls: type) -> None:
    default = inspect.signature(cls.__init__).parameters["check_images"].default
    assert documented_default(cls, "check_images") == default


def test_the_doc_reader_sees_a_wrong_default() -> None:
    class Wrong(FileSource):
        """A source.

        Args:
            check_images: ``exists`` or ``auto`` (default: ``decode`` under skip).
            cache_size: Decoded images kept.
        """

    assert documented_default(Wrong, "check_images") == "auto" != "header"


# Each dataset's image-option defaults as they were when each class declared them itself: configs and
# checkpoint fingerprints name these flat keys, so a default that moved would change what old configs run.
DEFAULTS = {"image_size": 224, "on_bad_sample": "error", "cache_size": 1024, "max_samples": None, "seed": 0}
CHECK_DEFAULT = {FileSource: "auto", UPMCFood101: "header", MMIMDb: "header", HatefulMemes: "header",
                 MultimodalTable: "auto", HuggingFaceDataset: "header"}  # fmt: skip


@pytest.mark.parametrize("cls", list(CHECK_DEFAULT))
def test_every_dataset_takes_the_image_options_flat_with_its_defaults(cls: type) -> None:
    parameters = inspect.signature(cls.__init__).parameters
    assert {name: parameters[name].default for name in [*DEFAULTS, "check_images"]} == {
        **DEFAULTS, "check_images": CHECK_DEFAULT[cls]
    }
    for name in DEFAULTS:
        assert documented_default(cls, name) is None or name == "on_bad_sample", name
    assert documented_default(cls, "on_bad_sample") == "error"


def test_a_dataset_built_in_python_gets_its_own_default_not_its_base_class(tmp_path: Path) -> None:
    # UPMCFood101 passes the options on to FileSource, whose check_images default is auto (decode under skip)
    food = UPMCFood101(str(tmp_path), on_bad_sample="skip", image_size=32)
    assert (food.check_images, food.image_size, food.image_options.check_images) == ("header", 32, "header")
    (tmp_path / "t.csv").write_text("image,text,label\n")
    assert MultimodalTable(str(tmp_path / "t.csv"), on_bad_sample="skip").check_images == "decode"
    with pytest.raises(TypeError):
        UPMCFood101(str(tmp_path), None, 32)  # the image options are keyword-only: no silent shift


def test_the_fingerprint_keeps_the_flat_image_options(tmp_path: Path) -> None:
    described = describe(UPMCFood101(str(tmp_path), ["a", "b"], image_size=48, max_samples=5))
    assert described["class_path"] == "UPMCFood101"
    assert {k: described["init_args"][k] for k in [*DEFAULTS, "check_images"]} == {
        **DEFAULTS, "image_size": 48, "max_samples": 5, "check_images": "header"
    }


@pytest.mark.parametrize(
    ("options", "line"),
    [
        ({"image_size": 4}, "data.dataset.image_size: must be >= 8, got 4"),
        ({"on_bad_sample": "drop"}, "data.dataset.on_bad_sample: unknown 'drop'; allowed: error, skip"),
        ({"check_images": "full"}, "data.dataset.check_images: unknown 'full'; allowed: auto, exists, header, decode"),
        ({"cache_size": -1}, "data.dataset.cache_size: must be >= 0, got -1"),
        ({"max_samples": 0}, "data.dataset.max_samples: must be >= 1 or null, got 0"),
    ],
)
def test_a_bad_image_option_is_one_line_naming_it(tmp_path: Path, options: dict, line: str) -> None:
    with pytest.raises(ConfigError) as raised:
        HatefulMemes(str(tmp_path), **options)
    assert str(raised.value) == line


def test_image_options_refuses_a_default_for_an_unknown_option_or_a_bad_one() -> None:
    with pytest.raises(TypeError, match="image_sise"):
        image_options(image_sise=32)
    with pytest.raises(ConfigError, match="check_images"):
        image_options(check_images="everything")
