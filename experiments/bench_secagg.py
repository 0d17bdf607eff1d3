"""Cost of secure aggregation for heterogeneous ranks against the plain sum of the same contributions.

A round's contributions are what ``fedilora.privacy.rounds.contribution`` produces: per-tensor sums in
the global shapes, the per-rank-dimension weight vector and three counters. They are made here from
random updates of the paper's ranks [32, 32, 16, 16, 8, 8, 4, 4, 4, 4] (repeated to K clients) at two
sizes: the demo's tiny model (global rank 32: 131,072 LoRA and 36,108 head coordinates) and ViT-B-32
(LoRA on attn, c_fc, c_proj of both towers at rank 32: 7.9 M coordinates; the head on its two 512-wide embeddings).

Timed, median of ``--repeats`` interleaved repeats:

- plain: ``add_contributions`` (the server's float64 sum without masking);
- client: one client's ``secagg.mask`` (fixed-point encoding and K-1 ChaCha20 mask streams); in a
  deployment every client does this in parallel on its own machine;
- server: ``unmask_sum`` of the K masked vectors (modular sum and decoding);
- simulator: ``SecureAggregation.sum`` as ``fedilora fit`` runs it, every client's masking one after the
  other in one process plus the server's part.

Bytes: what a client uploads, plain (float32 LoRA delta and head, as ``comm/bytes_uploaded`` counts)
against masked (8 bytes per coordinate of the global-shaped contribution plus a 32-byte public key).

    .venv/bin/python experiments/bench_secagg.py [--clients 10] [--repeats 5] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _bench import write_results
from fedilora.privacy.rounds import add_contributions
from fedilora.privacy.secagg import MaskingKey, SecureAggregation, flatten, mask, unmask_sum

RANKS = [32, 32, 16, 16, 8, 8, 4, 4, 4, 4]
GLOBAL_RANK = 32
# (LoRA modules as (in, out) pairs, head coordinates) of the two model sizes
# (attn in_proj, attn out_proj, mlp c_fc, mlp c_proj per block; the head: Linear(2 embed, 256), Linear(256, 12))
TINY = ([(64, 192), (64, 64), (64, 256), (256, 64)] * 4, 128 * 256 + 256 + 256 * 12 + 12)
VIT_B32 = (
    [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12 + [(512, 1536), (512, 512), (512, 2048), (2048, 512)] * 12,
    1024 * 256 + 256 + 256 * 12 + 12,
)


def contributions(size: tuple, clients: int, generator: torch.Generator) -> dict[int, dict[str, torch.Tensor]]:
    """Random contributions in the global shapes: client k fills the first r_k rank dimensions."""
    modules, head = size
    out = {}
    for k in range(clients):
        rank = RANKS[k % len(RANKS)]
        c: dict[str, torch.Tensor] = {}
        weight = torch.zeros(GLOBAL_RANK, dtype=torch.float64)
        weight[:rank] = 1.0
        for i, (fan_in, fan_out) in enumerate(modules):
            a = torch.zeros(GLOBAL_RANK, fan_in, dtype=torch.float64)
            b = torch.zeros(fan_out, GLOBAL_RANK, dtype=torch.float64)
            a[:rank] = torch.randn(rank, fan_in, generator=generator, dtype=torch.float64) * 0.01
            b[:, :rank] = torch.randn(fan_out, rank, generator=generator, dtype=torch.float64) * 0.01
            c[f"lora/m{i}.lora_A"], c[f"lora/m{i}.lora_B"] = a, b
        c["lora_weight"] = weight
        c["extra/head"] = torch.randn(head, generator=generator, dtype=torch.float64) * 0.01
        c["extra_weight"] = torch.ones(1, dtype=torch.float64)
        for name in ("unclipped", "count", "num_samples"):
            c[name] = torch.ones(1, dtype=torch.float64)
        out[k] = c
    return out


def plain_upload_bytes(size: tuple, rank: int) -> int:
    modules, head = size
    return 4 * (sum(rank * (fan_in + fan_out) for fan_in, fan_out in modules) + head)


def measure(size: tuple, clients: int, repeats: int) -> dict:
    contribs = contributions(size, clients, torch.Generator().manual_seed(0))
    secagg = SecureAggregation()
    vector, layout = flatten(contribs[0])
    keys = {c: MaskingKey() for c in contribs}
    publics = {c: k.public for c, k in keys.items()}
    times: dict[str, list[float]] = {"plain": [], "client": [], "server": [], "simulator": []}
    for _ in range(repeats):  # interleaved, so drifting load hits every variant alike
        started = time.perf_counter()
        plain = add_contributions(list(contribs.values()))
        times["plain"].append(time.perf_counter() - started)
        masked = []
        for c in contribs:
            started = time.perf_counter()
            masked.append(mask(contribs[c], c, keys[c], publics, b"bench"))
            times["client"].append(time.perf_counter() - started)
        started = time.perf_counter()
        total = unmask_sum(masked, layout)
        times["server"].append(time.perf_counter() - started)
        started = time.perf_counter()
        secagg.sum(contribs, b"bench-sim")
        times["simulator"].append(time.perf_counter() - started)
    error = max(float((total[k] - plain[k]).abs().max()) for k in plain)
    median = {k: statistics.median(v) for k, v in times.items()}
    plain_bytes = statistics.mean(plain_upload_bytes(size, RANKS[k % len(RANKS)]) for k in contribs)
    return {
        "coordinates": vector.numel(),
        "median_s": median,
        "simulator_vs_plain": median["simulator"] / median["plain"],
        "client_plus_server_vs_plain": (median["client"] + median["server"]) / median["plain"],
        "upload_bytes": {"plain_mean": plain_bytes, "masked": 8 * vector.numel() + 32},
        "max_abs_error": error,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny size only, 3 clients, 2 repeats")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clients, repeats = (3, 2) if args.quick else (args.clients, args.repeats)
    sizes = {"tiny": TINY} if args.quick else {"tiny": TINY, "ViT-B-32": VIT_B32}
    rows = {name: measure(size, clients, repeats) for name, size in sizes.items()}
    print(f"secure aggregation of {clients} clients, median of {repeats} repeats ({args.threads} torch threads)")
    print("| model | coordinates | plain sum (s) | one client masks (s) | server unmasks (s) | simulator round (s) "
          "| simulator / plain | upload per client plain -> masked (MB) | max error |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        m, up = r["median_s"], r["upload_bytes"]
        print(f"| {name} | {r['coordinates']:,} | {m['plain']:.4f} | {m['client']:.3f} | {m['server']:.3f} | "
              f"{m['simulator']:.2f} | {r['simulator_vs_plain']:.0f}x | {up['plain_mean'] / 1e6:.2f} -> "
              f"{up['masked'] / 1e6:.2f} | {r['max_abs_error']:.1e} |")  # fmt: skip
    write_results("bench_secagg", {"clients": clients, "repeats": repeats, "rows": rows}, args.quick, args.threads)


if __name__ == "__main__":
    main()
