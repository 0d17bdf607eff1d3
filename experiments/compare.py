"""Compare methods over seeds in one setting: a Markdown/CSV table and plots.

Every method is its config under ``configs/`` run through the same ``fedilora fit`` (same trainer,
data, model and evaluation); only the seeds (``trainer.seed`` and ``data.seed``: initialisation,
client sampling, partition, missing masks) and, for the sweep, ``data.missing_rate`` change.

    .venv/bin/python experiments/compare.py                 # the README's table (3 seeds) and plots
    .venv/bin/python experiments/compare.py --quick         # seconds: 2 methods, 1 seed, tiny data

Writes ``table.md``, ``table.csv``, ``runs.json``, ``accuracy_per_round.png`` and
``accuracy_vs_missing_rate.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import fedilora  # noqa: F401  (the torchvision shim first)
from fedilora.cli import FediLoRACLI
from fedilora.editing import edit_counts

ROOT = Path(__file__).resolve().parents[1]
METHODS = [
    "fedilora", "fedilora_no_edit", "fedilora_edit_half", "fedilora_edit_replace", "fedilora_edit_lora_b",
    "fedilora_edit_all", "fedilora_fixed_alpha", "fedilora_paper", "fedilora_delta", "fedilora_delta_outlier",
    "fedilora_outlier", "fedavg", "hetlora", "flora", "flexlora", "local", "centralized",
]  # fmt: skip
SWEEP_METHODS = ["fedilora", "hetlora", "flora", "flexlora"]
MISSING_RATES = [0.0, 0.2, 0.4, 0.6, 0.8]
COLUMNS = [
    ("global/complete/acc", "global complete"),
    ("global/image_only/acc", "global image only"),
    ("global/text_only/acc", "global text only"),
    ("personalized/mean/acc", "personalized"),
]


def run(method: str, seed: int, out: Path, overrides: list[str], eval_every: int) -> dict:
    """One ``fedilora fit`` of ``configs/<method>.yaml``; returns its history and results."""
    args = [
        "fit", "--config", str(ROOT / "configs" / f"{method}.yaml"),
        "--trainer.seed", str(seed), "--data.seed", str(seed), "--trainer.eval_every", str(eval_every),
        "--trainer.progress", "false", "--trainer.root_dir", str(out / "runs"), "--trainer.name", method,
        *overrides,
    ]  # fmt: skip
    started = time.perf_counter()
    cli = FediLoRACLI(args=args)
    trainer = cli.trainer
    history = trainer.history
    return {
        "method": method,
        "seed": seed,
        "overrides": overrides,
        "wall_time_s": time.perf_counter() - started,
        "bytes_per_round": statistics.mean(h["comm/bytes_uploaded"] + h["comm/bytes_downloaded"] for h in history),
        "curve": [(h["round"] + 1, h["global/complete/acc"]) for h in history if "global/complete/acc" in h],
        "final": {key: history[-1].get(key) for key, _ in COLUMNS},
        # None: the method does not edit; otherwise how often the editing callback changed a matrix
        "edits": edit_counts(history) if any("edit/num_edited" in h for h in history) else None,
    }


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def edits_cell(runs: list[dict]) -> str:
    """Edits per run, mean over the seeds: total matrices edited (rounds with an edit); '-' without editing."""
    edits = [r.get("edits") for r in runs]
    if any(e is None for e in edits):
        return "-"
    total = statistics.mean(e["total"] for e in edits)
    rounds = statistics.mean(e["rounds_with_edits"] for e in edits)
    return f"{total:g} ({rounds:g} of {edits[0]['rounds_eligible']})"


def write_table(runs: list[dict], out: Path) -> str:
    first = runs[0]["curve"][0][0]
    header = ["method", f"global complete, round {first}", *(name for _, name in COLUMNS), "edits (rounds)",
              "wall time (s)", "MB per round"]  # fmt: skip
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        # the first evaluation shows how fast a method learns, before all reach the benchmark's ceiling
        cells = [mean_std([r["curve"][0][1] for r in mine])]
        cells += [mean_std([r["final"][key] for r in mine]) for key, _ in COLUMNS]
        wall = statistics.mean(r["wall_time_s"] for r in mine)
        megabytes = statistics.mean(r["bytes_per_round"] for r in mine) / 1e6
        rows.append([method, *cells, edits_cell(mine), f"{wall:.1f}", f"{megabytes:.2f}"])
    with (out / "table.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    return table


def plot_curves(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # 13 methods: the default 10-colour cycle repeats
    for method in dict.fromkeys(r["method"] for r in runs):
        curves = [r["curve"] for r in runs if r["method"] == method]
        rounds = [r for r, _ in curves[0]]
        mean = [statistics.mean(acc for _, acc in points) for points in zip(*curves, strict=True)]
        ax.plot(rounds, mean, marker=".", label=method, linestyle="-" if "fedilora" in method else "--")
    ax.set(xlabel="round", ylabel="global accuracy (complete test samples)", title="Global accuracy per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(sweep: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = sweep[0]["curve"][0][0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=False)
    # the first evaluation shows the cost of missing modalities before every method reaches the ceiling
    panels = [(axes[0], lambda r: r["curve"][0][1], f"round {first}"),
              (axes[1], lambda r: r["final"]["global/complete/acc"], "final round")]  # fmt: skip
    for ax, value, when in panels:
        for method in dict.fromkeys(r["method"] for r in sweep):
            points = sorted((r["missing_rate"], value(r)) for r in sweep if r["method"] == method)
            rates = sorted({rate for rate, _ in points})
            accs = [statistics.mean(a for rate, a in points if rate == x) for x in rates]
            ax.plot(rates, accs, marker="o", label=method)
        ax.set(xlabel="training missing rate (kind: both)", ylabel="global accuracy (complete test samples)",
               title=f"Accuracy against missing rate, {when}")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(runs: list[dict], sweep: list[dict], out: Path) -> str:
    """Write the table and the plots; return the table."""
    table = write_table(runs, out)
    plot_curves(runs, out / "accuracy_per_round.png")
    if sweep:
        plot_sweep(sweep, out / "accuracy_vs_missing_rate.png")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sweep-methods", nargs="*", default=SWEEP_METHODS, choices=METHODS)
    parser.add_argument("--sweep-seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--missing-rates", nargs="+", type=float, default=MISSING_RATES)
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "compare")
    parser.add_argument("--eval-every", type=int, default=3, help="rounds between evaluations (points of the curves)")
    parser.add_argument("--tabulate", action="store_true", help="only rebuild table and plots from --out/runs.json")
    parser.add_argument("--quick", action="store_true", help="2 rounds, tiny data: checks the pipeline in seconds")
    args = parser.parse_args()
    overrides: list[str] = []
    if args.quick:
        args.methods, args.seeds = ["fedilora", "hetlora"], [0]
        args.sweep_methods, args.missing_rates, args.eval_every = ["fedilora"], [0.0, 0.4], 1
        overrides = ["--trainer.rounds", "2", "--trainer.max_local_steps", "2",
                     "--data.dataset.init_args.num_train", "400",
                     "--data.dataset.init_args.num_test", "120"]  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tabulate:
        saved = json.loads((args.out / "runs.json").read_text())
        print(report(saved["runs"], saved["sweep"], args.out))
        return
    started = time.perf_counter()

    runs = [run(method, seed, args.out, overrides, args.eval_every) for method in args.methods for seed in args.seeds]
    sweep = []
    for method in args.sweep_methods:
        for rate in args.missing_rates:
            for seed in args.sweep_seeds:
                overrides_rate = [*overrides, "--data.missing_rate", str(rate)]
                result = run(method, seed, args.out / "sweep", overrides_rate, args.eval_every)
                sweep.append({**result, "missing_rate": rate})
    (args.out / "runs.json").write_text(json.dumps({"runs": runs, "sweep": sweep}, indent=1))
    print(report(runs, sweep, args.out))
    print(f"\n{len(runs) + len(sweep)} runs in {time.perf_counter() - started:.0f} s; written to {args.out}")


if __name__ == "__main__":
    main()
