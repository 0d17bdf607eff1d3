"""Build the emoji image-text classification set from two Debian packages, in the generic CSV layout.

    .venv/bin/python experiments/build_emoji.py                       # apt-get download, then build data/emoji/
    .venv/bin/python experiments/build_emoji.py --debs ~/debs         # .deb files fetched before (offline)
    .venv/bin/python experiments/build_emoji.py --font /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf \\
        --emoji-test /usr/share/unicode/emoji/emoji-test.txt           # files of installed packages

Sources (Debian 12 "bookworm", fetched with ``apt-get download``, nothing installed):

- ``fonts-noto-color-emoji`` 2.042: the Noto Color Emoji font (glyph images Apache-2.0, font SIL OFL 1.1);
- ``unicode-data`` 15.0.0: ``emoji/emoji-test.txt`` (Unicode License; the CLDR short names and the emoji
  groups).

One sample per fully-qualified emoji of Emoji 15.0, without the skin-tone variants (near-duplicate images
of the same emoji, which would leak between train and test): the image is the glyph rendered by Pillow
and scaled onto a white ``--size`` square, the text is the CLDR short name ("grinning face", "flag:
Germany"), the label is the Unicode emoji group (9 classes; "Component" holds only skin tones and hair
parts and is left out). The test split is a stratified ``--test-fraction`` of every class.

Writes ``<out>/images/<codepoints>.png``, ``<out>/train.csv`` and ``<out>/test.csv`` (columns image, text,
label, read by ``fedilora.data.MultimodalTable``: ``configs/datasets/emoji.yaml``), and
``<out>/manifest.json`` (sources with SHA-256, class counts, skipped emoji). Nothing of it belongs in git.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"fonts-noto-color-emoji": "2.042-0+deb12u1", "unicode-data": "15.0.0-1"}
FONT_MEMBER = "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST_MEMBER = "usr/share/unicode/emoji/emoji-test.txt"
SKIN_TONES = range(0x1F3FB, 0x1F3FF + 1)
GROUPS = {  # Unicode emoji group -> class label (Component: skin tones and hair parts, left out)
    "Smileys & Emotion": "smileys-emotion",
    "People & Body": "people-body",
    "Animals & Nature": "animals-nature",
    "Food & Drink": "food-drink",
    "Travel & Places": "travel-places",
    "Activities": "activities",
    "Objects": "objects",
    "Symbols": "symbols",
    "Flags": "flags",
}
NOTO_SIZE = 109  # the only pixel size of the font's colour bitmaps (CBDT strike)


class BuildError(Exception):
    """A source that cannot be fetched or read: one message that says what and where."""


@dataclass(frozen=True)
class Emoji:
    codepoints: str  # "1F600" or "1F468-200D-1F469" (the file name of its image)
    char: str
    name: str
    label: str


def parse_emoji_test(text: str) -> list[Emoji]:
    """The fully-qualified emoji of an ``emoji-test.txt``, without skin-tone variants and outside Component."""
    emoji, group = [], None
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
            continue
        if not line.strip() or line.startswith("#"):
            continue
        try:
            code, rest = line.split(";", 1)
            status, comment = rest.split("#", 1)
            points = [int(c, 16) for c in code.split()]
            # the comment is "<emoji> E<version> <name>"
            name = comment.split(None, 2)[2].strip()
        except (ValueError, IndexError):
            raise BuildError(
                f"emoji-test.txt line {number}: not '<code points> ; <status> # <emoji> E<v> <name>'"
            ) from None
        if status.strip() != "fully-qualified" or group not in GROUPS or any(p in SKIN_TONES for p in points):
            continue
        emoji.append(Emoji("-".join(f"{p:04X}" for p in points), "".join(map(chr, points)), name, GROUPS[group]))
    return emoji


def render(char: str, font: ImageFont.FreeTypeFont, size: int) -> Image.Image | None:
    """The glyph of ``char`` cropped to its ink and scaled onto a white ``size`` square; None if the font
    has no single glyph for it (nothing drawn, or several glyphs side by side)."""
    # a sequence the font has no ligature for is drawn as its parts side by side: wider than any part
    widest_part = max(font.getlength(part) for part in char)
    if font.getlength(char) > 1.5 * widest_part:
        return None
    *_, right, bottom = font.getbbox(char)
    canvas = Image.new("RGBA", (max(right, 1) + 4, max(bottom, 1) + 4), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((2, 2), char, font=font, embedded_color=True, fill=(0, 0, 0, 255))
    ink = canvas.getchannel("A").getbbox()
    if ink is None:  # no glyph: nothing drawn
        return None
    width, height = ink[2] - ink[0], ink[3] - ink[1]
    glyph = canvas.crop(ink)
    scale = (size - 2) / max(width, height)
    glyph = glyph.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)
    out = Image.new("RGB", (size, size), (255, 255, 255))
    out.paste(glyph, ((size - glyph.width) // 2, (size - glyph.height) // 2), glyph)
    return out


def stratified_split(emoji: list[Emoji], test_fraction: float, seed: int) -> tuple[list[Emoji], list[Emoji]]:
    """``round(test_fraction * n_c)`` samples of every class ``c`` (at least one) go to the test split."""
    rng = random.Random(seed)
    train, test = [], []
    for label in sorted({e.label for e in emoji}):
        members = [e for e in emoji if e.label == label]
        rng.shuffle(members)
        n_test = max(1, round(test_fraction * len(members)))
        test += members[:n_test]
        train += members[n_test:]
    key = lambda e: e.codepoints  # noqa: E731
    return sorted(train, key=key), sorted(test, key=key)


def build(
    font_path: Path,
    emoji_test_path: Path,
    out: Path,
    size: int = 72,
    test_fraction: float = 0.2,
    seed: int = 0,
    font_size: int = NOTO_SIZE,
    sources: dict | None = None,
) -> dict:
    """Render every emoji of ``emoji_test_path`` with ``font_path`` into ``out``; returns the manifest."""
    try:
        font = ImageFont.truetype(str(font_path), font_size)
    except OSError as err:
        raise BuildError(f"{font_path}: not a font Pillow can read at size {font_size} ({err})") from None
    try:
        emoji = parse_emoji_test(emoji_test_path.read_text(encoding="utf-8"))
    except OSError as err:
        raise BuildError(f"{emoji_test_path}: cannot read ({err.strerror})") from None
    if not emoji:
        raise BuildError(f"{emoji_test_path}: no fully-qualified emoji found")
    (out / "images").mkdir(parents=True, exist_ok=True)
    kept, skipped = [], []
    for item in emoji:
        image = render(item.char, font, size)
        if image is None:
            skipped.append(item.name)
            continue
        image.save(out / "images" / f"{item.codepoints}.png", optimize=True)
        kept.append(item)
    train, test = stratified_split(kept, test_fraction, seed)
    for split, items in (("train", train), ("test", test)):
        with (out / f"{split}.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", "text", "label"])
            writer.writerows([f"images/{e.codepoints}.png", e.name, e.label] for e in items)
    manifest = {
        "sources": sources or {"font": str(font_path), "emoji_test": str(emoji_test_path)},
        "image_size": size,
        "test_fraction": test_fraction,
        "seed": seed,
        "samples": {"train": len(train), "test": len(test)},
        "classes": {
            label: {"train": n, "test": Counter(e.label for e in test)[label]}
            for label, n in sorted(Counter(e.label for e in train).items())
        },
        "skipped_no_glyph": skipped,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    return manifest


# ---------------------------------------------------------------------------------------- Debian packages
def deb_member(deb: Path, member: str) -> bytes:
    """One file of a ``.deb``'s data archive, read in Python (an ar archive holding ``data.tar.*``), so that
    building needs neither ``dpkg-deb`` nor root."""
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise BuildError(f"{deb}: not a Debian package (no ar header)")
    offset = 8
    while offset + 60 <= len(blob):
        header = blob[offset : offset + 60]
        name = header[:16].decode().strip().rstrip("/")
        length = int(header[48:58].decode().strip())
        body = blob[offset + 60 : offset + 60 + length]
        offset += 60 + length + (length % 2)
        if not name.startswith("data.tar"):
            continue
        if name.endswith(".zst"):
            raise BuildError(
                f"{deb}: {name} is zstd-compressed; extract {member} with dpkg-deb -x and pass it directly"
            )
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as archive:
            for candidate in (member, f"./{member}"):
                try:
                    handle = archive.extractfile(candidate)
                except KeyError:
                    continue
                if handle is not None:
                    return handle.read()
        raise BuildError(f"{deb}: has no {member}")
    raise BuildError(f"{deb}: no data.tar member")


def fetch_debs(dest: Path) -> list[Path]:
    """``apt-get download`` the pinned packages into ``dest`` (no root, nothing installed)."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted = [f"{name}={version}" for name, version in PACKAGES.items()]
    try:
        done = subprocess.run(["apt-get", "download", *wanted], cwd=dest, capture_output=True, text=True)
    except FileNotFoundError:
        raise BuildError("apt-get not found: fetch the .deb files elsewhere and pass --debs, or pass --font and "
                         "--emoji-test") from None  # fmt: skip
    if done.returncode != 0:
        raise BuildError(f"apt-get download {' '.join(wanted)} failed: {done.stderr.strip()[-500:]}")
    return [_find_deb(dest, name) for name in PACKAGES]


