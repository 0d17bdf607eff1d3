"""Dimension-wise aggregation (FediLoRA) at ViT-B-32 size against the floor of one weighted reduction.

The adapters are built directly with peft's key names (no model needed): LoRA on ``attn`` (in_proj
and out_proj), ``mlp.c_fc`` and ``mlp.c_proj`` of every block of both towers of ViT-B-32 (vision:
width 768, 12 layers; text: width 512, 12 layers), 96 modules, 192 tensors. Client ranks are
``[32, 32, 16, 16, 8, 8, 4, 4, 4, 4]`` repeated, so the global rank is 32.

- measured: ``DimensionWise().aggregate(previous, updates)`` for K = 10 and K = 100 clients;
- floor: per key, ``(stacked * w).sum(0)`` over the same tensors already zero-padded and stacked
  ``[K, ...]`` (w: the same ``[K, R]`` coefficients), i.e. the single weighted reduction any
  aggregation must at least do; the stacking itself is not timed.

Target: aggregate within 2x of the floor, per K. The floor's stacks are all built before it is timed
(3 GB at K = 100, on top of the clients' 1.3 GB: about 5 GB of memory at K = 100).

    .venv/bin/python experiments/bench_aggregation.py [--repeats 5] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _bench import write_results
from fedilora.aggregation import ClientUpdate, DimensionWise, dimension_weights, rank_axis, sample_weights, stack_padded

RANK_PATTERN = [32, 32, 16, 16, 8, 8, 4, 4, 4, 4]
TARGET = 2.0
# (tower prefix, width, layers) of ViT-B-32
VIT_B_32 = [("visual.transformer", 768, 12), ("transformer", 512, 12)]
QUICK = [("visual.transformer", 768, 1), ("transformer", 512, 1)]


def module_shapes(towers) -> dict[str, tuple[int, int]]:
    """``{module prefix: (d_in, d_out)}`` with peft's names for open_clip's residual blocks."""
    out = {}
    for tower, d, layers in towers:
        for i in range(layers):
            block = f"{tower}.resblocks.{i}"
            out[f"{block}.attn"] = (d, 3 * d)  # the packed in_proj of nn.MultiheadAttention
            out[f"{block}.attn.base_layer.out_proj"] = (d, d)
            out[f"{block}.mlp.c_fc"] = (d, 4 * d)
            out[f"{block}.mlp.c_proj"] = (4 * d, d)
    return out


def adapter(shapes: dict[str, tuple[int, int]], rank: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = {}
    for prefix, (d_in, d_out) in shapes.items():
        state[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=generator)
        state[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=generator)
    return state


def stack_all(previous, updates) -> dict[str, torch.Tensor]:
    """Every key's client tensors zero-padded to the global rank and stacked ``[K, ...]`` (not timed)."""
    return {
        key: stack_padded([u.lora[key] for u in updates], rank_axis(key), prev.shape[rank_axis(key)])
        for key, prev in previous.items()
    }


def floor_seconds(stacked: dict[str, torch.Tensor], coef_by_axis) -> tuple[float, dict[str, torch.Tensor]]:
    """One weighted reduction per key over the pre-stacked tensors, all keys in one timed region.

    Everything is stacked before the timer starts and reduced key after key, so (as for the aggregate,
    which reads the clients' tensors) the data comes from memory, not from a cache a just-built stack
    would still sit in.
    """
    result = {}
    start = time.perf_counter()
    for key, st in stacked.items():
        result[key] = (st * coef_by_axis[rank_axis(key)]).sum(0)
    return time.perf_counter() - start, result


