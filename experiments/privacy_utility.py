"""Privacy–utility of FediLoRA with client-level DP, and the cost of secure aggregation.

The design, fixed before any result was seen: the embedded benchmark (configs/fedilora_paper.yaml's model and
data) spread over 100 clients (ranks: the paper's [32, 32, 16, 16, 8, 8, 4, 4, 4, 4] ten times), 10
sampled per round (q = 0.1), 30 rounds, DimensionWise + ModelEditing, adaptive clipping from C = 0.1
towards the median update norm. epsilon in {inf, 8, 4, 1} at delta = 1e-5: the noise multiplier is the
smallest that keeps 30 rounds within the budget (opacus RDP). Secure aggregation: the same run
without DP, with and without masking: seconds per round and bytes uploaded per round.

    .venv/bin/python experiments/privacy_utility.py            # the README's table (about 10 min on 2 cores)
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


def run(root: Path, name: str, clients: int, rounds: int, epsilon: float | None, secure: bool) -> dict:
    ranks = [32, 32, 16, 16, 8, 8, 4, 4, 4, 4] * (clients // 10)
    args = [
        # the old demo config: the paper's FediLoRA (DP needs DimensionWise's streaming sums), model and data
        "fit", "--config", str(ROOT / "configs" / "fedilora_paper.yaml"),
        "--data.num_clients", str(clients), "--trainer.ranks", json.dumps(ranks),
        "--trainer.clients_per_round", str(clients // 10), "--trainer.rounds", str(rounds),
        "--trainer.eval_every", str(rounds), "--trainer.progress", "false", "--trainer.checkpoint_every", "null",
        "--trainer.root_dir", str(root), "--trainer.name", name,
    ]  # fmt: skip
    if epsilon is not None:
        privacy = {"target_epsilon": epsilon, "delta": 1e-5, "clip_norm": 0.1, "adaptive_clipping": True}
        args += ["--trainer.privacy", json.dumps({"class_path": "fedilora.privacy.DifferentialPrivacy",
                                                  "init_args": privacy})]  # fmt: skip
    if secure:
        args += ["--trainer.secure_aggregation", "fedilora.privacy.SecureAggregation"]
    trainer = FediLoRACLI(args=args).trainer
    history, final = trainer.history, trainer.history[-1]
    return {
        "name": name,
        "epsilon_target": epsilon,
        "secure_aggregation": secure,
        "epsilon": final.get("privacy/epsilon"),
        "noise_multiplier": trainer.privacy.noise_multiplier if trainer.privacy else None,
        "final_clip_norm": final.get("privacy/clip_norm"),
        "acc": {c: final[f"global/{c}/acc"] for c in ("complete", "image_only", "text_only")},
        "personalized_acc": final.get("personalized/mean/acc"),
        "round_time_s": statistics.median(h["round/time_s"] for h in history),
        "bytes_uploaded_per_round": statistics.mean(
            h.get("secagg/bytes_uploaded", h["comm/bytes_uploaded"]) for h in history
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    clients, rounds = (20, 2) if args.quick else (100, 30)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for epsilon in EPSILONS:
            name = "plain" if epsilon is None else f"eps{epsilon:g}"
            rows.append(run(Path(tmp), name, clients, rounds, epsilon, secure=False))
        rows.append(run(Path(tmp), "secagg", clients, rounds, None, secure=True))
    print("| epsilon (delta 1e-5) | noise multiplier | complete | image only | text only | personalized |")
    print("|---|---|---|---|---|---|")
    for r in rows[: len(EPSILONS)]:
        eps = "inf (no DP)" if r["epsilon_target"] is None else f"{r['epsilon']:.2f} (target {r['epsilon_target']:g})"
        sigma = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3f}"
        acc = r["acc"]
        print(f"| {eps} | {sigma} | {acc['complete']:.3f} | {acc['image_only']:.3f} | {acc['text_only']:.3f} | "
              f"{r['personalized_acc']:.3f} |")  # fmt: skip
    plain, masked = rows[0], rows[-1]
    print("\n| aggregation | median round time (s) | uploaded per round (MB) |")
    print("|---|---|---|")
    for label, r in (("plain", plain), ("secure aggregation", masked)):
        print(f"| {label} | {r['round_time_s']:.2f} | {r['bytes_uploaded_per_round'] / 1e6:.2f} |")
    print(f"ratio: time {masked['round_time_s'] / plain['round_time_s']:.2f}x, "
          f"bytes {masked['bytes_uploaded_per_round'] / plain['bytes_uploaded_per_round']:.2f}x")  # fmt: skip
    write_results("privacy_utility", {"clients": clients, "rounds": rounds, "runs": rows}, args.quick, 2)


if __name__ == "__main__":
    main()
