"""One GPU: throughput, peak memory and framework overhead of a federated run at ViT-B-32 size.

ViT-B-32 (random init, ``pretrained: null``), 10 clients with the paper's ranks
[32, 32, 16, 16, 8, 8, 4, 4, 4, 4], every client sampled every round, precision ``bf16-mixed``,
224 px images (the embedded synthetic benchmark drawn at that size), batch 32. The two sides of
``bench_overhead.py`` (its ``run_federated`` and ``run_plain``) run the same optimizer steps on the same
batches:

(a) ``FederatedTrainer.fit`` on ``accelerator: gpu``, timed from the first round's start to the last
    aggregation (the final evaluation excluded);
(b) a plain PyTorch loop on one ``LoRACLIPClassifier`` on the GPU: forward under ``torch.autocast``
    (bfloat16), backward, AdamW step, one optimizer per rank made once.

Reported: samples/s of both, peak GPU memory of each (``torch.cuda.max_memory_allocated``, reset before
each side), the ratio (a)/(b) of the median times over ``--repeats`` interleaved repetitions, and the
optimizer steps each side ran (counted on ``training_step``, which both sides call once per step).

    .venv/bin/python experiments/bench_gpu.py [--repeats 3] [--steps 8] [--rounds 2]
    .venv/bin/python experiments/bench_gpu.py --quick   # the same code on the CPU: tiny model, 32-bit, seconds

Without a CUDA GPU it refuses (exit status 2) unless ``--quick`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from _bench import write_results
from bench_overhead import new_model, run_federated, run_plain
from fedilora.data import FederatedDataModule, SyntheticBenchmark
from fedilora.model import LoRACLIPClassifier

PAPER_RANKS = [32, 32, 16, 16, 8, 8, 4, 4, 4, 4]


class StepCounter:
    """Counts the optimizer steps and samples of every model it built: both loops call ``training_step``
    exactly once per optimizer step."""

    def __init__(self, **model_args) -> None:
        self.model_args = model_args
        self.steps = 0
        self.samples = 0

    def __call__(self) -> LoRACLIPClassifier:
        module = new_model(**self.model_args)
        step = module.training_step

        def counted(batch, batch_idx):
            self.steps += 1
            self.samples += len(batch["label"])
            return step(batch, batch_idx)

        module.training_step = counted
        return module

    def take(self) -> tuple[int, int]:
        counts, self.steps, self.samples = (self.steps, self.samples), 0, 0
        return counts


def peak_memory(run: Callable[[], float | dict], device: str) -> tuple[float | dict, int | None]:
    """``run()`` and the peak GPU memory it allocated (None on a CPU)."""
    if device != "cuda":
        return run(), None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    result = run()
    torch.cuda.synchronize()
    return result, torch.cuda.max_memory_allocated()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, help="interleaved repetitions (default: 3, or 1 with --quick)")
    parser.add_argument("--rounds", type=int, help="rounds per run (default: 2, or 1 with --quick)")
    parser.add_argument("--steps", type=int, help="local steps per client and round (default: 8, or 2 with --quick)")
    parser.add_argument("--batch-size", type=int, help="batch size (default: 32, or 8 with --quick)")
    parser.add_argument(
        "--precision", default=None, help="Fabric precision (default: bf16-mixed, or 32-true with --quick)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="the same code path on the CPU: tiny model, 32-bit, seconds"
    )
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line at the end")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu and not args.quick:
        print(
            "bench_gpu: no CUDA GPU here (torch.cuda.is_available() is False); run it on a machine with one, "
            "or give --quick for the CPU smoke run of the same code",
            file=sys.stderr,
        )
        sys.exit(2)
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    quick = args.quick
    device = "cuda" if gpu and not quick else "cpu"
    precision = args.precision or ("32-true" if quick else "bf16-mixed")
    cfg = {
        "num_clients": 10,
        "rounds": args.rounds or (1 if quick else 2),
        "per_round": 10,  # every client every round, as in the paper's setting
        "steps": args.steps or (2 if quick else 8),
        "batch_size": args.batch_size or (8 if quick else 32),
        "model": "fedilora-tiny" if quick else "ViT-B-32",
        "image_size": 32 if quick else 224,
        "ranks": PAPER_RANKS,
        "precision": precision,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    }
    repeats = args.repeats or (1 if quick else 3)
    # a client's train split is 80% of its share: enough samples for `steps` batches in one epoch
    num_train = cfg["num_clients"] * int(cfg["steps"] * cfg["batch_size"] / 0.8 + cfg["batch_size"])
    dm = FederatedDataModule(
        dataset=SyntheticBenchmark(num_train=num_train, num_test=64, image_size=cfg["image_size"]),
        num_clients=cfg["num_clients"],
        missing_rate=0.4,
        batch_size=cfg["batch_size"],
        tokenizer=cfg["model"],
        seed=0,
    )
    dm.setup("fit")
    fewest = min(len(dm.client_dataloader(k, "train")) for k in range(dm.num_clients))
    assert cfg["steps"] <= fewest, "every client must have max_local_steps batches in one epoch"

    counter = StepCounter(model_name=cfg["model"], pretrained=None, head_hidden=512 if not quick else 256)
    trainer_args = {"accelerator": "gpu" if device == "cuda" else "cpu", "devices": 1, "precision": precision}
    if device == "cuda" and precision.startswith("bf16"):
        autocast = partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    elif device == "cuda" and precision.startswith("16"):
        autocast = partial(torch.autocast, "cuda", dtype=torch.float16)
    else:
        autocast = contextlib.nullcontext
    federated = partial(run_federated, model=counter, ranks=PAPER_RANKS, **trainer_args)
    plain = partial(run_plain, model=counter, ranks=PAPER_RANKS, device=device, autocast=autocast)

    times: dict[str, list[float]] = {"federated": [], "plain": []}
    peaks: dict[str, list[int | None]] = {"federated": [], "plain": []}
    counts: dict[str, tuple[int, int]] = {}
    with tempfile.TemporaryDirectory() as root:
        if not quick:  # warm-up: CUDA context, cuDNN/cuBLAS plans, lazy imports on both sides
            federated(dm, {**cfg, "rounds": 1}, root)
            plain(dm, {**cfg, "rounds": 1})
            counter.take()
        for rep in range(repeats):
            # interleaved, so that drift in the machine's load hits both sides alike
            fed, peak = peak_memory(lambda: federated(dm, cfg, root), device)
            times["federated"].append(fed["span_s"])
            peaks["federated"].append(peak)
            counts["federated"] = counter.take()
            seconds, peak = peak_memory(lambda: plain(dm, cfg), device)
            times["plain"].append(seconds)
            peaks["plain"].append(peak)
            counts["plain"] = counter.take()
            print(f"rep {rep}: federated {times['federated'][-1]:.3f} s, plain {seconds:.3f} s", flush=True)

    median = {side: statistics.median(values) for side, values in times.items()}
    samples = {side: counts[side][1] for side in counts}
    steps = {side: counts[side][0] for side in counts}
    rate = {side: samples[side] / median[side] for side in median}
    ratio = median["federated"] / median["plain"]
    peak_gib = {side: (max(v) / 2**30 if v[0] is not None else None) for side, v in peaks.items()}
    print(
        f"\nOne {'GPU: ' + cfg['device'] if device == 'cuda' else 'CPU (--quick)'}, {cfg['model']}, "
        f"{cfg['num_clients']} clients ranks {PAPER_RANKS}, {precision}, {cfg['rounds']} rounds x {cfg['per_round']} "
        f"clients x {cfg['steps']} steps, batch {cfg['batch_size']}, {cfg['image_size']} px; median of {repeats}"
    )
    print("| run                       | steps | samples | median s | samples/s | peak GPU memory |")
    print("|---------------------------|-------|---------|----------|-----------|-----------------|")
    for side, name in (("federated", "(a) FederatedTrainer.fit"), ("plain", "(b) plain PyTorch loop")):
        memory = f"{peak_gib[side]:.2f} GiB" if peak_gib[side] is not None else "n/a (CPU)"
        print(
            f"| {name:<25} | {steps[side]:5d} | {samples[side]:7d} | {median[side]:8.3f} | {rate[side]:9.1f} "
            f"| {memory:<15} |"
        )
    print(f"overhead (a)/(b) = {ratio:.3f}")
    payload = {
        "benchmark": "gpu",
        "config": cfg,
        "repeats": repeats,
        "seconds": times,
        "median_s": median,
        "steps": steps,
        "samples": samples,
        "samples_per_s": rate,
        "peak_gpu_memory_bytes": peaks,
        "peak_gpu_memory_gib": peak_gib,
        "ratio": ratio,
    }
    write_results("bench_gpu", payload, quick, torch.get_num_threads())
    if args.json:
        print(json.dumps(payload))
    return payload


if __name__ == "__main__":
    main()
