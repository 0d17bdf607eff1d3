"""Throughput of one client's local training: the federated trainer against plain ``lightning.Trainer``.

Both sides train the same ``LoRACLIPClassifier`` (``fedilora-tiny``, rank 8, the demo's data: 5000
samples over 10 clients, batch 32, 40% missing modalities) for the same N optimizer steps on the same
batches (client 0's training loader with the same seeded generator, several epochs when N exceeds one):

- federated: ``FederatedTrainer.train_client`` (load the client's state, build its optimizer, train,
  copy its update out), i.e. everything one client costs inside a round;
- reference: ``lightning.Trainer(max_steps=N, accelerator="cpu", devices=1, logger=False, ...)
  .fit(model, train_dataloaders=datamodule.client_dataloader(0, "train", generator))``.

Reported: samples/s of both (median of ``--repeats`` interleaved repetitions after a warm-up), and
their ratio federated / Lightning; target >= 0.95.

    .venv/bin/python experiments/bench_client_throughput.py [--repeats 5] [--steps 40] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from _bench import write_results
from fedilora.data import FederatedDataModule, SyntheticBenchmark
from fedilora.model import LoRACLIPClassifier
from fedilora.server import client_seed
from fedilora.trainer import FederatedTrainer

RANK = 8
CLIENT = 0
TARGET = 0.95


def new_model() -> LoRACLIPClassifier:
    """A fresh module per side: Lightning attaches its trainer to the module it fits, and a module with
    a trainer attached logs from ``training_step``, which would change what the federated side runs."""
    torch.manual_seed(0)
    model = LoRACLIPClassifier(num_classes=12, lr=2e-3)
    model.configure_model()
    model.add_ranks([RANK])
    return model


def samples_in(dm: FederatedDataModule, seed: int, steps: int) -> int:
    """Samples in the first ``steps`` batches the loader yields, epoch after epoch (last batch may be short)."""
    loader = dm.client_dataloader(CLIENT, "train", torch.Generator().manual_seed(seed))
    total, step = 0, 0
    while step < steps:
        for batch in loader:
            total += len(batch["label"])
            step += 1
            if step == steps:
                break
    return total


def run_federated(trainer: FederatedTrainer, model, dm, lora, extra) -> float:
    start = time.perf_counter()
    trainer.train_client(model, dm, 0, CLIENT, RANK, lora, extra)
    return time.perf_counter() - start


def run_lightning(model, dm, lora, extra, seed: int, steps: int) -> float:
    import lightning as L  # after fedilora (its torchvision shim must come first)

    model.load_client_state(RANK, lora, extra)  # the same starting point as the federated side, untimed
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = dm.client_dataloader(CLIENT, "train", torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=loader)
    seconds = time.perf_counter() - start
    assert trainer.global_step == steps, trainer.global_step
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, help="repetitions (default: 5, or 2 with --quick)")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (2: the 2-core machine; 1 is steadier on a busy CPU)"
    )
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--quick", action="store_true", help="5 steps, small data (smoke test)")
    args = parser.parse_args()
    args.repeats = args.repeats or (2 if args.quick else 5)
    torch.set_num_threads(args.threads)  # default 2: the 2-core machine
    # Lightning's advice (workers, GPU availability, ...) is not what is measured
    warnings.filterwarnings("ignore", module="lightning")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    steps = 5 if args.quick else args.steps
    num_train = 1000 if args.quick else 5000
    dm = FederatedDataModule(
        dataset=SyntheticBenchmark(num_train=num_train, num_test=1200 if not args.quick else 60),
        num_clients=10,
        missing_rate=0.4,
        batch_size=32,
        seed=0,
    )
    dm.setup("fit")
    seed = client_seed(0, 0, CLIENT)  # the generator train_client seeds for (round 0, client 0)
    samples = samples_in(dm, seed, steps)

    with tempfile.TemporaryDirectory() as root:
        fed_model, light_model = new_model(), new_model()
        lora, extra = fed_model.lora_state(RANK), fed_model.extra_state()
        trainer = FederatedTrainer(
            ranks=RANK, local_epochs=10**6, max_local_steps=steps, progress=False, root_dir=root, name="throughput"
        )
        # warm-up: lazy imports, allocator, Lightning's first-fit setup
        run_federated(trainer, fed_model, dm, lora, extra)
        run_lightning(light_model, dm, lora, extra, seed, steps)
        federated, lightning_ = [], []
        for rep in range(args.repeats):  # interleaved, so that load changes on the shared CPU hit both alike
            federated.append(run_federated(trainer, fed_model, dm, lora, extra))
            lightning_.append(run_lightning(light_model, dm, lora, extra, seed, steps))
            print(f"rep {rep}: federated {federated[-1]:.3f} s, lightning {lightning_[-1]:.3f} s", flush=True)

    fed_rate = samples / statistics.median(federated)
    light_rate = samples / statistics.median(lightning_)
    ratio = fed_rate / light_rate
    # each repetition's own ratio: both sides ran back to back, so a load change hits both alike
    paired = statistics.median(light / fed for fed, light in zip(federated, lightning_, strict=True))
    met = ratio >= TARGET
    print(
        f"\nOne client's local training: {steps} steps, {samples} samples (batch 32), rank {RANK}, "
        f"median of {args.repeats}, {args.threads} threads"
    )
    print("| run                                  | median s | samples/s |")
    print("|--------------------------------------|----------|-----------|")
    for label, times, rate in (
        ("FederatedTrainer.train_client", federated, fed_rate),
        ("lightning.Trainer.fit (reference)", lightning_, light_rate),
    ):
        print(f"| {label:<36} | {statistics.median(times):8.3f} | {rate:9.1f} |")
    print(
        f"ratio federated / Lightning = {ratio:.3f} (median of per-repetition ratios {paired:.3f}); "
        f"target >= {TARGET}: {'met' if met else 'NOT met'}"
    )

    payload = {
        "benchmark": "client_throughput",
        "steps": steps,
        "samples": samples,
        "repeats": args.repeats,
        "threads": args.threads,
        "federated_s": federated,
        "lightning_s": lightning_,
        "federated_samples_per_s": fed_rate,
        "lightning_samples_per_s": light_rate,
        "ratio": ratio,
        "paired_ratio_median": paired,
        "target": f">= {TARGET}",
        "met": met,
    }
    write_results("bench_client_throughput", payload, args.quick, args.threads)


if __name__ == "__main__":
    main()