def bench(num_clients: int, shapes, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(num_clients)
    ranks = [RANK_PATTERN[k % len(RANK_PATTERN)] for k in range(num_clients)]
    global_rank = max(RANK_PATTERN)
    previous = adapter(shapes, global_rank, generator)
    updates = [
        ClientUpdate(client_id=k, rank=r, num_samples=50 + 7 * k, lora=adapter(shapes, r, generator), extra={})
        for k, r in enumerate(ranks)
    ]
    coef = dimension_weights(ranks, sample_weights(updates), global_rank).to(torch.float32)  # [K, R]
    coef_by_axis = {0: coef.view(num_clients, global_rank, 1), 1: coef.view(num_clients, 1, global_rank)}
    aggregator = DimensionWise()

    # warm-up both (allocator, first-call dispatch); also the correctness check: every dimension is
    # covered by a rank-32 client, so the aggregate must equal the plain weighted reduction
    stacked = stack_all(previous, updates)
    aggregated = aggregator.aggregate(previous, updates)
    _, reference = floor_seconds(stacked, coef_by_axis)
    max_err = max(float((aggregated[k] - reference[k]).abs().max()) for k in previous)
    del aggregated, reference

    measured, floor = [], []
    for _ in range(repeats):  # interleaved, so that load changes on the shared CPU hit both alike
        start = time.perf_counter()
        aggregator.aggregate(previous, updates)
        measured.append(time.perf_counter() - start)
        floor.append(floor_seconds(stacked, coef_by_axis)[0])
    padded_bytes = sum(num_clients * t.numel() * t.element_size() for t in previous.values())
    return {
        "num_clients": num_clients,
        "tensors": len(previous),
        "padded_stack_bytes": padded_bytes,
        "client_bytes": sum(u.nbytes() for u in updates),
        "aggregate_s": measured,
        "floor_s": floor,
        "median_aggregate_s": statistics.median(measured),
        "median_floor_s": statistics.median(floor),
        "min_aggregate_s": min(measured),
        "min_floor_s": min(floor),
        "ratio": statistics.median(measured) / statistics.median(floor),
        "max_abs_diff_vs_floor": max_err,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, help="repetitions (default: 5, or 2 with --quick)")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (2: the 2-core machine; 1 is steadier on a busy CPU)"
    )
    parser.add_argument("--quick", action="store_true", help="one block per tower, K = 10 and 20 (smoke test)")
    args = parser.parse_args()
    args.repeats = args.repeats or (2 if args.quick else 5)
    torch.set_num_threads(args.threads)  # default 2: the 2-core machine

    shapes = module_shapes(QUICK if args.quick else VIT_B_32)
    counts = [10, 20] if args.quick else [10, 100]
    rows = []
    for k in counts:
        row = bench(k, shapes, args.repeats)
        row["met"] = row["ratio"] <= TARGET
        rows.append(row)
        print(f"K={k}: aggregate {row['aggregate_s']}, floor {row['floor_s']}", flush=True)

    size = "1 block per tower (quick)" if args.quick else "ViT-B-32, both towers, 12 blocks each"
    print(
        f"\nDimensionWise().aggregate, {size}: {rows[0]['tensors']} tensors, ranks {RANK_PATTERN} repeated, "
        f"median of {args.repeats}, {args.threads} threads"
    )
    print("| K   | padded stack  | aggregate s | floor s (stacked*w).sum(0) | ratio | target <= 2x | max |diff| |")
    print("|-----|---------------|-------------|----------------------------|-------|--------------|------------|")
    for r in rows:
        print(
            f"| {r['num_clients']:<3} | {r['padded_stack_bytes'] / 2**20:9.0f} MiB | {r['median_aggregate_s']:11.4f} | "
            f"{r['median_floor_s']:26.4f} | {r['ratio']:5.2f} | {'met' if r['met'] else 'NOT met':<12} | "
            f"{r['max_abs_diff_vs_floor']:10.2e} |"
        )

    payload = {
        "benchmark": "aggregation",
        "size": size,
        "ranks": RANK_PATTERN,
        "repeats": args.repeats,
        "threads": args.threads,
        "target": f"ratio <= {TARGET}",
        "rows": rows,
    }
    write_results("bench_aggregation", payload, args.quick, args.threads)


if __name__ == "__main__":
    main()
