"""Memory of a federated run against the number of clients, and over the rounds of one run.

Each run is a fresh subprocess (so one run's allocations cannot hide in another's peak), running
``FederatedTrainer.fit`` on ``fedilora-tiny`` with client ranks ``[32, 32, 16, 16, 8, 8, 4, 4, 4, 4]``
repeated, 10 clients sampled per round and ``max_local_steps`` steps each, on one synthetic dataset
(20000 training samples, 20 per client at 1000 clients) partitioned over 10, 100 or 1000 clients. Only
the number of clients differs, so the work per round is the same in every run.

- peak: the child's ``VmHWM`` (peak resident set) from ``/proc/self/status`` at the end of the run;
  target: 1000 clients <= 1.25 x the peak of 10 clients;
- growth: ``VmRSS`` after each round's aggregation (a callback at ``on_aggregate_end``: the last
  round's ``on_round_end`` comes after the final evaluation, which allocates on its own) in the
  1000-client run, round 2 against round 20; target: no growth (<= 2% or 4 MiB, allocator noise).
  The child also records the personalized states the trainer keeps for every client it has trained
  (``trainer.personal``, a ``fedilora.personal.PersonalStore``): how many, the bytes of those held in
  RAM, and the files written and read back. ``--personal-mb`` sets ``trainer.personal_memory_mb``
  (``none``: no limit, everything in RAM, as before the store existed);
- CPU time: user + system seconds of each child (``getrusage``), reported next to every run because
  wall time on a shared machine says little.

``--clients 10000 --per-round 10000 --rounds 1 --steps 1 --num-train 100000`` is the 10,000-client run:
every client trains once, so all 10,000 personalized states exist, then all are evaluated.

    .venv/bin/python experiments/bench_memory.py [--repeats 1] [--threads 2] [--quick] [--personal-mb 16]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from _bench import write_results
from fedilora.callbacks import FederatedCallback
from fedilora.data import FederatedDataModule, SyntheticBenchmark
from fedilora.model import LoRACLIPClassifier
from fedilora.trainer import FederatedTrainer

RANK_PATTERN = [32, 32, 16, 16, 8, 8, 4, 4, 4, 4]
PEAK_TARGET = 1.25
GROWTH_TOLERANCE = (0.02, 4 * 2**20)  # relative, absolute (bytes): allocator and page-cache noise
GROWTH_TARGET = 0.05  # issue 13: RSS from round 2 to 20 of the 1000-client run grows <= 5%


def proc_status(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def state_bytes(trainer: FederatedTrainer) -> int:
    """Bytes of personalized-state tensors held in RAM (spilled ones are on disk, not counted)."""
    return trainer.personal.ram_bytes


class RssRecorder(FederatedCallback):
    def __init__(self) -> None:
        self.rss: list[int] = []
        self.personal_bytes: list[int] = []
        self.personal_clients: list[int] = []
        self.fit_start = 0

    def on_fit_start(self, trainer) -> None:
        # after data setup, model building and writing the run files: what the run costs before round 1
        self.fit_start = proc_status("VmRSS")

    def on_aggregate_end(self, trainer, round, global_lora) -> None:
        self.rss.append(proc_status("VmRSS"))
        self.personal_bytes.append(state_bytes(trainer))
        self.personal_clients.append(len(trainer.personal))


def child(cfg: dict) -> None:
    """One run; prints ``RESULT <json>`` as its last line."""
    torch.set_num_threads(cfg["threads"])
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    n = cfg["num_clients"]
    dm = FederatedDataModule(
        dataset=SyntheticBenchmark(num_train=cfg["num_train"], num_test=cfg["num_test"]),
        num_clients=n,
        missing_rate=0.4,
        val_fraction=0.1,
        test_fraction=0.1,
        batch_size=16,
        seed=0,
    )
    recorder = RssRecorder()
    with tempfile.TemporaryDirectory() as root:
        trainer = FederatedTrainer(
            rounds=cfg["rounds"],
            clients_per_round=cfg["per_round"],
            ranks=[RANK_PATTERN[k % len(RANK_PATTERN)] for k in range(n)],
            max_local_steps=cfg["steps"],
            eval_every=10**9,  # one evaluation, after the last round (part of the peak)
            callbacks=[recorder],
            seed=0,
            progress=False,
            root_dir=root,
            name="memory",
            personal_memory_mb=cfg["personal_mb"],
        )
        torch.manual_seed(0)
        model = LoRACLIPClassifier(num_classes=12)
        with contextlib.redirect_stdout(io.StringIO()):  # the results table
            trainer.fit(model, dm)
        store = trainer.personal
        spilled = {"writes": store.writes, "reads": store.reads, "in_ram": len(store.in_ram())}
    min_train = min(dm.num_train_samples(k) for k in range(n))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result = {
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "store": spilled,
        "num_clients": n,
        "peak_bytes": proc_status("VmHWM"),
        "rss_fit_start": recorder.fit_start,
        "rss_by_round": recorder.rss,
        "personal_bytes_by_round": recorder.personal_bytes,
        "personal_clients_by_round": recorder.personal_clients,
        "min_train_samples": min_train,
    }
    print("RESULT " + json.dumps(result), flush=True)


def run_child(cfg: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True, check=False
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {cfg} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def mib(n: float) -> str:
    return f"{n / 2**20:8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs per client count (median of the peaks)")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (2: the 2-core machine; 1 is steadier on a busy CPU)"
    )
    parser.add_argument("--quick", action="store_true", help="2000 samples, 2 rounds of 1 step (smoke test)")
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000], help="client counts to run")
    parser.add_argument("--per-round", type=int, default=10, help="clients sampled per round")
    parser.add_argument("--rounds", type=int, help="rounds (default 20; --quick: 2)")
    parser.add_argument("--steps", type=int, help="local steps per client (default 2; --quick: 1)")
    parser.add_argument("--num-train", type=int, help="training samples (default 20000; --quick: 2000)")
    parser.add_argument(
        "--personal-mb", default="default", help="trainer.personal_memory_mb: MiB, 'none' (no limit) or 'default'"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    torch.set_num_threads(args.threads)  # the children set it too: they do the work

    if args.quick:
        base = {"num_train": 2000, "num_test": 60, "rounds": 2, "steps": 1}
        early, late = 1, 2
    else:
        base = {"num_train": 20000, "num_test": 200, "rounds": 20, "steps": 2}
    overrides = {"rounds": args.rounds, "steps": args.steps, "num_train": args.num_train}
    base.update({k: v for k, v in overrides.items() if v is not None})
    base["per_round"] = args.per_round
    if args.personal_mb == "default":
        import inspect

        base["personal_mb"] = inspect.signature(FederatedTrainer).parameters["personal_memory_mb"].default
    else:
        base["personal_mb"] = None if args.personal_mb == "none" else float(args.personal_mb)
    early, late = (1, 2) if args.quick else (min(2, base["rounds"]), base["rounds"])
    # generate (or find) the cached dataset here, so that no child's peak includes the generation
    SyntheticBenchmark(num_train=base["num_train"], num_test=base["num_test"]).load()

    runs: dict[int, list[dict]] = {}
    for n in args.clients:
        for _ in range(args.repeats):
            result = run_child({**base, "num_clients": n, "threads": args.threads})
            runs.setdefault(n, []).append(result)
            print(
                f"{n} clients: peak {result['peak_bytes'] / 2**20:.1f} MiB, CPU {result['cpu_s']:.1f} s, "
                f"personalized states {result['personal_clients_by_round'][-1]} (files written "
                f"{result['store']['writes']}, read {result['store']['reads']}, in RAM {result['store']['in_ram']})",
                flush=True,
            )

    peaks = {n: statistics.median(r["peak_bytes"] for r in rs) for n, rs in runs.items()}
    smallest, largest = min(peaks), max(peaks)
    peak_ratio = peaks[largest] / peaks[smallest]
    peak_met = peak_ratio <= PEAK_TARGET
    big = runs[largest][0]
    rss_early, rss_late = big["rss_by_round"][early - 1], big["rss_by_round"][late - 1]
    growth = rss_late - rss_early
    personal_growth = big["personal_bytes_by_round"][late - 1] - big["personal_bytes_by_round"][early - 1]
    allowed = max(GROWTH_TOLERANCE[0] * rss_early, GROWTH_TOLERANCE[1])
    growth_met = growth <= allowed
    relative = growth / rss_early

    print(
        f"\nMemory, fedilora-tiny, {base['num_train']} training samples, {base['per_round']} clients per round x "
        f"{base['steps']} steps, {base['rounds']} rounds, trainer.personal_memory_mb={base['personal_mb']}, "
        f"median of {args.repeats} run(s) per row, {args.threads} threads"
    )
    print(f"| clients | peak RSS (VmHWM) MiB | ratio to {smallest} clients | RSS before round 1 MiB | "
          "after last round MiB | CPU s | states (files written / read) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for n, peak in peaks.items():
        first = runs[n][0]
        print(
            f"| {n:<7} | {mib(peak):>20} | {peak / peaks[smallest]:19.3f} | {mib(first['rss_fit_start']):>22} | "
            f"{mib(first['rss_by_round'][-1]):>20} | {statistics.median(r['cpu_s'] for r in runs[n]):.1f} | "
            f"{first['personal_clients_by_round'][-1]} ({first['store']['writes']} / {first['store']['reads']}) |"
        )
    if len(peaks) > 1:
        print(f"{largest} clients / {smallest} clients = {peak_ratio:.3f}; target <= {PEAK_TARGET}: "
              f"{'met' if peak_met else 'NOT met'}")  # fmt: skip
    print(f"\nRSS after aggregation, {largest}-client run, round {early} vs round {late}")
    print("| round | VmRSS MiB | personalized states kept | their tensors in RAM MiB |")
    print("|-------|-----------|--------------------------|--------------------------|")
    for r in (early, late):
        print(
            f"| {r:<5} | {mib(big['rss_by_round'][r - 1]):>9} | {big['personal_clients_by_round'][r - 1]:24d} | "
            f"{mib(big['personal_bytes_by_round'][r - 1]):>24} |"
        )
    print(
        f"growth {growth / 2**20:+.1f} MiB = {100 * relative:+.2f}% (of which personalized states in RAM "
        f"{personal_growth / 2**20:+.1f} MiB, rest {(growth - personal_growth) / 2**20:+.1f} MiB); "
        f"target <= {100 * GROWTH_TARGET:.0f}%: {'met' if relative <= GROWTH_TARGET else 'NOT met'}; "
        f"no growth (<= {allowed / 2**20:.1f} MiB): {'met' if growth_met else 'NOT met'}"
    )

    payload = {
        "benchmark": "memory",
        "config": base,
        "repeats": args.repeats,
        "threads": args.threads,
        "runs": {str(n): rs for n, rs in runs.items()},
        "median_peak_bytes": {str(n): p for n, p in peaks.items()},
        "peak_ratio_largest_vs_smallest": peak_ratio,
        "peak_target": f"<= {PEAK_TARGET}",
        "peak_met": peak_met,
        "rss_rounds": [early, late],
        "rss_growth_bytes": growth,
        "rss_growth_relative": relative,
        "growth_target_relative": GROWTH_TARGET,
        "personal_state_growth_bytes": personal_growth,
        "growth_allowed_bytes": allowed,
        "growth_met": growth_met,
    }
    name = "bench_memory" + ("" if args.clients == [10, 100, 1000] else "_" + "_".join(map(str, args.clients)))
    name += "" if args.personal_mb == "default" else f"_mb{args.personal_mb}"
    write_results(name, payload, args.quick, args.threads)


if __name__ == "__main__":
    main()
