"""Cost of a federated round on Flower against the same round in ``fedilora fit``, at demo scale.

Every variant runs ``configs/demo.yaml`` (10 clients of ranks 32..4, 4 sampled per round, FediLoRA with
model editing) for ``--rounds`` rounds, evaluating only after the last, in its own processes:

- ``fit``: ``fedilora fit`` (one process, clients trained one after the other);
- ``sim``: ``flwr run`` on the simulation engine (10 virtual SuperNodes, one Ray worker of 2 CPUs, so
  clients also train one after the other); its worker keeps the client runtime across messages;
- ``sim-rebuild``: the same with ``FEDILORA_FLOWER_CACHE=0``: every message rebuilds the runtime (parsed
  config, data, backbone), as a client without a cache would (the imports stay: the worker lives on);
- ``deploy-keepalive``: a SuperLink and 10 SuperNodes on 127.0.0.1, each with a keep-alive worker
  (``--node-config 'partition-id=K keep-alive=600'``): the runtime lives across rounds;
- ``deploy-fresh``: the same without keep-alive: Flower 1.42 starts a fresh ClientApp process per
  message, which imports torch/lightning/open_clip and builds the runtime every round.

The time of a round is the engine's own ``round/time_s`` (plan, client training, fault filter,
aggregation; the same code measures it in every variant), so process start-up and evaluation are out.
Reported per variant: the first round (imports and builds happen there), the median of the later
rounds, its ratio to ``fit`` (target <= 1.25), how many client runtimes the later rounds built (the
count that shows the cache at work), and whether the final global adapter equals ``fit``'s bit for bit.

``--scale vit`` runs the same comparison where a client's work is that of a real model: ViT-B-32
(random weights: none can be downloaded here) with 4 clients of ranks 32/16/8/4, all sampled every
round, 3 local steps each, so that a round of ``fit`` takes tens of seconds on this CPU and Flower's
fixed per-message latency is a small part of it.

    .venv/bin/python experiments/bench_flower.py [--rounds 5] [--variants fit,sim,...] [--threads 2] [--quick]
    .venv/bin/python experiments/bench_flower.py --scale vit --rounds 3 --variants fit,sim,deploy-keepalive
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from _bench import write_results
from fedilora.flower.loopback import Federation

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("fit", "sim", "sim-rebuild", "deploy-keepalive", "deploy-fresh")
TARGET = 1.25


#: what ``--scale vit`` adds to the demo config (the model from a file, like the demo's own)
VIT = [
    "--model=configs/common/model_vit_b32.yaml",
    "--model.pretrained=null",
    "--data.num_clients=4",
    "--trainer.ranks=[32,16,8,4]",
    "--trainer.clients_per_round=4",
    "--trainer.max_local_steps=3",
    "--data.dataset.init_args.num_test=64",
]


def overrides(rounds: int, quick: bool, root: Path, name: str, scale: str = "demo") -> list[str]:
    args = [*(VIT if scale == "vit" else [])]
    args += [
        f"--trainer.rounds={rounds}",
        f"--trainer.eval_every={rounds}",
        "--trainer.progress=false",
        f"--trainer.root_dir={root}",
        f"--trainer.name={name}",
    ]
    if quick:
        args += [
            "--data.num_clients=4",
            "--trainer.ranks=[8,8,4,4]",
            "--trainer.clients_per_round=2",
            "--data.dataset.init_args.num_train=600",
            "--data.dataset.init_args.num_test=100",
            "--trainer.max_local_steps=2",
        ]
    return args


def run_fit(args: list[str], env: dict[str, str]) -> None:
    command = [sys.executable, "-m", "fedilora.cli", "fit", "--config", "configs/demo.yaml", *args]
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)


def run_flower(variant: str, args: list[str], env: dict[str, str], work: Path, num_clients: int) -> None:
    with Federation(work / variant, simulation=variant.startswith("sim"), cwd=ROOT) as federation:
        federation.env.update({k: env[k] for k in ("FEDILORA_FLOWER_THREADS", "OMP_NUM_THREADS")})
        if variant == "sim-rebuild":
            federation.env["FEDILORA_FLOWER_CACHE"] = "0"
        federation.start_superlink()
        simulation = None
        if variant.startswith("sim"):
            simulation = f"num-supernodes={num_clients} client-resources-num-cpus=2"
        else:
            for k in range(num_clients):
                node = {"partition-id": k}
                if variant == "deploy-keepalive":
                    node["keep-alive"] = 600.0
                federation.add_supernode(node, f"node{k}")
        run_config = {"config": "configs/demo.yaml", "overrides": " ".join(args)}
        federation.run(ROOT / "flower-app", run_config, simulation, timeout=3600)


def _trip(row: dict) -> str:
    """The median client's round trip through Flower and the part of it spent working on its node."""
    if row["trip_s"] is None:
        return "-"
    return f"{row['trip_s']:.2f} / {row['client_work_s']:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--scale", choices=("demo", "vit"), default="demo")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown or "fit" not in variants:
        parser.error(f"--variants: choose from {', '.join(VARIANTS)}, fit included (the reference)")
    work = Path(tempfile.mkdtemp(prefix="bench_flower_"))
    env = dict(os.environ, FEDILORA_FLOWER_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    num_clients = 4 if args.quick or args.scale == "vit" else 10
    rows = {}
    try:
        for variant in variants:
            started = time.perf_counter()
            run_args = overrides(args.rounds, args.quick, work / "runs", variant, args.scale)
            if variant == "fit":
                run_fit(run_args, env)
            else:
                run_flower(variant, run_args, env, work, num_clients)
            ckpt = work / "runs" / variant / "version_0" / "checkpoints" / f"round-{args.rounds:04d}.ckpt"
            state = torch.load(ckpt, weights_only=True, map_location="cpu")
            times = [h["round/time_s"] for h in state["history"]]
            builds = [h.get("flower/client_builds", 0.0) for h in state["history"]]
            trips = [h["flower/trip_s"] for h in state["history"][1:] if "flower/trip_s" in h]
            work_s = [h["flower/client_work_s"] for h in state["history"][1:] if "flower/client_work_s" in h]
            rows[variant] = {
                "first_round_s": times[0],
                "later_rounds_s": times[1:],
                "median_s": statistics.median(times[1:]),
                "later_client_builds": sum(builds[1:]),
                "trip_s": statistics.median(trips) if trips else None,
                "client_work_s": statistics.median(work_s) if work_s else None,
                "global_lora": state["global_lora"],
                "wall_s": time.perf_counter() - started,
            }
            print(
                f"{variant}: rounds {[round(t, 1) for t in times]} s, wall {rows[variant]['wall_s']:.0f} s", flush=True
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    reference = rows["fit"]
    scale = "quick" if args.quick else "ViT-B-32, 4 clients" if args.scale == "vit" else "demo scale"
    print(f"\nFlower round vs `fedilora fit` round ({scale}, {args.rounds} rounds)")
    header = "variant | first round (s) | median later round (s) | ratio to fit | runtime builds, later rounds"
    print(f"| {header} | client trip / work on the node (s) | same adapter as fit |")
    print("|---|---|---|---|---|---|---|")
    payload = {"rounds": args.rounds, "scale": args.scale, "target": TARGET, "variants": {}}
    for variant, row in rows.items():
        same = all(torch.equal(row["global_lora"][k], v) for k, v in reference["global_lora"].items())
        ratio = row["median_s"] / reference["median_s"]
        print(
            f"| {variant} | {row['first_round_s']:.1f} | {row['median_s']:.1f} | {ratio:.2f}"
            f"{'' if variant == 'fit' else (' (met)' if ratio <= TARGET else ' (NOT met)')} | "
            f"{'-' if variant == 'fit' else int(row['later_client_builds'])} | {_trip(row)} | {same} |"
        )
        payload["variants"][variant] = {
            **{k: v for k, v in row.items() if k != "global_lora"},
            "ratio_to_fit": ratio,
            "same_global_adapter_as_fit": same,
        }
    name = "bench_flower" if args.scale == "demo" else f"bench_flower_{args.scale}"
    write_results(name, payload, args.quick, args.threads)


if __name__ == "__main__":
    main()
