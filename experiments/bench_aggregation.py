"""Streaming dimension-wise aggregation (FediLoRA) at ViT-B-32 size against the floor of one weighted sum.

The adapters are built directly with peft's key names (no model needed): LoRA on ``attn`` (in_proj
and out_proj), ``mlp.c_fc`` and ``mlp.c_proj`` of every block of both towers of ViT-B-32 (vision:
width 768, 12 layers; text: width 512, 12 layers), 96 modules, 192 tensors. Client ranks are
``[32, 32, 16, 16, 8, 8, 4, 4, 4, 4]`` repeated, so the global rank is 32; client k reports
n_k = 50 + 7k samples.

- streaming: ``acc = DimensionWise().begin(previous)``, ``acc.add(update)`` for each update as a
  generator yields it, ``finish(acc)``; the time of the adds and the finish is measured, not that of
  making the updates. The generator hands out the tensors of a pool of 10 client adapters (124 MB,
  more than the 32 MB L3 cache, so each update is read from memory as the floor's stacks are): the
  stream never holds more than one update, whatever K.
- floor: per key, ``(stacked * w).sum(0)`` over the same updates already zero-padded and stacked
  ``[K, ...]`` (w: the ``[K, R]`` coefficients of dimension-wise averaging), i.e. the single weighted
  reduction any aggregation over stacked updates must at least do; the stacking is not timed. At K=1000
  the stacks of all keys (31 GB) do not fit in memory, so the keys are stacked and reduced in groups
  of at most ``--floor-budget`` bytes and the timed reductions are added up.
- memory: (1) counted: the bytes of the buffers the accumulator allocates (``acc.nbytes()``: its sums
  and weight vector); (2) measured: the growth of the process's peak RSS (VmHWM, reset through
  /proc/self/clear_refs) over a stream in which every update is a fresh copy, as a deserialised reply
  would be, dropped after it is added: it includes that one update in flight. Both are given in units
  of one global adapter (31 MB). tracemalloc does not see torch's CPU allocations, hence RSS.

Targets, per K: streaming time <= 1.0x the floor measured in the same run (median of the repeats,
interleaved); peak extra memory <= 2x one global adapter.

    .venv/bin/python experiments/bench_aggregation.py [--repeats 5] [--threads 2] [--counts 10 100 1000] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from _bench import write_results
from fedilora.aggregation import ClientUpdate, DimensionWise, dimension_weights, nbytes, rank_axis

RANK_PATTERN = [32, 32, 16, 16, 8, 8, 4, 4, 4, 4]
TIME_TARGET = 1.0
MEMORY_TARGET = 2.0
# (tower prefix, width, layers) of ViT-B-32
VIT_B_32 = [("visual.transformer", 768, 12), ("transformer", 512, 12)]
QUICK = [("visual.transformer", 768, 1), ("transformer", 512, 1)]
SIZES = {"vit-b-32": VIT_B_32, "quick": QUICK}


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


def ranks_of(num_clients: int) -> list[int]:
    return [RANK_PATTERN[k % len(RANK_PATTERN)] for k in range(num_clients)]


def counts_of(num_clients: int) -> list[int]:
    return [50 + 7 * k for k in range(num_clients)]


def updates(pool: list[dict[str, torch.Tensor]], num_clients: int, fresh: bool) -> Iterator[ClientUpdate]:
    """Client k's update, one at a time: the pool's adapter k % 10 (its tensors, or a fresh copy)."""
    for k, (rank, count) in enumerate(zip(ranks_of(num_clients), counts_of(num_clients), strict=True)):
        lora = pool[k % len(pool)]
        yield ClientUpdate(k, rank, count, {key: t.clone() for key, t in lora.items()} if fresh else lora, {})


class Clock:
    """Wall time and process CPU time of the timed regions only (CPU time: user + system, all threads).

    On a CPU shared with other jobs, wall time includes waiting for a core; CPU time does not.
    """

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> Clock:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu


def stream_seconds(previous, pool, num_clients: int) -> tuple[Clock, dict[str, torch.Tensor], int]:
    """Time of ``begin`` + every ``add`` + ``finish`` (not of the generator); the result; the accumulator's bytes."""
    aggregator, clock = DimensionWise(), Clock()
    with clock:
        acc = aggregator.begin(previous)
    for update in updates(pool, num_clients, fresh=False):
        with clock:
            acc.add(update)
    held = acc.nbytes()
    with clock:
        result = aggregator.finish(acc)
    return clock, result, held


