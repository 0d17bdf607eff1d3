"""Does the global model use the image tower? Per-tower LoRA update sizes, per-condition curves and the head.

Comparison fixed before any run was looked at (issue 25, item 3; one seed each, seed 0): the hard embedded
benchmark (configs/hard.yaml, 40 rounds, 4 clients per round, checkpoint every round) with
  het   - the default method (DimensionWiseDelta + outlier editing) at the paper's ranks [32 32 16 16 8 8 4 4 4 4],
  r32   - FedAvg with every client at rank 32,
  r4    - FedAvg with every client at rank 4.
The image tower is "under-used with heterogeneous ranks" if, at the last round, het's image-only accuracy is
below both FedAvg runs' AND at least one of these holds for het but for neither FedAvg run:
  (1) the visual tower's share of the global adapter's size, visual / (visual + text) of
      sum over modules of ||s B A||_F, is the lowest of the three;
  (2) the global head's first layer weighs the image half of the concatenated embedding least,
      ||W[:, :d]||_F / ||W[:, d:]||_F the lowest of the three (d the embedding width; both halves are
      unit-norm embeddings, so the two column blocks see inputs of the same size).
A gap that comes with neither (1) nor (2) is not explained by tower or head use; one seed cannot tell a
gap of a few points from seed noise (the seed std on these sets is 0.01-0.05).

For each run folder (``runs/<name>/version_N`` written by ``fedilora fit`` with ``--trainer.checkpoint_every 1``
and a ``--trainer.keep_last`` covering every round) it reports, from every kept checkpoint:
  (a) per tower (visual / text) the global adapter's size sum_m ||s B_m A_m||_F, per rank block
      (dimensions [0, r1), [r1, r2), ... of the client ranks) and its change from the previous kept round;
      each personalized adapter's size per tower, grouped by the client's rank and missing pattern; and
      each client's own step (its adapter minus the global it received) per tower, by pattern and rank;
  (b) per condition the global accuracy per evaluated round (TensorBoard events: global/<condition>/acc,
      personalized/mean/acc);
  (c) the head's first-layer column norms over the image half and the text half (global head and each
      personalized head).
It prints the tables, writes ``experiments/results/diagnose_modalities_quick.json`` (git-ignored: a
one-seed diagnostic, not a benchmark) and, with ``--plots DIR``, one PNG per figure.

    .venv/bin/python experiments/diagnose_modalities.py runs/modalities/fedilora_het/version_0 \
        runs/modalities/fedavg_r32/version_0 runs/modalities/fedavg_r4/version_0 [--plots /tmp/plots]
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
import fedilora  # noqa: F401  (the torchvision shim first)
from _bench import write_results
from fedilora.lora_ops import module_keys, rank_axis

TOWERS = ("visual", "text")
CONDITIONS = ("complete", "image_only", "text_only")


def lora_scale(model: dict, rank: int) -> float:
    """s of s B A: lora_scale, or lora_alpha / r where a fixed alpha is set (see LoRACLIPClassifier)."""
    return model["lora_alpha"] / rank if model.get("lora_alpha") is not None else model.get("lora_scale", 1.0)


def tower_norms(lora: dict, scale: float, edges: list[int]) -> dict[str, list[float]]:
    """Per tower, sum over modules of ||s B[:, i:j] A[i:j]||_F for each block [i, j) of ``edges``."""
    out = {tower: [0.0] * (len(edges) - 1) for tower in TOWERS}
    for prefix, (a, b) in module_keys(lora).items():
        sizes = out["visual" if prefix.startswith("visual.") else "text"]
        for n, (i, j) in enumerate(itertools.pairwise(edges)):
            if i < lora[a].shape[0]:
                update = scale * lora[b][:, i:j].double() @ lora[a][i:j].double()
                sizes[n] += float(torch.linalg.matrix_norm(update))
    return out


def tower_change(new: dict, old: dict, scale: float) -> dict[str, float]:
    """Per tower, sum over modules of ||s (B_t A_t - B_{t-1} A_{t-1})||_F: the round's update size."""
    out = dict.fromkeys(TOWERS, 0.0)
    for prefix, (a, b) in module_keys(new).items():
        delta = new[b].double() @ new[a].double() - old[b].double() @ old[a].double()
        out["visual" if prefix.startswith("visual.") else "text"] += scale * float(torch.linalg.matrix_norm(delta))
    return out


