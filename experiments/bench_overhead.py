"""Framework overhead of the federated round loop against a plain PyTorch training loop.

Both sides run the same number of optimizer steps of the same model (``fedilora-tiny``, one LoRA rank),
on the same batches (the datamodule's client loaders, seeded exactly as the trainer seeds them):

(a) ``FederatedTrainer.fit``: 10 clients of rank 8, ``clients_per_round`` sampled per round,
    ``max_local_steps`` steps each; timed from the first ``on_round_start`` to the last
    ``on_aggregate_end`` (a callback), so the one evaluation after the last round is excluded, while
    every per-round framework cost (broadcast, state swaps, optimizer creation, upload copies,
    aggregation, logging of the earlier rounds) is included;
(b) a plain loop on one ``LoRACLIPClassifier``: forward + loss + backward + AdamW step over the
    same batches, with the one optimizer it would use anyway.

Reported: the ratio (a)/(b) of the medians over ``--repeats`` interleaved repetitions; target <= 1.10.

    .venv/bin/python experiments/bench_overhead.py [--repeats 5] [--threads 2] [--quick] [--profile]

``--profile`` also runs one federated fit under cProfile and prints where the time outside the
training steps goes.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import logging
import os
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from _bench import write_results
from fedilora.callbacks import FederatedCallback
from fedilora.data import FederatedDataModule, SyntheticBenchmark
from fedilora.model import LoRACLIPClassifier
from fedilora.server import client_seed, sample_clients
from fedilora.trainer import FederatedTrainer

RANK = 8
TARGET = 1.10


class RoundTimer(FederatedCallback):
    """Wall time from the first round's start to the last aggregation (evaluation comes after it)."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.end: float | None = None

    def on_round_start(self, trainer, round) -> None:
        if self.start is None:
            _sync()
            self.start = time.perf_counter()

    def on_aggregate_end(self, trainer, round, global_lora) -> None:
        _sync()
        self.end = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.end - self.start


def _sync() -> None:
    """Wait for queued GPU work, so that a time taken next includes it (nothing to wait for on a CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def new_model(**kwargs) -> LoRACLIPClassifier:
    torch.manual_seed(0)
    return LoRACLIPClassifier(**{"num_classes": 12, "lr": 2e-3, **kwargs})


def client_ranks(ranks: int | list[int], num_clients: int) -> list[int]:
    return [ranks] * num_clients if isinstance(ranks, int) else list(ranks)


def run_federated(
    dm: FederatedDataModule,
    cfg: dict,
    root: str,
    profile: cProfile.Profile | None = None,
    *,
    model: Callable[[], LoRACLIPClassifier] = new_model,
    ranks: int | list[int] = RANK,
    **trainer_args,
) -> dict:
    """``FederatedTrainer.fit`` timed over its rounds; ``trainer_args`` go to the trainer (accelerator,
    precision, ...). ``model`` builds the (unconfigured) module the trainer fits."""
    timer = RoundTimer()
    trainer = FederatedTrainer(
        rounds=cfg["rounds"],
        clients_per_round=cfg["per_round"],
        ranks=ranks,
        max_local_steps=cfg["steps"],
        eval_every=10**9,  # evaluation only after the last round, outside the timed span
        callbacks=[timer],
        seed=0,
        progress=False,  # a progress bar is a terminal cost, not a framework one
        root_dir=root,
        name="overhead",
        **trainer_args,
    )
    module = model()
    if profile is not None:
        profile.enable()
    with contextlib.redirect_stdout(io.StringIO()):  # fit prints its results table: not needed here
        trainer.fit(module, dm)
    if profile is not None:
        profile.disable()
    return {
        "span_s": timer.seconds,
        # the trainer's own per-round timer: the same work minus logging between rounds
        "round_time_sum_s": sum(h["round/time_s"] for h in trainer.history),
    }


def run_plain(
    dm: FederatedDataModule,
    cfg: dict,
    *,
    model: Callable[[], LoRACLIPClassifier] = new_model,
    ranks: int | list[int] = RANK,
    device: torch.device | str = "cpu",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> float:
    """The same (client, round) batches through a hand-written loop on one model, with one optimizer per
    rank (made once) and each client trained through the adapter of its rank; ``autocast`` wraps the
    forward pass as the trainer's precision does."""
    module = model()
    module.configure_model()
    per_client = client_ranks(ranks, dm.num_clients)
    module.add_ranks(per_client)
    module.to(device)
    optimizers = {}
    for rank in sorted(set(per_client)):
        module.use_rank(rank)  # the optimizer holds the parameters that train under this rank
        optimizers[rank] = module.configure_optimizers()
    module.train()
    plan = [
        (client, client_seed(0, r, client))
        for r in range(cfg["rounds"])
        for client in sample_clients(dm.num_clients, cfg["per_round"], 0, r)
    ]
    _sync()
    start = time.perf_counter()
    for client, seed in plan:
        module.use_rank(per_client[client])
        optimizer = optimizers[per_client[client]]
        loader = dm.client_dataloader(client, "train", torch.Generator().manual_seed(seed))
        for batch_idx, batch in zip(range(cfg["steps"]), loader, strict=False):  # range first: no extra batch
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast():
                loss = module.training_step(batch, batch_idx)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    _sync()
    return time.perf_counter() - start