def stack_padded(tensors: list[torch.Tensor], axis: int, global_rank: int) -> torch.Tensor:
    """``[K, *global_shape]`` with each client's tensor zero-padded along the rank ``axis`` (not timed)."""
    shape = list(tensors[0].shape)
    shape[axis] = global_rank
    out = tensors[0].new_zeros((len(tensors), *shape))
    for k, t in enumerate(tensors):
        out[k].narrow(axis, 0, t.shape[axis]).copy_(t)
    return out


def key_groups(previous, num_clients: int, budget: int) -> list[list[str]]:
    """Keys in groups whose padded ``[K, ...]`` stacks take at most ``budget`` bytes (at least one key each)."""
    groups, current, size = [], [], 0
    for key, prev in previous.items():
        need = num_clients * prev.numel() * prev.element_size()
        if current and size + need > budget:
            groups.append(current)
            current, size = [], 0
        current.append(key)
        size += need
    return [*groups, current] if current else groups


def floor_seconds(previous, pool, num_clients: int, coef_by_axis, budget: int) -> tuple[Clock, dict[str, torch.Tensor]]:
    """One weighted reduction per key over the pre-stacked tensors; stacks built group by group, untimed.

    Within a group everything is stacked before the timer starts and reduced key after key, so (as for
    the stream, which reads the pool's tensors) the data comes from memory, not from a cache a just-built
    stack would still sit in.
    """
    result, clock = {}, Clock()
    lora_of = [pool[k % len(pool)] for k in range(num_clients)]
    for group in key_groups(previous, num_clients, budget):
        stacked = {
            key: stack_padded([lora[key] for lora in lora_of], rank_axis(key), previous[key].shape[rank_axis(key)])
            for key in group
        }
        with clock:
            for key, st in stacked.items():
                result[key] = (st * coef_by_axis[rank_axis(key)]).sum(0)
        del stacked
    return clock, result


def peak_rss() -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def stream_peak_bytes(size: str, num_clients: int, threads: int, fresh: bool) -> int | None:
    """Peak RSS growth over a stream, measured in a fresh process (None where VmHWM cannot be reset).

    A fresh process, so that no memory an earlier measurement freed (and the allocator kept) is reused
    unseen. It builds the global adapter and the pool, then resets its peak RSS and streams. ``fresh``:
    every update is a new copy, dropped after it is added, so the growth includes the update in flight;
    otherwise the updates are the pool's tensors and the growth is what the aggregation itself adds.
    """
    command = [sys.executable, __file__, "--memory-child", str(num_clients), "--size", size]
    command += ["--threads", str(threads), *(["--fresh"] if fresh else [])]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    value = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_growth_bytes"]
    return None if value is None else int(value)


def memory_child(shapes, num_clients: int, fresh: bool) -> None:
    generator = torch.Generator().manual_seed(num_clients)
    previous = adapter(shapes, max(RANK_PATTERN), generator)
    pool = [adapter(shapes, r, generator) for r in RANK_PATTERN]
    # the first call of a kernel pages in its code, which RSS counts: run the same path once on a tiny
    # adapter (a few KiB, so that the memory it frees cannot hide the measured stream's)
    tiny = module_shapes([("warmup", 8, 1)])
    for rank in (8, 4):
        acc = DimensionWise().begin(adapter(tiny, 8, generator))
        acc.add(ClientUpdate(0, rank, 1, adapter(tiny, rank, generator), {}))
        DimensionWise().finish(acc)
    gc.collect()
    grown = None
    if reset_peak_rss():
        before = peak_rss()
        aggregator = DimensionWise()
        acc = aggregator.begin(previous)
        for update in updates(pool, num_clients, fresh):
            acc.add(update)
            del update  # before the generator makes the next one: one update in flight, not two
        result = aggregator.finish(acc)
        grown = peak_rss() - before
        del result
    print(json.dumps({"peak_rss_growth_bytes": grown}))


