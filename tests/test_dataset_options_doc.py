"""Every dataset that reads image files documents the default its code has for the image options."""

from __future__ import annotations

import inspect
import re

import pytest

from fedilora.data import FileSource, HatefulMemes, HuggingFaceDataset, MMIMDb, MultimodalTable, UPMCFood101


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
