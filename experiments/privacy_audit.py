"""Empirical privacy audit: how much epsilon does a DP round actually give? (one-run auditing)

Design (fixed before any result was seen): Steinke, Nasr and Jagielski 2023, "Privacy Auditing with One (1)
Training Run". ``m`` canary clients, each with an update of norm exactly C in its own random direction
(the largest change clipping allows), are each included with probability 1/2 (drawn from ``secrets``); an
excluded canary's slot is a failed client, which the DP server counts as a zero update (the zero-out
neighbour relation of its public divisors). One round of fedilora's own server step runs
(``FederatedServer.aggregate``: clip, sum, noise, release; default aggregator ``DimensionWiseDelta``).
The auditor scores each canary by the released step's projection on its direction, guesses "in" for the
``k`` highest scores and "out" for the ``k`` lowest, and counts the correct guesses ``v``. If the round
is epsilon-DP, v is dominated by Binomial(2k, e^eps / (1 + e^eps)) (their Theorem 3.1, delta neglected:
a sound mechanism's audit exceeds the accountant only with probability <= beta + O(m delta)); the audit's
epsilon is the largest eps that this rejects at confidence 1 - beta.

Two noise sources, same canaries: the default (secure: ChaCha20 keyed from ``os.urandom``) and
``reproducible_noise``, where the auditor, who has the run's config, regenerates the noise from the
seed and subtracts it before scoring.
Pass: the default's audited epsilon <= the accountant's; the reproducible one exceeds it (the leak).

    .venv/bin/python experiments/privacy_audit.py            # m = 1000 canaries, sigma 2, 5 trials
    .venv/bin/python experiments/privacy_audit.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import math
import secrets
import statistics
import time

import torch

from _bench import write_results
from fedilora.aggregation import ClientUpdate
from fedilora.algorithms import DimensionWiseDelta
from fedilora.privacy import DifferentialPrivacy
from fedilora.privacy.accounting import PrivacyAccountant
from fedilora.server import NOISE_STREAM, FederatedServer, check_update, client_seed

RANK, D_IN = 4, 8  # the global adapter is small; the canaries live in the head (the released tensor)


def binomial_tail(n: int, v: int, p: float) -> float:
    """P[Binomial(n, p) >= v], in log space (n up to a few thousand)."""
    if v <= 0:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
            + (n - i) * math.log1p(-p) for i in range(v, n + 1)]  # fmt: skip
    top = max(logs)
    return math.exp(top) * sum(math.exp(x - top) for x in logs)


def audited_epsilon(guesses: int, correct: int, beta: float = 0.05) -> float:
    """The largest eps at which ``correct`` of ``guesses`` right is rejected at level ``beta`` (bisection)."""
    def rejected(eps: float) -> bool:
        return binomial_tail(guesses, correct, 1.0 / (1.0 + math.exp(-eps))) < beta

    if not rejected(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejected(high) and high < 64:
        low, high = high, 2 * high
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if rejected(mid) else (low, mid)
    return low


def one_run(m: int, dim: int, sigma: float, guesses: int, reproducible: bool, seed: int) -> dict:
    clip = 1.0
    privacy = DifferentialPrivacy(clip_norm=clip, noise_multiplier=sigma, reproducible_noise=reproducible)
    aggregator = DimensionWiseDelta().setup(scale=1.0)
    privacy.setup("DimensionWiseDelta", num_clients=m, per_round=m, rounds=1)
    g = torch.Generator().manual_seed(seed)
    lora = {"m.lora_A.weight": torch.randn(RANK, D_IN, generator=g),
            "m.lora_B.weight": torch.randn(2, RANK, generator=g)}  # fmt: skip
    extra = {"head.weight": torch.zeros(dim)}
    server = FederatedServer(aggregator, [RANK] * m, m, RANK, seed, lora, extra, privacy=privacy)
    directions = torch.randn(m, dim, generator=g, dtype=torch.float64)
    directions /= directions.norm(dim=1, keepdim=True)
    included = [secrets.randbits(1) == 1 for _ in range(m)]
    updates, failed = [], []
    for k in range(m):
        if not included[k]:
            failed.append((k, "excluded canary"))
            continue
        payload_lora, payload_extra = server.payload(k, RANK)
        update = ClientUpdate(client_id=k, rank=RANK, num_samples=1, lora=dict(payload_lora),
                              extra={"head.weight": payload_extra["head.weight"] + (clip * directions[k]).float()})
        assert check_update(update, payload_lora, payload_extra) is None
        updates.append(update)
    before = {**server.global_lora, **server.global_extra}
    server.aggregate(0, updates, failed)
    released = (server.global_extra["head.weight"].double() - before["head.weight"].double()) * m  # the noised sum
    if reproducible:  # the auditor rebuilds the noise from the config's seed, in the release's draw order
        std = privacy.sum_multiplier * clip
        rebuilt = torch.Generator().manual_seed(client_seed(seed, 0, NOISE_STREAM))
        for key, value in before.items():
            noise = torch.randn(value.shape, generator=rebuilt, dtype=torch.float64) * std
            if key == "head.weight":
                released -= noise
    scores = directions @ released
    order = sorted(range(m), key=lambda k: float(scores[k]))
    half = guesses // 2
    correct = sum(not included[k] for k in order[:half]) + sum(included[k] for k in order[-half:])
    return {"correct": correct, "guesses": 2 * half, "epsilon": audited_epsilon(2 * half, correct)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=50_000)
    parser.add_argument("--sigma", type=float, default=2.0)
    parser.add_argument("--guesses", type=int, default=200, help="k highest + k lowest scores (2k in all)")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.canaries, args.dim, args.trials, args.guesses = 200, 5_000, 2, 60
    torch.set_num_threads(2)
    accountant = PrivacyAccountant(sample_rate=1.0, delta=1e-5)
    accountant.step(args.sigma)
    claimed = accountant.epsilon()
    rows = {}
    for reproducible in (False, True):
        started, runs = time.perf_counter(), []
        for trial in range(args.trials):
            runs.append(one_run(args.canaries, args.dim, args.sigma, args.guesses, reproducible, seed=trial))
        name = "reproducible_noise (auditor regenerates it)" if reproducible else "default (secure noise)"
        rows[name] = {
            "audited_epsilon_median": statistics.median(r["epsilon"] for r in runs),
            "audited_epsilon_max": max(r["epsilon"] for r in runs),
            "correct_of_guesses": [f"{r['correct']}/{r['guesses']}" for r in runs],
            "seconds": time.perf_counter() - started,
        }
    print(f"one-run audit: {args.canaries} canaries of norm C, sigma {args.sigma}, one round, delta 1e-5, "
          f"{args.trials} trials, {args.guesses} guesses, 95% confidence")  # fmt: skip
    print(f"accountant's epsilon: {claimed:.3f}")
    print("| noise | audited epsilon (median) | (max) | correct guesses per trial | <= accountant |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        ok = row["audited_epsilon_max"] <= claimed
        print(f"| {name} | {row['audited_epsilon_median']:.3f} | {row['audited_epsilon_max']:.3f} | "
              f"{', '.join(row['correct_of_guesses'])} | {'yes' if ok else 'NO: leak found'} |")  # fmt: skip
    write_results("privacy_audit", {"args": vars(args), "accountant_epsilon": claimed, "rows": rows}, args.quick, 2)


if __name__ == "__main__":
    main()
