"""``fedilora compare``: run methods side by side over seeds on one dataset and model; table and plots.

Every method is a config (``configs/<method>.yaml`` or a YAML path) run through the same ``fedilora
fit``; ``--data`` and ``--model`` swap in a dataset group and a model group for all of them, and only
the seeds (``trainer.seed`` and ``data.seed``: initialisation, client sampling, partition, missing
masks) differ between the runs of a method.

    fedilora compare --methods fedilora,fedavg,hetlora --data configs/datasets/hard.yaml --seeds 0,1,2 \\
        --rounds 40 --out experiments/results/hard
    fedilora compare --out experiments/results/hard --tabulate       # only rebuild table and plots
    fedilora compare --quick                                         # seconds: fedilora and hetlora
    fedilora compare --methods fedilora,fedavg --seeds 0 -- --trainer.max_local_steps 5   # any fit option

``--methods`` is required (a run per method and seed: the 17 method configs over 3 seeds would be 51
runs), except with ``--quick`` (fedilora and hetlora) and ``--tabulate``; ``--help`` lists the configs.

A comparison resumes: run the same command again and the runs already in ``<out>/runs.json`` are
skipped, and a run that was interrupted continues from its last checkpoint (``--ckpt_path last``). A
``runs.json`` written with other settings (data, model, rounds, options) is refused rather than mixed.

Writes to ``--out``: ``table.md`` and ``table.csv`` (mean ± std over seeds: global accuracy per
modality condition, personalized accuracy, model edits when ``ModelEditing`` is on, time,
communication), ``accuracy_per_round.png`` (one panel per modality condition and personalized),
``communication_per_round.png``, ``accuracy_vs_missing_rate.png`` (with a sweep), ``runs.json`` and
every run's logs under ``runs/``.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

from fedilora.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]  # the checkout, for configs/ when run from elsewhere
METHODS = [
    "fedilora", "fedilora_no_edit", "fedilora_edit_half", "fedilora_edit_replace", "fedilora_edit_lora_b",
    "fedilora_edit_all", "fedilora_fixed_alpha", "fedilora_paper", "fedilora_outlier", "fedilora_delta",
    "fedilora_delta_outlier", "fedavg", "hetlora", "flora", "flexlora", "fedexlora", "hlora", "rblora",
    "fedavg_mean_rank", "local", "centralized",
]  # fmt: skip
SWEEP_METHODS = ["fedilora", "hetlora", "flora", "flexlora"]
MISSING_RATES = [0.0, 0.2, 0.4, 0.6, 0.8]
COLUMNS = [
    ("global/complete/acc", "global complete"),
    ("global/image_only/acc", "global image only"),
    ("global/text_only/acc", "global text only"),
    ("personalized/mean/acc", "personalized"),
]
QUICK = ["--trainer.rounds", "2", "--trainer.max_local_steps", "2"]
QUICK_SYNTHETIC = ["--data.dataset.init_args.num_train", "400", "--data.dataset.init_args.num_test", "120"]


# ------------------------------------------------------------------------------------------- running
def config_path(method: str) -> Path:
    """``configs/<method>.yaml`` (here, else in the checkout), or ``method`` itself when it is a YAML file."""
    if method.endswith((".yaml", ".yml")):
        path = Path(method)
    else:
        path = Path("configs") / f"{method}.yaml"
        if not path.is_file():
            path = REPO / "configs" / f"{method}.yaml"
    if not path.is_file():
        raise ConfigError(f"--methods: no config for {method!r} ({path} does not exist)")
    return path


def method_name(method: str) -> str:
    return Path(method).stem if method.endswith((".yaml", ".yml")) else method


def fit_args(method: str, seed: int, root: Path, settings: dict) -> list[str]:
    """The ``fedilora fit`` arguments of one run."""
    args = ["fit", "--config", str(config_path(method))]
    if settings["data"]:
        args += ["--data", settings["data"]]
    if settings["model"]:
        args += ["--model", settings["model"]]
    if settings["rounds"]:
        args += ["--trainer.rounds", str(settings["rounds"])]
    args += [
        "--trainer.seed", str(seed), "--data.seed", str(seed), "--trainer.eval_every", str(settings["eval_every"]),
        "--trainer.progress", "false", "--trainer.root_dir", str(root), "--trainer.name", method_name(method),
        *settings["overrides"],
    ]  # fmt: skip
    return args


def has_checkpoint(root: Path, name: str) -> bool:
    return any(Path(root, name).glob("version_*/checkpoints/round-*.ckpt"))


def run_one(args: list[str], root: Path, name: str) -> tuple[list[dict], dict]:
    """One ``fedilora fit`` in this process, resumed from its last checkpoint if it has one."""
    import fedilora  # noqa: F401  (the torchvision shim before lightning)
    from fedilora.cli.lightning import FediLoRACLI

    if has_checkpoint(root, name):
        args = [*args, "--ckpt_path", "last"]
    trainer = FediLoRACLI(args=args).trainer
    results = json.loads((trainer.log_dir / "results.json").read_text())
    return [_plain(h) for h in trainer.history], results


def _plain(entry: dict) -> dict:
    return {k: float(v) for k, v in entry.items() if isinstance(v, (int, float))}


def edit_counts(history: list[dict], results: dict) -> dict | None:
    """Model edits of a run (total, rounds with edits), or None when ``ModelEditing`` was not on."""
    if "ModelEditing" not in results.get("callbacks", []):
        return None
    if isinstance(results.get("edits"), dict):
        return {
            "total": int(results["edits"]["total"]),
            "rounds_with_edits": int(results["edits"]["rounds_with_edits"]),
        }
    per_round = [h.get("edit/num_edited", 0.0) for h in history]
    return {"total": int(sum(per_round)), "rounds_with_edits": sum(1 for n in per_round if n > 0)}


def record(key: str, method: str, seed: int, args: list[str], history: list[dict], results: dict, wall: float) -> dict:
    return {
        "key": key,
        "method": method_name(method),
        "seed": seed,
        "args": args,
        "wall_time_s": wall,
        "bytes_per_round": statistics.mean(
            h.get("comm/bytes_uploaded", 0.0) + h.get("comm/bytes_downloaded", 0.0) for h in history
        ),
        "history": history,
        "final": {k: history[-1].get(k) for k, _ in COLUMNS},
        "edits": edit_counts(history, results),
        "callbacks": results.get("callbacks", []),
    }


class Store:
    """``runs.json``: the settings, the finished runs and the time spent in interrupted ones, rewritten
    atomically after every change so that a crash never loses a finished run."""

    def __init__(self, out: Path, settings: dict) -> None:
        self.path = out / "runs.json"
        self.state = {"settings": settings, "runs": [], "sweep": [], "partial_time_s": {}}
        if self.path.is_file():
            try:
                saved = json.loads(self.path.read_text())
            except json.JSONDecodeError as err:
                raise ConfigError(f"--out: {self.path} is not valid JSON ({err.msg}, line {err.lineno})") from None
            if saved.get("settings") != settings:
                raise ConfigError(
                    f"--out: {self.path} holds a comparison with other settings ({saved.get('settings')}); "
                    "use another --out, or the same --data/--model/--rounds/--eval-every/fit options"
                )
            self.state.update(saved)
        self.save()

    def done(self, part: str, key: str) -> bool:
        return any(r["key"] == key for r in self.state[part])

    def add(self, part: str, entry: dict) -> None:
        self.state[part].append(entry)
        self.state["partial_time_s"].pop(entry["key"], None)
        self.save()

    def add_partial_time(self, key: str, seconds: float) -> None:
        self.state["partial_time_s"][key] = self.state["partial_time_s"].get(key, 0.0) + seconds
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.path)


def run_all(store: Store, part: str, jobs: list[tuple[str, str, int, Path, list[str], dict]], log=print) -> None:
    """Run every ``(part key, method, seed, root, extra args, extra fields)`` job not yet in the store."""
    for n, (key, method, seed, root, extra, fields) in enumerate(jobs, 1):
        if store.done(part, key):
            continue
        settings = {**store.state["settings"], "overrides": [*store.state["settings"]["overrides"], *extra]}
        args = fit_args(method, seed, root, settings)
        resumed = " (resuming)" if has_checkpoint(root, method_name(method)) else ""
        log(f"[{n}/{len(jobs)}] {key}{resumed}")
        started = time.perf_counter()
        try:
            history, results = run_one(args, root, method_name(method))
        except BaseException:
            store.add_partial_time(key, time.perf_counter() - started)
            raise
        wall = store.state["partial_time_s"].get(key, 0.0) + time.perf_counter() - started
        store.add(part, {**record(key, method, seed, args, history, results, wall), **fields})


# ---------------------------------------------------------------------------------------------- table
def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _evaluations(run: dict, key: str) -> list[tuple[int, float]]:
    return [(int(h["round"]) + 1, h[key]) for h in run["history"] if key in h]


def edits_cell(runs: list[dict]) -> str:
    counts = [r["edits"] for r in runs]
    if all(c is None for c in counts):
        return "off"
    counts = [c for c in counts if c is not None]
    total = statistics.mean(c["total"] for c in counts)
    rounds = statistics.mean(c["rounds_with_edits"] for c in counts)
    return f"{total:g} / {rounds:g}" + (" (never edited)" if total == 0 else "")


def write_table(runs: list[dict], out: Path) -> str:
    first = _evaluations(runs[0], "global/complete/acc")[0][0]
    header = ["method", f"global complete, round {first}", *(name for _, name in COLUMNS),
              "edits: total / rounds with edits", "wall time (s)", "MB per round"]  # fmt: skip
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        # the first evaluation shows how fast a method learns, before all reach a benchmark's ceiling
        cells = [mean_std([_evaluations(r, "global/complete/acc")[0][1] for r in mine])]
        cells += [mean_std([r["final"].get(key) for r in mine]) for key, _ in COLUMNS]
        wall = statistics.mean(r["wall_time_s"] for r in mine)
        megabytes = statistics.mean(r["bytes_per_round"] for r in mine) / 1e6
        rows.append([method, *cells, edits_cell(mine), f"{wall:.1f}", f"{megabytes:.2f}"])
    with (out / "table.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    seeds = sorted({r["seed"] for r in runs})
    table = "\n".join(lines) + f"\n\nmean ± std over seeds {seeds}; edits are means over the seeds"
    (out / "table.md").write_text(table + "\n")
    return table


# ---------------------------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_curve(runs: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Per round, the mean over the runs that evaluated ``key`` in that round."""
    by_round: dict[int, list[float]] = {}
    for run in runs:
        for round_, value in _evaluations(run, key):
            by_round.setdefault(round_, []).append(value)
    rounds = sorted(by_round)
    return rounds, [statistics.mean(by_round[r]) for r in rounds]


