"""Privacy–utility of FediLoRA with client-level DP, and the cost of secure aggregation.

Two designs, each fixed before any of its results was seen.

Small (the first table): the embedded benchmark (configs/fedilora_paper.yaml's model and data) spread
over 100 clients (ranks: the paper's [32, 32, 16, 16, 8, 8, 4, 4, 4, 4] ten times), 10 sampled per
round (q = 0.1), 30 rounds, DimensionWise + ModelEditing, adaptive clipping from C = 0.1 towards the
median update norm. epsilon in {inf, 8, 4, 1} at delta = 1e-5: the noise multiplier is the smallest
that keeps the rounds within the budget (opacus RDP). Secure aggregation: the same run without DP,
with and without masking: seconds per round and bytes uploaded per round.

Large (``--large``; "more simulated clients" for a useful epsilon): the same benchmark with 3,000
clients (the paper's ranks 300 times) of 50 training samples each (num_train 150,000; the test set
unchanged), 300 sampled per round (q = 0.1), 20 rounds, the same clipping and delta. The default
method (configs/fedilora.yaml: DimensionWiseDelta + outlier editing) at epsilon in {inf, 8, 4, 1},
then the paper's rule (configs/fedilora_paper.yaml) at inf and 8. No secure aggregation (pairwise masks
among 300 clients cost O(K^2) streams in one process; its cost is measured at 10 clients). Each run's
row is written as it finishes, so a stopped run keeps what it measured.

Post hoc (``--large --posthoc``, chosen after the large table showed almost every update clipped in
every round): the default with clipping and negligible noise (sigma 0.01), and at epsilon 8 with the
clip norm starting at 1.0.

    .venv/bin/python experiments/privacy_utility.py            # the small table (about 10 min on 2 cores)
    .venv/bin/python experiments/privacy_utility.py --large    # the large table (about 40 min on 2 cores)
    .venv/bin/python experiments/privacy_utility.py --large --posthoc  # its two post-hoc runs (13 min)
    .venv/bin/python experiments/privacy_utility.py --quick    # a smoke run: 2 rounds, 20 clients
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import fedilora  # noqa: F401  (the torchvision shim first)
from _bench import write_results
from fedilora.cli import FediLoRACLI

ROOT = Path(__file__).resolve().parents[1]
EPSILONS = [None, 8.0, 4.0, 1.0]
PAPER_RANKS = [32, 32, 16, 16, 8, 8, 4, 4, 4, 4]


def run(root: Path, name: str, config: str, clients: int, per_round: int, rounds: int, samples: int | None,
        epsilon: float | None, secure: bool, privacy: dict | None = None) -> dict:  # fmt: skip
    """One ``fedilora fit``; ``privacy`` (post-hoc runs) replaces the design's DP options."""
    args = [
        "fit", "--config", str(ROOT / "configs" / config),
        "--data.num_clients", str(clients), "--trainer.ranks", json.dumps(PAPER_RANKS * (clients // 10)),
        "--trainer.clients_per_round", str(per_round), "--trainer.rounds", str(rounds),
        "--trainer.eval_every", str(rounds), "--trainer.progress", "false", "--trainer.checkpoint_every", "null",
        "--trainer.root_dir", str(root), "--trainer.name", name,
    ]  # fmt: skip
    if samples is not None:
        args += ["--data.dataset.init_args.num_train", str(samples * clients)]
    if epsilon is not None and privacy is None:
        privacy = {"target_epsilon": epsilon, "delta": 1e-5, "clip_norm": 0.1, "adaptive_clipping": True}
    if privacy is not None:
        # the personalized column is a research figure about the clients' own test splits: opted in,
        # and epsilon does not cover it (the README says so next to the table)
        init_args = {**privacy, "log_client_metrics": True}
        args += ["--trainer.privacy", json.dumps({"class_path": "fedilora.privacy.DifferentialPrivacy",
                                                  "init_args": init_args})]  # fmt: skip
    if secure:
        args += ["--trainer.secure_aggregation", "fedilora.privacy.SecureAggregation"]
    trainer = FediLoRACLI(args=args).trainer
    history, final = trainer.history, trainer.history[-1]
    return {
        "name": name,
        "config": config,
        "aggregator": type(trainer.aggregator).__name__,
        "epsilon_target": epsilon,
        "privacy": privacy,
        "secure_aggregation": secure,
        "epsilon": final.get("privacy/epsilon"),
        "noise_multiplier": trainer.privacy.sigma if trainer.privacy else None,
        "final_clip_norm": final.get("privacy/clip_norm"),
        # the noisy fraction of updates within the clip norm, per round (adaptive clipping's input)
        "unclipped_fraction": [h["privacy/unclipped_fraction"] for h in history if "privacy/unclipped_fraction" in h],
        "acc": {c: final[f"global/{c}/acc"] for c in ("complete", "image_only", "text_only")},
        "personalized_acc": final.get("personalized/mean/acc"),
        "personalized_clients": final.get("personalized/num_clients"),
        "edits": sum(h.get("edit/num_edited", 0) for h in history),
        "round_time_s": statistics.median(h["round/time_s"] for h in history),
        "bytes_uploaded_per_round": statistics.mean(
            h.get("secagg/bytes_uploaded", h["comm/bytes_uploaded"]) for h in history
        ),
    }


def table(rows: list[dict]) -> None:
    print("| method | epsilon (delta 1e-5) | noise multiplier | complete | image only | text only | personalized |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["epsilon"] is None:
            eps = "inf (no DP)"
        elif r["epsilon_target"] is None:
            eps = f"{r['epsilon']:.3g} (clipping, negligible noise)"
        else:
            eps = f"{r['epsilon']:.2f} (target {r['epsilon_target']:g})"
        sigma = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3f}"
        acc = r["acc"]
        print(f"| {r['aggregator']} | {eps} | {sigma} | {acc['complete']:.3f} | {acc['image_only']:.3f} | "
              f"{acc['text_only']:.3f} | {r['personalized_acc']:.3f} ({r['personalized_clients']:.0f}) |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--large", action="store_true")
    parser.add_argument(
        "--posthoc", action="store_true", help="with --large: the two runs that split clipping from noise"
    )
    args = parser.parse_args()
    if args.large:
        clients, per_round, rounds, samples = (40, 4, 2, 50) if args.quick else (3000, 300, 20, 50)
        plan = [("fedilora.yaml", eps, False, None) for eps in EPSILONS]
        plan += [("fedilora_paper.yaml", None, False, None), ("fedilora_paper.yaml", 8.0, False, None)]
        if args.posthoc:  # chosen after the table above: its updates were clipped in almost every round
            clip_only = {"noise_multiplier": 0.01, "delta": 1e-5, "clip_norm": 0.1, "adaptive_clipping": True}
            start_at_1 = {"target_epsilon": 8.0, "delta": 1e-5, "clip_norm": 1.0, "adaptive_clipping": True}
            plan = [("fedilora.yaml", None, False, clip_only), ("fedilora.yaml", 8.0, False, start_at_1)]
    else:
        clients, per_round, rounds, samples = (20, 2, 2, None) if args.quick else (100, 10, 30, None)
        plan = [("fedilora_paper.yaml", eps, False, None) for eps in EPSILONS]
        plan += [("fedilora_paper.yaml", None, True, None)]
    name = "privacy_utility" + ("_large" if args.large else "") + ("_posthoc" if args.posthoc else "")
    design = {"clients": clients, "clients_per_round": per_round, "rounds": rounds, "samples_per_client": samples}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config, epsilon, secure, privacy in plan:
            label = f"{config.removesuffix('.yaml')}_" + ("secagg" if secure else "plain" if epsilon is None
                                                           else f"eps{epsilon:g}")  # fmt: skip
            if privacy is not None:
                label += "_clip_only" if "noise_multiplier" in privacy else f"_clip{privacy['clip_norm']:g}"
            rows.append(run(Path(tmp), label, config, clients, per_round, rounds, samples, epsilon, secure, privacy))
            table(rows[-1:])
            write_results(name, {**design, "runs": rows}, args.quick, 2)  # after every run: a stop keeps the rows
    table([r for r in rows if not r["secure_aggregation"]])
    masked = [r for r in rows if r["secure_aggregation"]]
    if masked:
        plain, masked = rows[0], masked[0]
        print("\n| aggregation | median round time (s) | uploaded per round (MB) |")
        print("|---|---|---|")
        for label, r in (("plain", plain), ("secure aggregation", masked)):
            print(f"| {label} | {r['round_time_s']:.2f} | {r['bytes_uploaded_per_round'] / 1e6:.2f} |")
        print(f"ratio: time {masked['round_time_s'] / plain['round_time_s']:.2f}x, "
              f"bytes {masked['bytes_uploaded_per_round'] / plain['bytes_uploaded_per_round']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
