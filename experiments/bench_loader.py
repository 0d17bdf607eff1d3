"""Does image decoding keep up with training? DataLoader workers that persist against re-spawned ones.

Generates photo-like JPEGs (512x384, quality 90; ``bench_data_checks.make_images``) read through a
``MultimodalTable`` at ``image_size`` 224 with the decoded-image cache off (``cache_size: 0``: every read
decodes), and measures on this CPU:

1. decode throughput: images/s of the datamodule's loader over the pooled training split, batch 32,
   with ``num_workers`` 0, 1, 2;
2. the training step at ViT-B-32 size (random init, LoRA rank 8 on both towers, batch 16, 224 px):
   forward + backward + AdamW, samples/s;
3. the cost per round of the workers: ``--rounds`` rounds of ``--clients`` clients each reading its first
   ``--steps`` batches (as ``max_local_steps`` does), (a) through a DataLoader built per client and round,
   as before the worker pool (its workers start and stop on every read), against (b) the datamodule's
   persistent ``WorkerPool`` (started once).

Every figure has its wall time and its CPU time: this process (all threads) plus its DataLoader worker
processes (read from /proc while they live, from the reaped-children counters once they were joined).
On a shared machine the CPU time is the steadier figure.

    .venv/bin/python experiments/bench_loader.py [--images 600] [--rounds 3] [--clients 10] [--steps 2] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from _bench import write_results
from bench_data_checks import make_images, write_table
from fedilora.data import FederatedDataModule, MultimodalTable
from fedilora.model import LoRACLIPClassifier

_TICK = os.sysconf("SC_CLK_TCK")


def _live_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) of running processes, from /proc/<pid>/stat."""
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime: fields 14, 15 of stat
    return total