def _style(method: str) -> dict:
    return {"linestyle": "-" if "fedilora" in method else "--", "marker": "."}


def plot_curves(runs: list[dict], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, (key, name) in zip(axes.flat, COLUMNS, strict=True):
        ax.set_prop_cycle(color=plt.cm.tab20.colors)  # 13 methods: the default 10-colour cycle repeats
        for method in dict.fromkeys(r["method"] for r in runs):
            rounds, values = _mean_curve([r for r in runs if r["method"] == method], key)
            if rounds:
                ax.plot(rounds, values, label=method, **_style(method))
        ax.set(xlabel="round", ylabel="accuracy", title=name)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7, ncol=2)
    fig.suptitle("Accuracy per round (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_communication(runs: list[dict], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        per_round: dict[int, list[float]] = {}
        for run in mine:
            for h in run["history"]:
                total = h.get("comm/bytes_uploaded", 0.0) + h.get("comm/bytes_downloaded", 0.0)
                per_round.setdefault(int(h["round"]) + 1, []).append(total / 1e6)
        rounds = sorted(per_round)
        ax.plot(rounds, [statistics.mean(per_round[r]) for r in rounds], label=method, **_style(method))
    ax.set(xlabel="round", ylabel="MB up + down", title="Communication per round (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(sweep: list[dict], path: Path) -> None:
    plt = _pyplot()
    first = _evaluations(sweep[0], "global/complete/acc")[0][0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    # the first evaluation shows the cost of missing modalities before every method reaches a ceiling
    panels = [(axes[0], lambda r: _evaluations(r, "global/complete/acc")[0][1], f"round {first}"),
              (axes[1], lambda r: r["final"]["global/complete/acc"], "final round")]  # fmt: skip
    for ax, value, when in panels:
        for method in dict.fromkeys(r["method"] for r in sweep):
            points = sorted((r["missing_rate"], value(r)) for r in sweep if r["method"] == method)
            rates = sorted({rate for rate, _ in points})
            accs = [statistics.mean(a for rate, a in points if rate == x) for x in rates]
            ax.plot(rates, accs, marker="o", label=method)
        ax.set(xlabel="training missing rate", ylabel="global accuracy (complete test samples)",
               title=f"Accuracy against missing rate, {when}")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(runs: list[dict], sweep: list[dict], out: Path) -> str:
    """Write the table and the plots; return the table."""
    if not runs:
        return "no finished runs yet"
    table = write_table(runs, out)
    plot_curves(runs, out / "accuracy_per_round.png")
    plot_communication(runs, out / "communication_per_round.png")
    if sweep:
        plot_sweep(sweep, out / "accuracy_vs_missing_rate.png")
    return table


# ------------------------------------------------------------------------------------------------ CLI
def _names(values: list[str]) -> list[str]:
    """``a,b c`` -> ``[a, b, c]``: lists are given comma- or space-separated."""
    return [v for value in values for v in value.split(",") if v]


class _Parser(argparse.ArgumentParser):
    """Errors in one line, with the closest option for an unknown one (not the whole usage)."""

    def error(self, message: str):
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown:
            known = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
            close = difflib.get_close_matches(unknown.group(1).split("=", 1)[0], known, n=1, cutoff=0.6)
            message += f" (did you mean {close[0]}?)" if close else ""
        self.exit(2, f"{self.prog}: error: {message}; see: {self.prog} --help\n")


def parse_args(
    argv: list[str], sweep_methods: list[str] | None = None, methods: list[str] | None = None
) -> tuple[argparse.Namespace, list[str]]:
    """Options before ``--`` are the comparison's; those after it go to every ``fedilora fit``.

    ``sweep_methods``: the default of ``--sweep-methods`` (``experiments/compare.py`` sweeps, the
    ``fedilora compare`` command does not unless asked). ``methods``: the default of ``--methods``
    (``experiments/compare.py``: every config); without one, ``--methods`` is required.
    """
    own, overrides = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = _Parser(
        prog="fedilora compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # `--method x` is an error, not `--methods x`
    )  # fmt: skip
    default = "required without --quick/--tabulate" if not methods else f"default: {','.join(methods)}"
    default = "default: every method config" if methods == METHODS else default
    parser.add_argument("--methods", nargs="+", help=f"config names or YAML paths, comma- or space-separated "
                        f"({default}); configs/: {','.join(METHODS)}")  # fmt: skip
    parser.add_argument("--data", help="dataset group YAML for every method, e.g. configs/datasets/hard.yaml")
    parser.add_argument("--model", help="model group YAML for every method, e.g. configs/common/model.yaml")
    parser.add_argument("--seeds", nargs="+", help="seeds, e.g. 0,1,2 (default)")
    parser.add_argument("--rounds", type=int, help="trainer.rounds for every method (default: each config's)")
    parser.add_argument("--eval-every", type=int, default=3, help="rounds between evaluations (curve points)")
    parser.add_argument("--sweep-methods", nargs="*", help="methods of a missing-rate sweep (seed 0)")
    parser.add_argument("--sweep-seeds", nargs="+", default=["0"])
    parser.add_argument("--missing-rates", nargs="+", help="sweep rates (default: 0,0.2,0.4,0.6,0.8; quick: 0,0.4)")
    parser.add_argument("--out", type=Path, default=Path("experiments") / "results" / "compare")
    parser.add_argument("--tabulate", action="store_true", help="only rebuild table and plots from --out/runs.json")
    parser.add_argument("--quick", action="store_true", help="seconds: fedilora and hetlora, seed 0, 2 rounds of "
                        "2 steps (tiny data without --data)")  # fmt: skip
    args = parser.parse_args(own)
    quick = args.quick
    if not (args.methods or methods or quick or args.tabulate):
        parser.error("--methods is required, e.g. --methods fedilora,fedavg,hetlora (a run per method and seed); "
                     "--quick runs fedilora and hetlora in seconds")  # fmt: skip
    args.methods = _names(args.methods) if args.methods else (["fedilora", "hetlora"] if quick else methods or [])
    sweep = _names(args.sweep_methods) if args.sweep_methods is not None else list(sweep_methods or [])
    args.sweep_methods = sweep[:1] if quick and args.sweep_methods is None else sweep
    try:
        args.seeds = [int(s) for s in _names(args.seeds or (["0"] if quick else ["0,1,2"]))]
        args.sweep_seeds = [int(s) for s in _names(args.sweep_seeds)]
        rates = args.missing_rates or [",".join(map(str, [0.0, 0.4] if quick else MISSING_RATES))]
        args.missing_rates = [float(r) for r in _names(rates)]
    except ValueError as err:
        parser.error(f"--seeds/--sweep-seeds/--missing-rates: {err}")
    if quick:
        args.eval_every = 1
        overrides = [*QUICK, *([] if args.data else QUICK_SYNTHETIC), *overrides]
    return args, overrides


def compare(args: argparse.Namespace, overrides: list[str], log=print) -> str:
    out: Path = args.out
    if args.tabulate:
        path = out / "runs.json"
        if not path.is_file():
            raise ConfigError(f"--tabulate: {path} does not exist")
        saved = json.loads(path.read_text())
        return report(saved["runs"], saved["sweep"], out)
    for method in {*args.methods, *args.sweep_methods}:
        config_path(method)  # every config exists before the first run starts
    for option, group in (("--data", args.data), ("--model", args.model)):
        if group is not None and not Path(group).is_file():
            raise ConfigError(f"{option}: {group} does not exist")
    if args.eval_every < 1 or (args.rounds is not None and args.rounds < 1):
        raise ConfigError("--eval-every and --rounds must be >= 1")
    out.mkdir(parents=True, exist_ok=True)
    settings = {"data": args.data, "model": args.model, "rounds": args.rounds, "eval_every": args.eval_every,
                "overrides": overrides}  # fmt: skip
    store = Store(out, settings)
    started = time.perf_counter()
    jobs = [(f"{method_name(m)}/seed{s}", m, s, out / "runs" / method_name(m) / f"seed{s}", [], {})
            for m in args.methods for s in args.seeds]  # fmt: skip
    run_all(store, "runs", jobs, log)
    sweep_jobs = [
        (f"sweep/{method_name(m)}/rate{rate}/seed{s}", m, s, out / "sweep" / method_name(m) / f"rate{rate}/seed{s}",
         ["--data.missing_rate", str(rate)], {"missing_rate": rate})
        for m in args.sweep_methods for rate in args.missing_rates for s in args.sweep_seeds
    ]  # fmt: skip
    run_all(store, "sweep", sweep_jobs, log)
    table = report(store.state["runs"], store.state["sweep"], out)
    log(f"\n{len(jobs) + len(sweep_jobs)} runs, {time.perf_counter() - started:.0f} s in this call; written to {out}")
    return table


def main(argv: list[str] | None = None, sweep_methods: list[str] | None = None, methods: list[str] | None = None):
    args, overrides = parse_args(sys.argv[1:] if argv is None else list(argv), sweep_methods, methods)
    try:
        print(compare(args, overrides))
    except ConfigError as err:
        print(f"fedilora compare: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("fedilora compare: interrupted; run the same command again to resume", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
