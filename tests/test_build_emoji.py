"""experiments/build_emoji.py: parsing emoji-test.txt, rendering, the stratified split, reading .deb files.

The real packages are not fetched here (the test runs offline): a small emoji-test.txt whose "emoji" are
letters is rendered with matplotlib's DejaVu Sans instead, and the .deb reader gets a hand-built package.
"""

import csv
import importlib.util
import io
import sys
import tarfile
from pathlib import Path

import matplotlib
import pytest
import torch

from fedilora.data import MultimodalTable

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("build_emoji", ROOT / "experiments" / "build_emoji.py")
build_emoji = importlib.util.module_from_spec(_spec)
sys.modules["build_emoji"] = build_emoji  # dataclasses look their module up
_spec.loader.exec_module(build_emoji)

EMOJI_TEST = """\
# group: Smileys & Emotion

# subgroup: face-smiling
1F600                                                  ; fully-qualified     # 😀 E1.0 grinning face
263A FE0F                                              ; fully-qualified     # ☺️ E0.6 smiling face
263A                                                   ; unqualified         # ☺ E0.6 smiling face

# group: People & Body
1F44B                                                  ; fully-qualified     # 👋 E0.6 waving hand
1F44B 1F3FB                                            ; fully-qualified     # 👋🏻 E1.0 waving hand: light skin tone
1F468 200D 1F469 200D 1F467                            ; fully-qualified     # 👨‍👩‍👧 E2.0 family: man, woman, girl

# group: Component
1F3FB                                                  ; component           # 🏻 E1.0 light skin tone
1F9B0                                                  ; component           # 🦰 E11.0 red hair

# group: Flags
1F1E9 1F1EA                                            ; fully-qualified     # 🇩🇪 E2.0 flag: Germany
"""


def test_parse_keeps_fully_qualified_emoji_without_skin_tones_or_components():
    emoji = build_emoji.parse_emoji_test(EMOJI_TEST)
    assert [(e.codepoints, e.name, e.label) for e in emoji] == [
        ("1F600", "grinning face", "smileys-emotion"),
        ("263A-FE0F", "smiling face", "smileys-emotion"),
        ("1F44B", "waving hand", "people-body"),
        ("1F468-200D-1F469-200D-1F467", "family: man, woman, girl", "people-body"),
        ("1F1E9-1F1EA", "flag: Germany", "flags"),
    ]
    assert emoji[3].char == "\U0001f468\u200d\U0001f469\u200d\U0001f467"


def test_parse_names_the_bad_line():
    with pytest.raises(build_emoji.BuildError, match="line 2"):
        build_emoji.parse_emoji_test("# group: Flags\n1F1E9 1F1EA fully-qualified\n")


def _letters(per_group: dict[str, str]) -> str:
    """An emoji-test.txt whose emoji are letters (DejaVu Sans draws them; no colour font needed)."""
    lines = []
    for group, letters in per_group.items():
        lines.append(f"# group: {group}")
        lines += [f"{ord(c):04X} ; fully-qualified # {c} E1.0 letter {c}" for c in letters]
    return "\n".join(lines) + "\n"


def test_build_writes_a_set_the_csv_loader_reads(tmp_path):
    source = tmp_path / "emoji-test.txt"
    groups = {"Smileys & Emotion": "ABCDEFGHIJ", "Flags": "KLMNO", "Objects": "PQRSTUVWXYZabcdefghi"}
    source.write_text(_letters(groups) + "# group: Objects\n0041 0042 ; fully-qualified # AB E1.0 two glyphs\n")
    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    out = tmp_path / "emoji"
    manifest = build_emoji.build(font, source, out, size=24, test_fraction=0.2, seed=0, font_size=40)
    # "AB" has no single glyph in the font: left out and listed
    assert manifest["skipped_no_glyph"] == ["two glyphs"]
    assert manifest["classes"] == {"flags": {"train": 4, "test": 1}, "objects": {"train": 16, "test": 4},
                                   "smileys-emotion": {"train": 8, "test": 2}}  # fmt: skip
    with (out / "test.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0].keys() == {"image", "text", "label"} and len(rows) == 7
    assert {r["label"] for r in rows} == {"flags", "objects", "smileys-emotion"}  # every class in the test split
    table = MultimodalTable(path=str(out / "train.csv"), test_path=str(out / "test.csv"), image_size=24,
                            check_images="decode")  # fmt: skip
    pool, test = table.load()
    assert table.classes == ["flags", "objects", "smileys-emotion"]
    assert len(pool) == 28 and len(test) == 7
    images = pool.images[torch.arange(len(pool))]
    assert images.shape == (28, 3, 24, 24)
    # a glyph in black on white: every image has dark ink and a white border
    assert (images.flatten(1).min(dim=1).values < 100).all()
    assert (images[:, :, 0, :] > 240).all()
    assert sorted(pool.texts)[0] == "letter A"
    again = build_emoji.build(font, source, tmp_path / "again", size=24, test_fraction=0.2, seed=0, font_size=40)
    assert again["classes"] == manifest["classes"]
    assert (tmp_path / "again" / "train.csv").read_text() == (out / "train.csv").read_text()


def _ar(members: dict[str, bytes]) -> bytes:
    blob = b"!<arch>\n"
    for name, body in members.items():
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
        blob += header + body + (b"\n" if len(body) % 2 else b"")
    return blob


def test_deb_member_reads_the_data_archive(tmp_path):
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as archive:
        payload = b"# group: Flags\n"
        info = tarfile.TarInfo("./usr/share/unicode/emoji/emoji-test.txt")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    deb = tmp_path / "unicode-data_15.0.0-1_all.deb"
    deb.write_bytes(_ar({"debian-binary": b"2.0\n", "control.tar.xz": b"x", "data.tar.xz": data.getvalue()}))
    assert build_emoji.deb_member(deb, build_emoji.EMOJI_TEST_MEMBER) == b"# group: Flags\n"
    with pytest.raises(build_emoji.BuildError, match="has no usr/share/fonts"):
        build_emoji.deb_member(deb, build_emoji.FONT_MEMBER)
    not_a_deb = tmp_path / "x.deb"
    not_a_deb.write_bytes(b"PK\x03\x04")
    with pytest.raises(build_emoji.BuildError, match="not a Debian package"):
        build_emoji.deb_member(not_a_deb, build_emoji.FONT_MEMBER)