def cpu_now(pids: list[int] = ()) -> float:
    """This process's CPU seconds, those of its reaped children (joined DataLoader workers) and of ``pids``."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system + _live_cpu(list(pids))


def pool_pids(dm: FederatedDataModule) -> list[int]:
    pool = dm._pool
    if pool is None or pool.loader._iterator is None:
        return []
    return [w.pid for w in pool.loader._iterator._workers]


def datamodule(csv: Path, num_clients: int, num_workers: int) -> FederatedDataModule:
    dm = FederatedDataModule(
        dataset=MultimodalTable(str(csv), test_path=str(csv), image_size=224, cache_size=0, check_images="exists"),
        num_clients=num_clients,
        batch_size=32,
        val_fraction=0.0,
        test_fraction=0.0,
        tokenizer="ViT-B-32",
        num_workers=num_workers,
    )
    dm.setup()
    return dm


def decode_throughput(csv: Path, num_workers: int, repeats: int) -> dict:
    """Images/s reading the pooled training split; the best of ``repeats`` passes after one warm pass
    (the pool's workers started in it)."""
    dm = datamodule(csv, 10, num_workers)
    images = sum(len(b["image"]) for b in dm.pooled_dataloader("train", torch.Generator().manual_seed(0)))
    best = None
    for rep in range(repeats):
        pids = pool_pids(dm)
        wall, cpu = time.perf_counter(), cpu_now(pids)
        count = sum(len(b["image"]) for b in dm.pooled_dataloader("train", torch.Generator().manual_seed(rep)))
        wall, cpu = time.perf_counter() - wall, cpu_now(pids) - cpu
        assert count == images
        if best is None or wall < best["wall_s"]:
            best = {"wall_s": wall, "cpu_s": cpu}
    dm.teardown()
    return {
        "num_workers": num_workers,
        "images": images,
        **best,
        "images_per_s": images / best["wall_s"],
        "cpu_ms_per_image": 1e3 * best["cpu_s"] / images,
    }


def train_throughput(steps: int, batch_size: int, model_name: str) -> dict:
    """Forward + backward + AdamW samples/s of ``model_name`` with LoRA rank 8, after one warm-up step."""
    import open_clip  # after fedilora, whose shim must run before torchvision loads

    torch.manual_seed(0)
    model = LoRACLIPClassifier(num_classes=12, model_name=model_name, pretrained=None)
    model.configure_model()
    model.add_ranks([8])
    optimizer = model.configure_optimizers()
    model.train()
    size = model.image_size
    tokens = open_clip.get_tokenizer(model_name)([f"a photo number {i}" for i in range(batch_size)])
    batch = {
        "image": torch.randint(0, 256, (batch_size, 3, *size), dtype=torch.uint8),
        "tokens": tokens,
        "label": torch.randint(0, 12, (batch_size,)),
        "image_present": torch.ones(batch_size, dtype=torch.bool),
        "text_present": torch.ones(batch_size, dtype=torch.bool),
    }

    def step() -> None:
        loss = model.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    wall, cpu = time.perf_counter(), cpu_now()
    for _ in range(steps):
        step()
    wall, cpu = time.perf_counter() - wall, cpu_now() - cpu
    samples = steps * batch_size
    return {
        "model": model_name,
        "steps": steps,
        "batch_size": batch_size,
        "wall_s": wall,
        "cpu_s": cpu,
        "samples_per_s": samples / wall,
        "cpu_ms_per_sample": 1e3 * cpu / samples,
    }


def round_costs(csv: Path, num_workers: int, rounds: int, clients: int, steps: int) -> dict:
    """(a) a DataLoader (and its workers) per client and round against (b) the persistent worker pool."""
    dm = datamodule(csv, clients, num_workers)
    plan = [(r, k) for r in range(rounds) for k in range(clients)]

    def read(loader) -> int:
        return sum(len(b["image"]) for _, b in zip(range(steps), loader, strict=False))

    # (a) as before the pool: a DataLoader of its own per read; its workers are joined when it is dropped
    wall, cpu = time.perf_counter(), cpu_now()
    images_a = 0
    for r, k in plan:
        loader = dm._dataloader(dm._view(("client", k, "train")), "train", torch.Generator().manual_seed(r * 100 + k))
        images_a += read(loader)
        del loader
    wall_a, cpu_a = time.perf_counter() - wall, cpu_now() - cpu

    # (b) the pool: its start counted in, its workers' CPU read before they stop
    wall, cpu = time.perf_counter(), cpu_now()
    images_b = 0
    for r, k in plan:
        images_b += read(dm.client_dataloader(k, "train", torch.Generator().manual_seed(r * 100 + k)))
    wall_b = time.perf_counter() - wall
    cpu_b = cpu_now(pool_pids(dm)) - cpu
    starts, reads = dm._pool.starts, dm._pool.reads
    dm.teardown()
    assert images_a == images_b
    return {
        "num_workers": num_workers,
        "rounds": rounds,
        "clients": clients,
        "steps": steps,
        "images": images_a,
        "per_read": {"wall_s": wall_a, "cpu_s": cpu_a, "worker_starts": len(plan) * num_workers},
        "pool": {"wall_s": wall_b, "cpu_s": cpu_b, "worker_starts": starts * num_workers, "reads": reads},
        "saved_per_round_wall_s": (wall_a - wall_b) / rounds,
        "saved_per_round_cpu_s": (cpu_a - cpu_b) / rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600, help="JPEGs generated (the pool and test set)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10, help="clients read per round")
    parser.add_argument("--steps", type=int, default=2, help="batches each client reads per round")
    parser.add_argument(
        "--train-steps", type=int, default=3, help="timed training steps at ViT-B-32 size (0: skip; ~1.5 min/step here)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="passes per decode figure (best kept)")
    parser.add_argument("--quick", action="store_true", help="60 images, 1 round of 3 clients, the tiny model")
    args = parser.parse_args()
    model_name = "ViT-B-32"
    if args.quick:
        args.images, args.rounds, args.clients, args.steps, args.train_steps, args.repeats = 60, 1, 3, 1, 1, 1
        model_name = "fedilora-tiny"
    torch.set_num_threads(2)
    logging.getLogger("fedilora.data").setLevel(logging.ERROR)  # the pool doubles as test set: copies, by design
    results: dict = {"images": args.images, "load": list(os.getloadavg())}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_table(root / "data.csv", make_images(root, args.images, 0))
        decode = [decode_throughput(root / "data.csv", w, args.repeats) for w in (0, 1, 2)]
        for d in decode:
            print(
                f"decode, num_workers={d['num_workers']}: {d['images']} images in {d['wall_s']:.2f} s wall, "
                f"{d['images_per_s']:.0f} images/s; {d['cpu_ms_per_image']:.2f} ms CPU per image (with workers)"
            )
        train = train_throughput(args.train_steps, 16, model_name) if args.train_steps > 0 else None
        if train is not None:
            print(
                f"train step, {model_name}, batch 16: {train['samples_per_s']:.2f} samples/s wall, "
                f"{train['cpu_ms_per_sample']:.0f} ms CPU per sample"
            )
        rounds = [round_costs(root / "data.csv", w, args.rounds, args.clients, args.steps) for w in (1, 2)]
        for c in rounds:
            a, b = c["per_read"], c["pool"]
            print(
                f"rounds, num_workers={c['num_workers']}: {c['rounds']} rounds x {c['clients']} clients x "
                f"{c['steps']} batches ({c['images']} images): a loader per read {a['wall_s']:.2f} s wall / "
                f"{a['cpu_s']:.2f} s CPU ({a['worker_starts']} worker starts); pool {b['wall_s']:.2f} s wall / "
                f"{b['cpu_s']:.2f} s CPU ({b['worker_starts']} worker starts, {b['reads']} reads); saved per round "
                f"{c['saved_per_round_wall_s']:.2f} s wall, {c['saved_per_round_cpu_s']:.2f} s CPU"
            )
    results.update({"decode": decode, "train": train, "rounds": rounds})
    if train is None:
        write_results("bench_loader", results, args.quick, 2)
        return
    slowest = min(d["images_per_s"] for d in decode)
    share = decode[0]["cpu_ms_per_image"] / (decode[0]["cpu_ms_per_image"] + train["cpu_ms_per_sample"])
    results["decode_over_train_rate"] = slowest / train["samples_per_s"]
    results["decode_cpu_share_without_workers"] = share
    print(
        f"decoding (slowest setting) delivers {results['decode_over_train_rate']:.0f}x the images the training "
        f"step consumes; without workers decoding is {100 * share:.1f}% of the CPU time per sample"
    )
    write_results("bench_loader", results, args.quick, 2)


if __name__ == "__main__":
    main()