def _find_deb(folder: Path, package: str) -> Path:
    found = sorted(folder.glob(f"{package}_{PACKAGES[package].replace(':', '%3a')}_*.deb"))
    if not found:
        raise BuildError(f"{folder}: no {package}_{PACKAGES[package]}_*.deb")
    return found[-1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "emoji")
    parser.add_argument("--debs", type=Path, help="folder with the two .deb files (default: apt-get download)")
    parser.add_argument("--font", type=Path, help="NotoColorEmoji.ttf (instead of the package)")
    parser.add_argument("--emoji-test", type=Path, help="emoji-test.txt (instead of the package)")
    parser.add_argument("--size", type=int, default=72, help="side of the written images in pixels")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if (args.font is None) != (args.emoji_test is None):
            raise BuildError("--font and --emoji-test go together")
        if not 0.0 < args.test_fraction < 1.0 or args.size < 8:
            raise BuildError("--test-fraction must be in (0, 1) and --size >= 8")
        if args.font is not None:
            font, emoji_test = args.font, args.emoji_test
            sources = {"font": str(font), "emoji_test": str(emoji_test), "font_sha256": _sha256(font)}
        else:
            work = args.out / "_debs"
            debs = [_find_deb(args.debs, name) for name in PACKAGES] if args.debs else fetch_debs(work)
            work.mkdir(parents=True, exist_ok=True)
            font, emoji_test = work / "NotoColorEmoji.ttf", work / "emoji-test.txt"
            font.write_bytes(deb_member(debs[0], FONT_MEMBER))
            emoji_test.write_bytes(deb_member(debs[1], EMOJI_TEST_MEMBER))
            sources = {deb.name: {"sha256": _sha256(deb)} for deb in debs}
        manifest = build(font, emoji_test, args.out, args.size, args.test_fraction, args.seed, sources=sources)
    except BuildError as err:
        print(f"build_emoji: error: {err}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{label} {c['train'] + c['test']}" for label, c in manifest["classes"].items())
    print(f"{manifest['samples']['train']} train + {manifest['samples']['test']} test samples in {args.out}: {counts}")
    if manifest["skipped_no_glyph"]:
        print(f"skipped (no glyph in the font): {len(manifest['skipped_no_glyph'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
