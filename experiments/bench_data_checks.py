"""Cost of the load-time data checks: image check levels, duplicate counting, the tokenizer cut.

Generates photo-like JPEGs (512x384, quality 90) and PNGs (500x500) under a temporary directory,
then times, as medians over ``--repeats``:

- ``MultimodalTable.load()`` with ``check_images: header`` and ``decode`` (image_size 224), per image;
- counting exact duplicates between a pool and a test set when no text repeats (nothing is hashed)
  and when every test sample copies a pool sample (every image file is read and hashed);
- tokenizing ordinary captions with and without the cut of long texts, one 200 kB word with the cut and
  a 32 kB word without it.

    .venv/bin/python experiments/bench_data_checks.py [--jpegs 1000] [--pngs 300] [--repeats 3] [--quick]

Wall times swing when other work shares the cores; the CPU times (all threads of the process) are the
steadier figure.
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _bench import write_results
from fedilora.backbone import register_model_configs
from fedilora.data import MultimodalTable
from fedilora.data.datamodule import tokenize_texts
from fedilora.data.duplicates import count_copies


def make_images(root: Path, jpegs: int, pngs: int) -> list[tuple[str, str, str]]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(jpegs + pngs):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)  # smooth colour field plus mild noise
        image = np.asarray(Image.fromarray(small).resize((512, 384), Image.Resampling.BICUBIC)).astype(np.int16)
        image = Image.fromarray((image + rng.integers(-12, 12, image.shape)).clip(0, 255).astype(np.uint8))
        if i < jpegs:
            name = f"{i}.jpg"
            image.save(root / name, quality=90)
        else:
            name = f"{i}.png"
            image.resize((500, 500)).save(root / name)
        rows.append((name, f"caption number {i}", ["cat", "dog", "bird"][i % 3]))
    return rows


def write_table(path: Path, rows: list[tuple[str, str, str]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "text", "label"])
        writer.writerows(rows)


def median_time(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds (CPU: all threads of this process; steadier on a shared machine)."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jpegs", type=int, default=1000)
    parser.add_argument("--pngs", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="40 JPEGs, 10 PNGs, 1 repeat, a 4 kB uncut word")
    args = parser.parse_args()
    if args.quick:
        args.jpegs, args.pngs, args.repeats = 40, 10, 1
    uncut_chars = 4_000 if args.quick else 32_000
    torch.set_num_threads(2)
    results: dict = {"jpegs": args.jpegs, "pngs": args.pngs, "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = make_images(root, args.jpegs, args.pngs)
        for kind, part in (("jpeg", rows[: args.jpegs]), ("png", rows[args.jpegs :])):
            write_table(root / f"{kind}.csv", part)
            for level in ("header", "decode"):

                def load(kind=kind, level=level):
                    table = MultimodalTable(str(root / f"{kind}.csv"), test_path=str(root / f"{kind}.csv"),
                                            image_size=224, check_images=level)  # fmt: skip
                    table.load()

                wall, cpu = (1000 * t / (2 * len(part)) for t in median_time(load, args.repeats))  # pool and test
                results[f"load_{kind}_{level}_ms_per_image"] = {"wall": wall, "cpu": cpu}
                print(f"load, {kind:4s} check_images={level:6s}: {wall:.3f} ms wall, {cpu:.3f} ms CPU per image")

        write_table(root / "all.csv", rows)
        pool, _ = MultimodalTable(str(root / "all.csv"), test_path=str(root / "all.csv"), image_size=224).load()
        everything = torch.arange(len(pool))
        for name, texts in (("unique_texts", [f"other {i}" for i in range(len(pool))]), ("all_copies", pool.texts)):
            probe = type(pool)(pool.images, texts, pool.labels)
            copies = count_copies(pool, everything, probe, everything)
            wall, cpu = median_time(lambda probe=probe: count_copies(pool, everything, probe, everything), args.repeats)
            results[f"duplicates_{name}"] = {"wall_s": wall, "cpu_s": cpu, "found": copies, "samples": len(pool)}
            print(f"duplicates, {name}: {copies} of {len(pool)} found in {wall:.3f} s wall, {cpu:.3f} s CPU")

    import open_clip  # after fedilora (imported above), whose shim must run before torchvision loads

    register_model_configs()
    for model in ("fedilora-tiny", "ViT-B-32"):
        tokenizer = open_clip.get_tokenizer(model)
        rng = random.Random(0)
        words = ["a", "photo", "of", "the", "bowl", "ramen", "with", "egg", "pancakes", "maple", "syrup", "and"]
        captions = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) for _ in range(2000)]
        blob = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(200_000))
        plain = median_time(lambda t=tokenizer, c=captions: t(c), args.repeats)
        cut = median_time(lambda t=tokenizer, c=captions: tokenize_texts(t, c), args.repeats)
        one = median_time(lambda t=tokenizer, b=blob: tokenize_texts(t, [b]), 1)
        uncut = median_time(lambda t=tokenizer, b=blob[:uncut_chars]: t([b]), 1)  # no cut: BPE time grows as length^2
        results[f"tokenize_{model}"] = {
            "captions_plain_s": plain,
            "captions_cut_s": cut,
            "blob_200k_cut_s": one,
            f"blob_{uncut_chars}_uncut_s": uncut,
        }
        print(
            f"tokenize {model}: 2000 captions {plain[1]:.3f} s CPU plain, {cut[1]:.3f} s CPU with the cut; "
            f"one 200 kB word {one[1]:.2f} s CPU with the cut; "
            f"a {uncut_chars // 1000} kB word without it {uncut[1]:.1f} s CPU"
        )
    write_results("data_checks", results, quick=args.quick, threads=2)


if __name__ == "__main__":
    main()