def print_profile(profile: cProfile.Profile, limit: int = 30) -> str:
    stream = io.StringIO()
    stats = pstats.Stats(profile, stream=stream).strip_dirs()
    stats.sort_stats("cumulative").print_stats(limit)
    stats.sort_stats("tottime").print_stats(limit)
    text = stream.getvalue()
    print(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, help="repetitions (default: 5, or 2 with --quick)")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (2: the 2-core machine; 1 is steadier on a busy CPU)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds (smoke test)")
    parser.add_argument("--profile", action="store_true", help="also profile one federated fit with cProfile")
    args = parser.parse_args()
    args.repeats = args.repeats or (2 if args.quick else 5)
    torch.set_num_threads(args.threads)  # default 2: the 2-core machine
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)  # "Seed set to 0" per fit

    if args.quick:
        cfg = {"num_clients": 10, "rounds": 2, "per_round": 2, "steps": 2, "num_train": 1000, "batch_size": 16}
    else:
        # 10 steps of batch 32 per client and round: close to the demo's one local epoch (13 batches)
        cfg = {"num_clients": 10, "rounds": 3, "per_round": 4, "steps": 10, "num_train": 4000, "batch_size": 32}
    cfg["total_steps"] = cfg["rounds"] * cfg["per_round"] * cfg["steps"]
    dm = FederatedDataModule(
        dataset=SyntheticBenchmark(num_train=cfg["num_train"], num_test=60),
        num_clients=cfg["num_clients"],
        missing_rate=0.4,
        batch_size=cfg["batch_size"],
        seed=0,
    )
    dm.setup("fit")
    fewest = min(len(dm.client_dataloader(k, "train")) for k in range(dm.num_clients))
    assert cfg["steps"] <= fewest, "every client must have max_local_steps batches in one epoch"

    federated, federated_rounds, plain = [], [], []
    with tempfile.TemporaryDirectory() as root:
        # warm-up: first calls allocate, fill caches and import lazily on both sides
        run_federated(dm, {**cfg, "rounds": 1}, root)
        run_plain(dm, {**cfg, "rounds": 1})
        for rep in range(args.repeats):
            # interleaved, so that drift in the shared CPU's load hits both sides alike
            fed = run_federated(dm, cfg, root)
            federated.append(fed["span_s"])
            federated_rounds.append(fed["round_time_sum_s"])
            plain.append(run_plain(dm, cfg))
            print(f"rep {rep}: federated {federated[-1]:.3f} s, plain {plain[-1]:.3f} s", flush=True)
        profile_text = None
        if args.profile:
            profile = cProfile.Profile()
            run_federated(dm, cfg, root, profile)
            profile_text = print_profile(profile)

    fed_med, plain_med = statistics.median(federated), statistics.median(plain)
    ratio = fed_med / plain_med
    # each repetition's own ratio: (a) and (b) ran back to back, so a load change hits both alike
    paired = statistics.median(f / p for f, p in zip(federated, plain, strict=True))
    clients_trained = cfg["rounds"] * cfg["per_round"]
    per_client_ms = 1e3 * (fed_med - plain_med) / clients_trained
    met = ratio <= TARGET
    steps = cfg["total_steps"]
    print(
        f"\nFramework overhead: {steps} optimizer steps ({cfg['rounds']} rounds x {cfg['per_round']} clients x "
        f"{cfg['steps']} steps, batch {cfg['batch_size']}, rank {RANK}), median of {args.repeats}, "
        f"{args.threads} threads"
    )
    print("| run                                   | median s | ms/step |")
    print("|---------------------------------------|----------|---------|")
    print(f"| (a) FederatedTrainer.fit, rounds span | {fed_med:8.3f} | {1e3 * fed_med / steps:7.1f} |")
    fed_rounds_med = statistics.median(federated_rounds)
    print(f"|     (sum of round/time_s)             | {fed_rounds_med:8.3f} | {1e3 * fed_rounds_med / steps:7.1f} |")
    print(f"| (b) plain PyTorch loop (reference)    | {plain_med:8.3f} | {1e3 * plain_med / steps:7.1f} |")
    print(
        f"ratio (a)/(b) = {ratio:.3f} (median of per-repetition ratios {paired:.3f}); "
        f"target <= {TARGET:.2f}: {'met' if met else 'NOT met'}"
    )
    print(f"framework cost per trained client (a - b) / {clients_trained} = {per_client_ms:.1f} ms")

    payload = {
        "benchmark": "overhead",
        "config": cfg,
        "repeats": args.repeats,
        "threads": args.threads,
        "federated_span_s": federated,
        "federated_round_time_sum_s": federated_rounds,
        "plain_s": plain,
        "median_federated_s": fed_med,
        "median_plain_s": plain_med,
        "ratio": ratio,
        "paired_ratio_median": paired,
        "per_client_overhead_ms": per_client_ms,
        "target": f"<= {TARGET}",
        "met": met,
        "profile": profile_text,
    }
    write_results("bench_overhead", payload, args.quick, args.threads)


if __name__ == "__main__":
    main()