def bench(num_clients: int, size: str, repeats: int, budget: int, threads: int) -> dict:
    shapes = module_shapes(SIZES[size])
    generator = torch.Generator().manual_seed(num_clients)
    global_rank = max(RANK_PATTERN)
    previous = adapter(shapes, global_rank, generator)
    pool = [adapter(shapes, r, generator) for r in RANK_PATTERN]
    ranks = ranks_of(num_clients)
    counts = torch.tensor(counts_of(num_clients), dtype=torch.float64)
    weights = counts / counts.sum()  # p_k, as sample_weights gives them
    coef = dimension_weights(ranks, weights, global_rank).to(torch.float32)  # [K, R]
    coef_by_axis = {0: coef.view(num_clients, global_rank, 1), 1: coef.view(num_clients, 1, global_rank)}
    global_bytes = nbytes(previous)

    # warm-up of both, which is also the correctness check: every
    # dimension is covered by a rank-32 client, so the stream must equal the plain weighted reduction
    peak = stream_peak_bytes(size, num_clients, threads, fresh=False)
    peak_fresh = stream_peak_bytes(size, num_clients, threads, fresh=True)
    _, streamed, held = stream_seconds(previous, pool, num_clients)
    _, reference = floor_seconds(previous, pool, num_clients, coef_by_axis, budget)
    max_err = max(float((streamed[k] - reference[k]).abs().max()) for k in previous)
    del streamed, reference

    measured, floor = [], []
    for _ in range(repeats):  # interleaved, so that load changes on the shared CPU hit both alike
        measured.append(stream_seconds(previous, pool, num_clients)[0])
        floor.append(floor_seconds(previous, pool, num_clients, coef_by_axis, budget)[0])
    wall = {"stream": [c.wall for c in measured], "floor": [c.wall for c in floor]}
    cpu = {"stream": [c.cpu for c in measured], "floor": [c.cpu for c in floor]}
    return {
        "num_clients": num_clients,
        "tensors": len(previous),
        "global_adapter_bytes": global_bytes,
        "padded_stack_bytes": num_clients * global_bytes,
        "client_bytes": sum(nbytes(pool[k % len(pool)]) for k in range(num_clients)),
        "floor_groups": len(key_groups(previous, num_clients, budget)),
        "stream_s": wall["stream"],
        "floor_s": wall["floor"],
        "stream_cpu_s": cpu["stream"],
        "floor_cpu_s": cpu["floor"],
        "median_stream_s": statistics.median(wall["stream"]),
        "median_floor_s": statistics.median(wall["floor"]),
        "median_stream_cpu_s": statistics.median(cpu["stream"]),
        "median_floor_cpu_s": statistics.median(cpu["floor"]),
        "min_stream_s": min(wall["stream"]),
        "min_floor_s": min(wall["floor"]),
        "ratio": statistics.median(wall["stream"]) / statistics.median(wall["floor"]),
        "ratio_cpu": statistics.median(cpu["stream"]) / statistics.median(cpu["floor"]),
        "ratio_min": min(wall["stream"]) / min(wall["floor"]),
        "accumulator_bytes": held,
        "accumulator_x_global": held / global_bytes,
        "peak_rss_growth_bytes": peak,
        "peak_rss_growth_x_global": None if peak is None else peak / global_bytes,
        "peak_rss_growth_fresh_updates_bytes": peak_fresh,
        "peak_rss_growth_fresh_updates_x_global": None if peak_fresh is None else peak_fresh / global_bytes,
        "max_abs_diff_vs_floor": max_err,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, help="repetitions (default: 5, or 2 with --quick)")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (2: the 2-core machine; 1 is steadier on a busy CPU)"
    )
    parser.add_argument("--counts", type=int, nargs="+", help="numbers of clients K (default: 10 100 1000)")
    parser.add_argument("--floor-budget", type=float, default=2.0, help="GiB of padded stacks the floor holds at once")
    parser.add_argument("--quick", action="store_true", help="one block per tower, K = 10 and 20 (smoke test)")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=SIZES, default="vit-b-32", help=argparse.SUPPRESS)
    parser.add_argument("--fresh", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        torch.set_num_threads(args.threads)
        memory_child(module_shapes(SIZES[args.size]), args.memory_child, args.fresh)
        return
    args.repeats = args.repeats or (2 if args.quick else 5)
    torch.set_num_threads(args.threads)

    size = "quick" if args.quick else "vit-b-32"
    counts = args.counts or ([10, 20] if args.quick else [10, 100, 1000])
    rows = []
    for k in counts:
        row = bench(k, size, args.repeats, int(args.floor_budget * 2**30), args.threads)
        peak = row["peak_rss_growth_x_global"]
        row["time_met"] = row["ratio"] <= TIME_TARGET
        row["memory_met"] = row["accumulator_x_global"] <= MEMORY_TARGET and (peak is None or peak <= MEMORY_TARGET)
        rows.append(row)
        print(f"K={k}: stream {row['stream_s']}, floor {row['floor_s']}", flush=True)

    size = "1 block per tower (quick)" if args.quick else "ViT-B-32, both towers, 12 blocks each"
    print(
        f"\nDimensionWise streaming (begin/add/finish), {size}: {rows[0]['tensors']} tensors, one global adapter "
        f"{rows[0]['global_adapter_bytes'] / 2**20:.1f} MiB, ranks {RANK_PATTERN} repeated, median of {args.repeats}, "
        f"{args.threads} threads"
    )
    print(
        "| K    | padded stack | stream s | floor s (stacked*w).sum(0) | ratio  | stream CPU s | floor CPU s "
        "| ratio CPU |"
    )
    print(
        "|------|--------------|----------|----------------------------|--------|--------------|-------------|-----------|"
    )
    for r in rows:
        print(
            f"| {r['num_clients']:<4} | {r['padded_stack_bytes'] / 2**30:8.2f} GiB | {r['median_stream_s']:8.3f} | "
            f"{r['median_floor_s']:26.3f} | {r['ratio']:5.2f}x | {r['median_stream_cpu_s']:12.3f} | "
            f"{r['median_floor_cpu_s']:11.3f} | {r['ratio_cpu']:8.2f}x |"
        )
    print(f"target: ratio (wall, median) <= {TIME_TARGET}x")
    print()
    print("| K    | accumulator | peak RSS growth | + update copies | max |diff| vs floor |")
    print("|------|-------------|-----------------|-----------------|---------------------|")
    for r in rows:
        peaks = [r["peak_rss_growth_x_global"], r["peak_rss_growth_fresh_updates_x_global"]]
        peak, fresh = ("n/a" if p is None else f"{p:.2f}x" for p in peaks)
        print(
            f"| {r['num_clients']:<4} | {r['accumulator_x_global']:10.4f}x | {peak:>15} | {fresh:>15} | "
            f"{r['max_abs_diff_vs_floor']:19.2e} |"
        )
    print(
        f"in units of one global adapter; target <= {MEMORY_TARGET}x. accumulator: bytes of its buffers (counted); "
        "peak RSS growth: updates handed over without a copy; + update copies: each update a fresh copy, the one in "
        "flight included (both in a fresh process)"
    )

    payload = {
        "benchmark": "aggregation",
        "size": size,
        "ranks": RANK_PATTERN,
        "repeats": args.repeats,
        "threads": args.threads,
        "target": f"time ratio <= {TIME_TARGET}, peak extra memory <= {MEMORY_TARGET}x one global adapter",
        "rows": rows,
    }
    write_results("bench_aggregation", payload, args.quick, args.threads)


if __name__ == "__main__":
    main()
