"""Render the benchmark figures in the docs from the JSON the experiments wrote.

A docs page holds a block

    <!-- results:bench_overhead_threads1 -->
    (generated: the machine line, the table, the command)
    <!-- /results:bench_overhead_threads1 -->

whose name is the stem of a file in ``experiments/results/`` (``write_results`` in ``_bench.py``: the
script's name, ``_threadsN`` when it ran with N != 2 torch threads). Everything between the two markers
is replaced by what the JSON says; the text around them is the page's own. Quick runs (``*_quick*``)
are smoke tests and are refused. The JSON of full runs is tracked in git, so the pages can be checked
against it on any clone.

    .venv/bin/python experiments/render_results.py           # rewrite the blocks (make docs runs it)
    .venv/bin/python experiments/render_results.py --check   # exit 1 naming the pages out of date
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULTS = ROOT / "experiments" / "results"
BLOCK = re.compile(r"<!-- results:([\w.-]+) -->\n(.*?)<!-- /results:([\w.-]+) -->", re.S)
OPENING = re.compile(r"<!-- results:([\w.-]+) -->")
NO_TARGET = "cost reported (no target)"


class RenderError(Exception):
    """A block that cannot be rendered: one line, naming the page, the block and what is wrong."""


Row = tuple[str, str, str, str, str, str]  # measure, median, reference, ratio, target, met
COLUMNS = ("measure", "median", "reference, same run", "ratio", "target", "met")


def _s(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def _ms(ms: float) -> str:
    return f"{ms:.3g} ms"


def _met(met: bool | None) -> str:
    return "-" if met is None else ("yes" if met else "**no**")


def _target(text: str) -> str:
    return text.replace("<=", "≤").replace(">=", "≥")


def _table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(cells) + " |"

    return [line(columns), "|" + "---|" * len(columns)] + [line(r) for r in rows]


def _overhead(data: dict) -> tuple[list[Row], list[str]]:
    c = data["config"]
    rows = [(f"`FederatedTrainer.fit` round loop: {c['total_steps']} optimizer steps ({c['rounds']} rounds x "
             f"{c['per_round']} clients x {c['steps']} steps, batch {c['batch_size']}), evaluation excluded",
             _s(data["median_federated_s"]),
             f"{_s(data['median_plain_s'])}: a plain PyTorch loop, same steps and batches",
             f"{data['ratio']:.3f}", _target(data["target"]), _met(data["met"]))]  # fmt: skip
    notes = [f"Median of {data['repeats']}; median of the per-repetition ratios {data['paired_ratio_median']:.3f}; "
             f"framework cost per trained client {data['per_client_overhead_ms']:.1f} ms."]  # fmt: skip
    return rows, notes


def _client_throughput(data: dict) -> tuple[list[Row], list[str]]:
    rows = [(f"`FederatedTrainer.train_client`: {data['steps']} steps over {data['samples']} samples",
             f"{data['federated_samples_per_s']:.1f} samples/s",
             f"{data['lightning_samples_per_s']:.1f} samples/s: `lightning.Trainer(max_steps=N).fit`, same module",
             f"{data['ratio']:.3f}", _target(data["target"]), _met(data["met"]))]  # fmt: skip
    notes = [f"Median of {data['repeats']}; median of the per-repetition ratios {data['paired_ratio_median']:.3f}."]
    return rows, notes


def _aggregation(data: dict) -> tuple[list[Row], list[str]]:
    time_target, memory_target = (_target(t) for t in data["target"].split(", ", 1))
    rows: list[Row] = []
    for r in data["rows"]:
        k, adapter = r["num_clients"], r["global_adapter_bytes"] / 1e6
        rows.append((f"K={k}: streaming `DimensionWise` (begin / add / finish)", _s(r["median_stream_s"]),
                     f"{_s(r['median_floor_s'])}: one weighted sum over the stacked, zero-padded updates",
                     f"{r['ratio']:.2f}x", time_target, _met(r["time_met"])))  # fmt: skip
        peaks = [r["peak_rss_growth_x_global"], r["peak_rss_growth_fresh_updates_x_global"]]
        peak, fresh = ("n/a" if p is None else f"{p:.2f}x" for p in peaks)
        rows.append((f"K={k}: memory (accumulator; peak RSS growth; with each update a fresh copy)",
                     f"{r['accumulator_x_global']:.2f}x; {peak}; {fresh}", f"one global adapter, {adapter:.1f} MB",
                     f"{max(r['accumulator_x_global'], peaks[0] or 0):.2f}x", memory_target,
                     _met(r["memory_met"])))  # fmt: skip
    diff = max(r["max_abs_diff_vs_floor"] for r in data["rows"])
    notes = [f"{data['size']}; client ranks {data['ranks']} repeated; median of {data['repeats']}. The memory "
             f"target is checked on the accumulator and the peak RSS growth; the fresh copies include the update "
             f"in flight. Streamed results equal the floor's to {diff:.1e}."]  # fmt: skip
    return rows, notes


def _flexlora_svd(data: dict) -> tuple[list[Row], list[str]]:
    speedup, tolerance = re.fullmatch(r"speedup > (\S+), product rel err < (\S+)", data["target"]).groups()
    target = f"speed-up > {speedup}, products agree"
    rows: list[Row] = []
    for name, m in data["modules"].items():
        rows.append((f"{name} ({m['d_in']} → {m['d_out']}, stacked rank {m['stacked_rank']}): QR of the stacked "
                     f"factors", _s(m["median_qr_s"]), f"{_s(m['median_dense_s'])}: dense SVD of the update",
                     f"{m['speedup']:.1f}x faster", target, _met(m["met"])))  # fmt: skip
    err, name, rank = max((e, name, r) for name, m in data["modules"].items()
                          for r, e in m["rel_err_products_by_rank"].items())  # fmt: skip
    worst = data["modules"][name]
    notes = [f"Client ranks {data['ranks']}; median of {data['repeats']}. The products agree when, at every rank r, "
             f"the two routes' rank-r products B_r A_r agree to {tolerance} (relative Frobenius error) or the QR "
             "route is at most 2x as far from a float64 SVD as the dense route. Largest error between "
             f"the two routes' rank-r products: {err:.1e} ({name}, r = {rank}; there the QR route is "
             f"{worst['rel_err_qr_vs_float64_by_rank'][rank]:.1e} from a float64 SVD, the dense route "
             f"{worst['rel_err_dense_vs_float64_by_rank'][rank]:.1e})."]  # fmt: skip
    return rows, notes


def _secagg(data: dict) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    for model, r in data["rows"].items():
        m, plain = r["median_s"], f"{_s(r['median_s']['plain'])}: the plain sum of the same contributions"
        what = f"{model} ({r['coordinates']:,} coordinates)"
        for key, label in (("client", "one client masks"), ("server", "the server unmasks"),
                           ("simulator", "the simulator's whole masked sum")):  # fmt: skip
            rows.append((f"{what}: {label}", _s(m[key]), plain, f"{m[key] / m['plain']:.3g}x", NO_TARGET, "-"))
        up = r["upload_bytes"]
        rows.append((f"{what}: upload per client", f"{up['masked'] / 1e6:.2f} MB",
                     f"{up['plain_mean'] / 1e6:.2f} MB unmasked (mean)", f"{up['masked'] / up['plain_mean']:.3g}x",
                     NO_TARGET, "-"))  # fmt: skip
    err = max(r["max_abs_error"] for r in data["rows"].values())
    notes = [f"{data['clients']} clients, median of {data['repeats']}; the masked sums equal the plain ones to "
             f"{err:.1e}."]  # fmt: skip
    return rows, notes


def _data_checks(data: dict) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    for kind, count in (("jpeg", data["jpegs"]), ("png", data["pngs"])):
        header, decode = data[f"load_{kind}_header_ms_per_image"], data[f"load_{kind}_decode_ms_per_image"]
        rows.append((f"`MultimodalTable.load()`, {count} {kind.upper()}s, `check_images: header`, CPU per image",
                     _ms(header["cpu"]), f"{_ms(decode['cpu'])}: `check_images: decode`",
                     f"{header['cpu'] / decode['cpu']:.3f}", NO_TARGET, "-"))  # fmt: skip
    unique, copies = data["duplicates_unique_texts"], data["duplicates_all_copies"]
    rows.append((f"exact duplicates among {unique['samples']} samples, no shared text (nothing hashed), CPU",
                 _s(unique["cpu_s"]), f"{_s(copies['cpu_s'])}: every sample a copy (every file hashed)",
                 f"{unique['cpu_s'] / copies['cpu_s']:.3f}", NO_TARGET, "-"))  # fmt: skip
    for key in sorted(k for k in data if k.startswith("tokenize_")):
        t = data[key]
        uncut = next(k for k in t if k.endswith("_uncut_s"))
        chars = int(uncut.split("_")[1])
        rows.append((f"tokenize 2000 captions with the cut of long texts ({key[9:]}), CPU", _s(t["captions_cut_s"][1]),
                     f"{_s(t['captions_plain_s'][1])}: without the cut",
                     f"{t['captions_cut_s'][1] / t['captions_plain_s'][1]:.2f}", NO_TARGET, "-"))  # fmt: skip
        rows.append((f"tokenize one 200 kB word with the cut ({key[9:]}), CPU", _s(t["blob_200k_cut_s"][1]),
                     f"{_s(t[uncut][1])}: a {chars // 1000} kB word without it", "-", NO_TARGET, "-"))  # fmt: skip
    notes = [f"Generated images (JPEG 512x384, PNG 500x500), median of {data['repeats']}; CPU time of the "
             "process (all threads), steadier than wall time on a shared machine."]  # fmt: skip
    return rows, notes


def _privacy_audit(data: dict) -> tuple[list[str], list[str]]:
    args, claimed = data["args"], data["accountant_epsilon"]
    columns = ("noise", "accountant's ε", f"audited ε, median of {args['trials']}", "audited ε, max",
               "correct guesses per trial", "expected", "holds")  # fmt: skip
    rows = []
    for name, r in data["rows"].items():
        leak = name.startswith("reproducible")
        holds = r["audited_epsilon_max"] > claimed if leak else r["audited_epsilon_max"] <= claimed
        rows.append((name, f"{claimed:.2f}", f"{r['audited_epsilon_median']:.2f}", f"{r['audited_epsilon_max']:.2f}",
                     ", ".join(r["correct_of_guesses"]), "above the accountant (the leak)" if leak else
                     "at most the accountant", _met(holds)))  # fmt: skip
    notes = [f"{args['canaries']} canaries of norm C in {args['dim']:,} coordinates, σ = {args['sigma']}, one round, "
             f"δ = 1e-5, {args['trials']} trials of {args['guesses']} guesses each, 95% confidence."]  # fmt: skip
    return _table(columns, rows), notes


def _rows(render: Callable[[dict], tuple[list[Row], list[str]]]) -> Callable[[dict], tuple[list[str], list[str]]]:
    def table(data: dict) -> tuple[list[str], list[str]]:
        rows, notes = render(data)
        return _table(COLUMNS, rows), notes

    return table


# benchmark (the results file's stem without _threadsN) -> (script, its table and notes)
RENDERERS: dict[str, tuple[str, Callable[[dict], tuple[list[str], list[str]]]]] = {
    "bench_overhead": ("bench_overhead.py", _rows(_overhead)),
    "bench_client_throughput": ("bench_client_throughput.py", _rows(_client_throughput)),
    "bench_aggregation": ("bench_aggregation.py", _rows(_aggregation)),
    "bench_flexlora_svd": ("bench_flexlora_svd.py", _rows(_flexlora_svd)),
    "bench_secagg": ("bench_secagg.py", _rows(_secagg)),
    "data_checks": ("bench_data_checks.py", _rows(_data_checks)),
    "privacy_audit": ("privacy_audit.py", _privacy_audit),
}


def _command(benchmark: str, data: dict, threads: int | None) -> str:
    script, _ = RENDERERS[benchmark]
    command = f".venv/bin/python experiments/{script}"
    if benchmark == "bench_aggregation" and [r["num_clients"] for r in data["rows"]] != [10, 100, 1000]:
        command += " --counts " + " ".join(str(r["num_clients"]) for r in data["rows"])
    return command + (f" --threads {threads}" if threads else "")


def _machine(m: dict) -> str:
    day, time = m["date"].split("T")
    threads = m["torch_threads"]
    load = " / ".join(f"{x:.2f}" for x in m["loadavg"])
    shared = f" (above {m['cpu_count']}: other jobs shared the cores)" if m["loadavg"][0] > m["cpu_count"] else ""
    return (f"Measured {day} {time[:5]} on this machine ({m['cpu']}, {m['cpu_count']} cores), {threads} torch "
            f"thread{'s' if threads != 1 else ''}, torch {m['torch']}, Python {m['python']}; load average "
            f"{load} (1 / 5 / 15 min) when the run ended{shared}.")  # fmt: skip


def render_block(name: str, results: Path = RESULTS) -> str:
    """The generated text of block ``name``: machine line, table, notes and command, from its JSON."""
    if "_quick" in name:
        raise RenderError(f"results:{name} is a quick run (a smoke test); the docs show full runs")
    match = re.fullmatch(r"(.+?)(?:_threads(\d+))?", name)
    benchmark, threads = match.group(1), match.group(2)
    if benchmark not in RENDERERS:
        raise RenderError(f"results:{name}: no renderer for benchmark {benchmark!r} (known: {', '.join(RENDERERS)})")
    path = results / f"{name}.json"
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    if not path.is_file():
        run = f"experiments/{RENDERERS[benchmark][0]}" + (f" --threads {threads}" if threads else "")
        raise RenderError(f"results:{name}: {shown} does not exist; run {run} (a full run) first")
    try:
        data = json.loads(path.read_text())
        table, notes = RENDERERS[benchmark][1](data)
        machine = _machine(data["machine"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as error:
        raise RenderError(f"results:{name}: {shown} does not hold {benchmark}'s results ({type(error).__name__}: "
                          f"{error})") from None  # fmt: skip
    command = _command(benchmark, data, int(threads) if threads else None)
    source = f"`experiments/results/{name}.json`"
    return "\n".join([machine, "", *table, "", *notes, "", f"Command: `{command}`; generated from {source}.", ""])


def render_page(text: str, results: Path = RESULTS, page: str = "page") -> str:
    """``text`` with every results block regenerated from ``results``."""
    openings = OPENING.findall(text)
    blocks = BLOCK.findall(text)
    if len(openings) != len(blocks) or any(start != end for start, _, end in blocks):
        raise RenderError(f"{page}: a <!-- results:NAME --> marker has no matching <!-- /results:NAME --> after it")
    try:
        return BLOCK.sub(lambda m: f"<!-- results:{m[1]} -->\n{render_block(m[1], results)}<!-- /results:{m[1]} -->",
                         text)  # fmt: skip
    except RenderError as error:
        raise RenderError(f"{page}: {error}") from None


def render_docs(docs: Path = DOCS, results: Path = RESULTS, write: bool = True) -> list[Path]:
    """Regenerate every block under ``docs``; return the pages whose text changed (written when ``write``)."""
    rendered = {}
    for page in sorted(docs.rglob("*.md")):
        text = page.read_text()
        if "<!-- results:" in text:
            new = render_page(text, results, str(page.relative_to(docs.parent)))
            if new != text:
                rendered[page] = new
    for page, new in rendered.items() if write else ():  # after every page rendered: an error writes nothing
        page.write_text(new)
    return list(rendered)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page is out of date")
    args = parser.parse_args(argv)
    try:
        changed = render_docs(DOCS, RESULTS, write=not args.check)
    except RenderError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for page in changed:
        action = "out of date" if args.check else "rendered"
        print(f"{page.relative_to(DOCS.parent)}: {action}")
    if args.check and changed:
        print("run: .venv/bin/python experiments/render_results.py (or make docs)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