def head_halves(extra: dict, first: dict | None = None) -> dict[str, float]:
    """||W[:, :d]||_F and ||W[:, d:]||_F of the head's first Linear over [image, text] (d = half its inputs).

    With ``first`` (the head of the first kept round) also the same norms of W - W_first: the random
    initialisation weighs both halves alike and dominates W, so what training added shows in the drift.
    """
    weight = extra["head.0.weight"].double()
    d = weight.shape[1] // 2
    image, text = float(weight[:, :d].norm()), float(weight[:, d:].norm())
    out = {"image": image, "text": text, "image_over_text": image / text}
    if first is not None:
        drift = weight - first["head.0.weight"].double()
        moved_image, moved_text = float(drift[:, :d].norm()), float(drift[:, d:].norm())
        out |= {"drift_image": moved_image, "drift_text": moved_text,
                "drift_image_over_text": moved_image / moved_text if moved_text else float("nan")}  # fmt: skip
    return out


def personal_state(entry: dict, folder: Path) -> tuple[int, dict, dict]:
    """A checkpoint's personalized entry, inline or spilled to a safetensors file (fedilora.personal)."""
    if "lora" in entry:
        return entry["rank"], entry["lora"], entry["extra"]
    with safe_open(folder / entry["file"], framework="pt") as handle:
        metadata = handle.metadata()
        lora = {k: handle.get_tensor(f"lora.{k}") for k in json.loads(metadata["lora"])}
        extra = {k: handle.get_tensor(f"extra.{k}") for k in json.loads(metadata["extra"])}
    return entry["rank"], lora, extra


def pattern(data: dict, client: int) -> str:
    """The client's missing pattern: complete, image_only (text missing), text_only, or mixed."""
    rates, kinds = data.get("missing_rate", 0.0), data.get("missing_kind", "both")
    rate = rates[client] if isinstance(rates, list) else rates
    kind = kinds[client] if isinstance(kinds, list) else kinds
    if rate == 0.0:
        return "complete"
    if rate == 1.0 and kind in ("text", "image"):
        return "image_only" if kind == "text" else "text_only"
    return "mixed"


