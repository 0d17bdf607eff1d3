"""FlexLoRA's SVD through QR of the stacked factors against a dense SVD of the materialised update.

For one module, 10 clients with ranks ``[32, 32, 16, 16, 8, 8, 4, 4, 4, 4]`` (sum m = 128) give
dW = sum_k p_k B_k A_k = Bs As with Bs ``[d_out, m]``, As ``[m, d_in]`` (the square roots of the weights
split over both factors, as ``fedilora.algorithms.flexlora`` does). Both routes start from the same
Bs, As (stacking is common to both and not timed) and return the rank-32 factors (B_32, A_32):

- QR route (what FlexLoRA runs, "QR s" below): ``low_rank_svd(Bs, As)`` + ``truncated_factors(..., 32)``,
  O((d_out + d_in) m^2);
- dense reference: ``dW = Bs @ As`` (materialised) + ``dense_truncated_factors(dW, 32)``, a thin SVD of
  the d_out x d_in matrix, O(d_out d_in min(d_out, d_in)).

Module sizes are ViT-B-32's vision tower (width 768): attn in_proj 768->2304, out_proj 768->768,
mlp.c_fc 768->3072, mlp.c_proj 3072->768. Reported per module: median times, the speed-up
dense / QR, and the agreement of the products B_r A_r of both routes at every client rank (relative
Frobenius error), and of the QR route's full reconstruction U S V^T against dW.

    .venv/bin/python experiments/bench_flexlora_svd.py [--repeats 5] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _bench import write_results
from fedilora.algorithms.flexlora import dense_truncated_factors, low_rank_svd, truncated_factors

RANKS = [32, 32, 16, 16, 8, 8, 4, 4, 4, 4]
# the QR route must win; 1.0 is the break-even, products must agree to float32 accuracy
TARGET_SPEEDUP = 1.0
TOLERANCE = 1e-4
MODULES = {  # name: (d_in, d_out)
    "attn in_proj": (768, 2304),
    "attn out_proj": (768, 768),
    "mlp.c_fc": (768, 3072),
    "mlp.c_proj": (3072, 768),
}


def stacked_factors(d_in: int, d_out: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.tensor([50.0 + 7 * k for k in range(len(RANKS))])
    root = (counts / counts.sum()).sqrt()
    # 1/sqrt(d) keeps entries in a trained adapter's range; the singular values then have gaps, so
    # that the rank-r truncation is well defined and the two routes can be compared
    bs = [root[k] * torch.randn(d_out, r, generator=generator) / d_out**0.5 for k, r in enumerate(RANKS)]
    as_ = [root[k] * torch.randn(r, d_in, generator=generator) / d_in**0.5 for k, r in enumerate(RANKS)]
    return torch.cat(bs, dim=1), torch.cat(as_, dim=0)


def qr_route(b_stack: torch.Tensor, a_stack: torch.Tensor, rank: int):
    u, s, v = low_rank_svd(b_stack, a_stack)
    return truncated_factors(u, s, v, rank), (u, s, v)


def dense_route(b_stack: torch.Tensor, a_stack: torch.Tensor, rank: int):
    return dense_truncated_factors(b_stack @ a_stack, rank)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x - ref) / torch.linalg.matrix_norm(ref))


def bench_module(d_in: int, d_out: int, repeats: int, generator: torch.Generator) -> dict:
    b_stack, a_stack = stacked_factors(d_in, d_out, generator)
    global_rank = max(RANKS)
    qr_route(b_stack, a_stack, global_rank)  # warm-up: LAPACK workspace, first-call dispatch
    dense_route(b_stack, a_stack, global_rank)
    qr_times, dense_times = [], []
    for _ in range(repeats):  # interleaved, so that load changes on the shared CPU hit both alike
        start = time.perf_counter()
        qr_route(b_stack, a_stack, global_rank)
        qr_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        dense_route(b_stack, a_stack, global_rank)
        dense_times.append(time.perf_counter() - start)

    # agreement, untimed. Both routes run in float32, and the products of two rank-r truncations differ
    # by float32 rounding amplified by sigma_1 / (sigma_r - sigma_r+1): where that gap is small they
    # cannot agree to float32 precision whatever the algorithm. So each is also compared with a dense
    # float64 reference; the QR route passes at rank r if it agrees with the dense float32 route to
    # TOLERANCE or is at most 2x as far from the float64 reference as the dense route is.
    dw = b_stack @ a_stack
    (_, (u, s, v)) = qr_route(b_stack, a_stack, global_rank)
    dense_u, dense_s, dense_vh = torch.linalg.svd(dw, full_matrices=False)
    u64, s64, vh64 = torch.linalg.svd(b_stack.double() @ a_stack.double(), full_matrices=False)
    errors, qr_vs_64, dense_vs_64, agree = {}, {}, {}, True
    for r in sorted(set(RANKS)):
        b_q, a_q = truncated_factors(u, s, v, r)
        b_d, a_d = truncated_factors(dense_u, dense_s, dense_vh.T, r)
        b_64, a_64 = truncated_factors(u64, s64, vh64.T, r)
        reference = b_64 @ a_64
        errors[r] = rel_err(b_q @ a_q, b_d @ a_d)
        qr_vs_64[r] = rel_err((b_q @ a_q).double(), reference)
        dense_vs_64[r] = rel_err((b_d @ a_d).double(), reference)
        agree &= errors[r] < TOLERANCE or qr_vs_64[r] <= 2 * dense_vs_64[r]
    full = rel_err((u * s) @ v.T, dw)
    qr_med, dense_med = statistics.median(qr_times), statistics.median(dense_times)
    return {
        "d_in": d_in,
        "d_out": d_out,
        "stacked_rank": b_stack.shape[1],
        "qr_s": qr_times,
        "dense_s": dense_times,
        "median_qr_s": qr_med,
        "median_dense_s": dense_med,
        "speedup": dense_med / qr_med,
        "rel_err_products_by_rank": errors,
        "rel_err_qr_vs_float64_by_rank": qr_vs_64,
        "rel_err_dense_vs_float64_by_rank": dense_vs_64,
        "products_agree": agree,
        "rel_err_full_reconstruction": full,
        "singular_values_top": s[:4].tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, help="repetitions (default: 5, or 2 with --quick)")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (2: the 2-core machine; 1 is steadier on a busy CPU)"
    )
    parser.add_argument("--quick", action="store_true", help="module sizes / 4 (smoke test)")
    args = parser.parse_args()
    args.repeats = args.repeats or (2 if args.quick else 5)
    torch.set_num_threads(args.threads)  # default 2: the 2-core machine

    divisor = 4 if args.quick else 1
    generator = torch.Generator().manual_seed(0)
    rows = {}
    for name, (d_in, d_out) in MODULES.items():
        row = bench_module(d_in // divisor, d_out // divisor, args.repeats, generator)
        row["met"] = (
            row["speedup"] > TARGET_SPEEDUP and row["products_agree"] and row["rel_err_full_reconstruction"] < 1e-5
        )
        rows[name] = row
        print(f"{name}: qr {row['qr_s']}, dense {row['dense_s']}", flush=True)

    print(
        f"\nFlexLoRA SVD, {len(RANKS)} clients of ranks {RANKS} (stacked rank {sum(RANKS)}), "
        f"factors at rank {max(RANKS)}, float32, median of {args.repeats}, {args.threads} threads"
    )
    print("| module        | d_in -> d_out  | QR s   | dense s | speed-up | QR-dense | QR-f64  | dense-f64 | met |")
    print("|---------------|----------------|--------|---------|----------|----------|---------|-----------|-----|")
    for name, r in rows.items():
        errs = [max(r[k].values()) for k in ("rel_err_products_by_rank", "rel_err_qr_vs_float64_by_rank")]
        errs.append(max(r["rel_err_dense_vs_float64_by_rank"].values()))
        print(
            f"| {name:<13} | {r['d_in']:>5} -> {r['d_out']:<5} | {r['median_qr_s']:6.4f} | "
            f"{r['median_dense_s']:7.4f} | {r['speedup']:7.1f}x | {errs[0]:8.1e} | {errs[1]:7.1e} | "
            f"{errs[2]:9.1e} | {'yes' if r['met'] else 'NO':<3} |"
        )
    print(
        "errors: largest relative Frobenius error of the rank-r products B_r A_r over r in "
        f"{sorted(set(RANKS))}: QR route vs dense route, and each vs a float64 dense SVD"
    )
    print(
        f"target: speed-up > {TARGET_SPEEDUP:g}; at every r, QR-dense < {TOLERANCE:g} or QR-f64 <= 2 x dense-f64; "
        "QR route's full U S V^T == dW (< 1e-5)"
    )

    payload = {
        "benchmark": "flexlora_svd",
        "ranks": RANKS,
        "repeats": args.repeats,
        "threads": args.threads,
        "target": f"speedup > {TARGET_SPEEDUP}, product rel err < {TOLERANCE}",
        "modules": rows,
    }
    write_results("bench_flexlora_svd", payload, args.quick, args.threads)


if __name__ == "__main__":
    main()