def curves(run: Path) -> dict[str, dict[int, float]]:
    """Per condition, the accuracy logged at each evaluated round (the last value of a round wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    tags = {f"global/{c}/acc": c for c in CONDITIONS} | {"personalized/mean/acc": "personalized"}
    out: dict[str, dict[int, float]] = {}
    for tag, name in tags.items():
        if tag in events.Tags()["scalars"]:
            out[name] = {s.step: round(s.value, 4) for s in events.Scalars(tag)}
    return out


def diagnose(run: Path) -> dict:
    config = yaml.safe_load((run / "config.yaml").read_text())
    trainer, model, data = config["trainer"], config["model"], config["data"]
    ranks = trainer["ranks"] if isinstance(trainer["ranks"], list) else [trainer["ranks"]] * data["num_clients"]
    global_rank = trainer.get("global_lora_rank") or max(ranks)
    edges = sorted({0, *ranks, global_rank})
    aggregator = trainer["aggregator"]
    aggregator = aggregator["class_path"] if isinstance(aggregator, dict) else aggregator
    checkpoints = sorted(run.glob("checkpoints/round-*.ckpt"), key=lambda p: int(re.findall(r"\d+", p.name)[-1]))
    if not checkpoints:
        raise SystemExit(f"{run}: no checkpoints/round-*.ckpt (was it run with --trainer.checkpoint_every 1?)")
    rounds, previous, first, before, steps = {}, None, None, None, {}
    for path in checkpoints:
        state = torch.load(path, map_location="cpu", weights_only=False)
        lora, scale = state["global_lora"], lora_scale(model, global_rank)
        if before is not None and before["completed_rounds"] == state["completed_rounds"] - 1:
            own_steps(before, state, path.parent, data, model, steps)
        before = state
        first = first or state["global_extra"]
        row = {"global": tower_norms(lora, scale, edges), "head": head_halves(state["global_extra"], first)}
        if previous is not None:
            row["change"] = tower_change(lora, previous, scale)
        personal = {}
        for client, entry in state["personal"].items():
            rank, plora, pextra = personal_state(entry, path.parent)
            norms = tower_norms(plora, lora_scale(model, rank), [0, rank])
            personal[int(client)] = {
                "rank": rank,
                "pattern": pattern(data, int(client)),
                "visual": norms["visual"][0],
                "text": norms["text"][0],
                "head_image_over_text": head_halves(pextra)["image_over_text"],
            }
        row["personal"] = dict(sorted(personal.items()))
        rounds[state["completed_rounds"]] = row
        previous = lora
    return {
        "run": str(run),
        "aggregator": aggregator.rpartition(".")[2],
        "ranks": ranks,
        "edges": edges,
        "rounds": rounds,
        "accuracy": curves(run),
        "own_steps": {f"{p} r{r}": {"trained": n, "visual": v / n, "text": t / n}
                      for (p, r), (n, v, t) in sorted(steps.items())},
    }


def own_steps(before: dict, state: dict, folder: Path, data: dict, model: dict, steps: dict) -> None:
    """Add each client trained in ``state``'s round: per tower, its step from the global it received.

    The step is the personalized adapter minus the previous round's global truncated to the client's rank
    (the personalized state after an edit is the client's own training; see ``ModelEditing``), summed into
    ``steps[(pattern, rank)] = [times trained, visual, text]``. A client counts as trained when its
    personalized adapter changed since the previous checkpoint.
    """
    for client, entry in state["personal"].items():
        rank, plora, _ = personal_state(entry, folder)
        old = before["personal"].get(client)
        if old is not None:
            _, olora, _ = personal_state(old, folder)
            if all(torch.equal(plora[k], olora[k]) for k in plora):
                continue
        received = {k: v[:rank] if rank_axis(k) == 0 else v[:, :rank] for k, v in before["global_lora"].items()}
        step = tower_change(plora, received, lora_scale(model, rank))
        group = steps.setdefault((pattern(data, int(client)), rank), [0, 0.0, 0.0])
        group[0] += 1
        group[1] += step["visual"]
        group[2] += step["text"]


def visual_share(norms: dict[str, list[float]]) -> float:
    visual, text = sum(norms["visual"]), sum(norms["text"])
    return visual / (visual + text) if visual + text else float("nan")


def report(results: list[dict]) -> None:
    print("\n(a) global adapter at the last kept round: sum_m ||s B A||_F per tower and rank block; visual share")
    for r in results:
        last = r["rounds"][max(r["rounds"])]
        blocks = ", ".join(f"[{i},{j})" for i, j in itertools.pairwise(r["edges"]))
        print(f"  {r['name']:<12} blocks {blocks}")
        for tower in TOWERS:
            print(f"  {'':<12} {tower:<7} " + " ".join(f"{v:8.3f}" for v in last["global"][tower]))
        print(f"  {'':<12} visual share {visual_share(last['global']):.3f}")
    print("\n(a) personalized adapters at the last kept round: mean size per tower by (pattern, rank)")
    for r in results:
        groups: dict[tuple[str, int], list[dict]] = {}
        for p in r["rounds"][max(r["rounds"])]["personal"].values():
            groups.setdefault((p["pattern"], p["rank"]), []).append(p)
        for (pat, rank), members in sorted(groups.items()):
            visual = sum(p["visual"] for p in members) / len(members)
            text = sum(p["text"] for p in members) / len(members)
            head = sum(p["head_image_over_text"] for p in members) / len(members)
            print(f"  {r['name']:<12} {pat:<10} r{rank:<3} n={len(members)} visual {visual:7.3f} text {text:7.3f}"
                  f" head image/text {head:.3f}")  # fmt: skip
    print("\n(a) each client's own step per round (its adapter minus the global it received), mean by (pattern, rank)")
    for r in results:
        for group, step in r["own_steps"].items():
            print(f"  {r['name']:<12} {group:<15} trained {step['trained']:2d}x visual {step['visual']:6.3f}"
                  f" text {step['text']:6.3f} visual/text {step['visual'] / step['text']:.2f}")  # fmt: skip
    print("\n(b) global accuracy per condition, every 5th evaluated round and the last")
    for r in results:
        for condition, curve in r["accuracy"].items():
            steps = sorted(curve)
            shown = sorted({*steps[::5], steps[-1]})
            print(f"  {r['name']:<12} {condition:<12} " + " ".join(f"{s}:{curve[s]:.3f}" for s in shown))
    print("\n(c) global head, first layer: ||W_image||_F / ||W_text||_F, and of W - W_1 (W_1: first kept round)")
    for r in results:
        shown = sorted({*sorted(r["rounds"])[::5], max(r["rounds"])})
        heads = dict(zip(shown, (r["rounds"][t]["head"] for t in shown), strict=True))
        print(f"  {r['name']:<12} W      " + " ".join(f"{t}:{h['image_over_text']:.3f}" for t, h in heads.items()))
        print(f"  {'':<12} W-W_1  " + " ".join(f"{t}:{h['drift_image_over_text']:.3f}" for t, h in heads.items()))


def plot(results: list[dict], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for r in results:
        for ax, condition in zip(axes, (*CONDITIONS, "personalized"), strict=True):
            curve = r["accuracy"].get(condition, {})
            ax.plot(sorted(curve), [curve[s] for s in sorted(curve)], label=r["name"])
            ax.set_title(f"global {condition} acc" if condition != "personalized" else "personalized mean acc")
    axes[0].legend()
    fig.savefig(folder / "accuracy.png", dpi=90, bbox_inches="tight")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for r in results:
        steps = sorted(r["rounds"])
        axes[0].plot(steps, [visual_share(r["rounds"][t]["global"]) for t in steps], label=r["name"])
        axes[1].plot(steps, [r["rounds"][t]["head"]["image_over_text"] for t in steps], label=r["name"])
        moved = [t for t in steps if "change" in r["rounds"][t]]
        for tower, style in zip(TOWERS, ("-", "--"), strict=True):
            axes[2].plot(moved, [r["rounds"][t]["change"][tower] for t in moved], style, label=f"{r['name']} {tower}")
    axes[0].set_title("visual share of the global adapter's size")
    axes[1].set_title("global head: ||W_image|| / ||W_text||")
    axes[2].set_title("round's change of the global adapter per tower")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.savefig(folder / "towers.png", dpi=90, bbox_inches="tight")
    print(f"plots: {folder}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories with config.yaml, checkpoints/, events")
    parser.add_argument("--names", nargs="+", help="labels of the runs (default: the run folders' names)")
    parser.add_argument("--plots", type=Path, help="write accuracy.png and towers.png here")
    args = parser.parse_args()
    names = args.names or [run.parent.name for run in args.runs]
    if len(names) != len(args.runs):
        parser.error(f"--names: {len(names)} names for {len(args.runs)} runs")
    results = [{"name": name, **diagnose(run)} for name, run in zip(names, args.runs, strict=True)]
    report(results)
    if args.plots:
        plot(results, args.plots)
    write_results("diagnose_modalities", {"runs": results}, quick=True, threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
