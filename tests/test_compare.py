import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedilora import compare
from fedilora.cli import main
from fedilora.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _history(rounds: int, acc: float, edits: list[float] | None = None) -> list[dict]:
    history = []
    for r in range(rounds):
        entry = {"round": float(r), "comm/bytes_uploaded": 1e6, "comm/bytes_downloaded": 2e6}
        if edits is not None and r >= 1:  # ModelEditing reports from round 1 on
            entry["edit/num_edited"] = edits[r - 1]
        if (r + 1) % 2 == 0:
            entry.update({key: acc + r / 100 for key, _ in compare.COLUMNS})
        history.append(entry)
    return history


def _run(method: str, seed: int, history: list[dict], callbacks: list[str], results_edits=None) -> dict:
    results = {"callbacks": callbacks, **({"edits": results_edits} if results_edits else {})}
    return compare.record(f"{method}/seed{seed}", method, seed, [], history, results, wall=10.0 + seed)


def test_edit_counts_prefer_results_then_history_and_are_absent_without_editing():
    history = _history(4, 0.5, edits=[0.0, 3.0, 1.0])
    assert compare.edit_counts(history, {"callbacks": ["ModelEditing"]}) == {"total": 4, "rounds_with_edits": 2}
    given = {"callbacks": ["ModelEditing"], "edits": {"total": 7, "rounds_with_edits": 5}}
    assert compare.edit_counts(history, given) == {"total": 7, "rounds_with_edits": 5}
    assert compare.edit_counts(history, {"callbacks": []}) is None
    # editing on but never fired: zero, not absent
    assert compare.edit_counts(_history(4, 0.5, edits=[0.0] * 3), {"callbacks": ["ModelEditing"]}) == {
        "total": 0,
        "rounds_with_edits": 0,
    }


def test_tabulate_from_the_cli_writes_table_and_plots(tmp_path, capsys):
    runs = [
        _run("fedilora", 0, _history(4, 0.5, edits=[0.0, 3.0, 1.0]), ["ModelEditing"]),
        _run("fedilora", 1, _history(4, 0.6, edits=[2.0, 0.0, 0.0]), ["ModelEditing"]),
        _run("fedilora_never", 0, _history(4, 0.4, edits=[0.0] * 3), ["ModelEditing"]),
        _run("fedavg", 0, _history(4, 0.3), [], results_edits=None),
    ]
    (tmp_path / "runs.json").write_text(json.dumps({"settings": {}, "runs": runs, "sweep": []}))
    main(["compare", "--tabulate", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    with (tmp_path / "table.csv").open() as handle:
        rows = {row[0]: row for row in csv.reader(handle)}
    header = rows["method"]
    assert header[:6] == ["method", "global complete, round 2", "global complete", "global image only",
                          "global text only", "personalized"]  # fmt: skip
    edits = header.index("edits: total / rounds with edits")
    assert rows["fedilora"][edits] == "3 / 1.5"  # seeds: (4 edits, 2 rounds) and (2, 1)
    assert rows["fedilora_never"][edits] == "0 / 0 (never edited)"
    assert rows["fedavg"][edits] == "off"
    assert rows["fedilora"][2] == "0.580 ± 0.071"  # final accuracies 0.53 and 0.63
    assert rows["fedilora"][1] == "0.560 ± 0.071"  # first evaluation (round 2): 0.51 and 0.61
    assert rows["fedavg"][-1] == "3.00" and rows["fedilora"][-2] == "10.5"
    assert "| fedilora_never |" in printed and "| fedilora_never |" in (tmp_path / "table.md").read_text()
    for plot in ("accuracy_per_round.png", "communication_per_round.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lists_are_comma_or_space_separated_and_quick_keeps_given_methods():
    args, overrides = compare.parse_args(
        ["--methods", "fedilora,fedavg", "hetlora", "--seeds", "0,2", "--", "--x", "1"]
    )
    assert args.methods == ["fedilora", "fedavg", "hetlora"] and args.seeds == [0, 2]
    assert overrides == ["--x", "1"] and args.sweep_methods == []
    args, overrides = compare.parse_args(["--quick", "--methods", "fedavg", "--data", "d.yaml"])
    assert args.methods == ["fedavg"] and args.seeds == [0]
    assert overrides == compare.QUICK  # no synthetic-size options for a --data group


def test_a_store_with_other_settings_is_refused(tmp_path):
    compare.Store(tmp_path, {"data": "a.yaml", "rounds": 3})
    with pytest.raises(ConfigError, match="holds a comparison with other settings"):
        compare.Store(tmp_path, {"data": "b.yaml", "rounds": 3})
    assert json.loads((tmp_path / "runs.json").read_text())["settings"]["data"] == "a.yaml"


def test_unknown_method_or_group_is_one_error(tmp_path, capsys):
    cases = [(["--methods", "nosuch"], "--methods: no config for 'nosuch'"),
             (["--methods", "fedavg", "--data", "configs/datasets/nosuch.yaml"], "--data: configs")]  # fmt: skip
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["compare", *argv, "--out", str(tmp_path)])
        assert exit_info.value.code == 2
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "runs.json").exists()


@pytest.mark.slow
def test_comparison_resumes_finished_and_interrupted_runs(tmp_path):
    argv = ["--quick", "--methods", "fedavg,fedilora", "--data", str(ROOT / "configs/datasets/hard.yaml"), "--",
            "--data.dataset.init_args.num_train", "600", "--data.dataset.init_args.num_test", "100"]  # fmt: skip
    fresh = tmp_path / "fresh"  # fedilora uninterrupted, for reference
    compare.compare(*_parsed([*argv[:2], "fedilora", *argv[3:]], fresh), log=lambda _: None)

    out = tmp_path / "resumed"
    args, overrides = _parsed(argv, out)
    # fedavg finished before (an entry in runs.json), fedilora interrupted after its first round (a checkpoint)
    store = compare.Store(out, {"data": args.data, "model": None, "rounds": None, "eval_every": 1,
                                "overrides": overrides})  # fmt: skip
    store.add("runs", {**_run("fedavg", 0, _history(2, 0.3), []), "marker": "kept"})
    root = out / "runs" / "fedilora" / "seed0"
    main([*compare.fit_args("fedilora", 0, root, store.state["settings"]), "--trainer.rounds", "1"])
    logged = []
    compare.compare(args, overrides, log=logged.append)
    assert logged[0] == "[2/2] fedilora/seed0 (resuming)" and len(logged) == 2  # fedavg skipped
    saved = json.loads((out / "runs.json").read_text())
    assert [r["key"] for r in saved["runs"]] == ["fedavg/seed0", "fedilora/seed0"]
    assert saved["runs"][0]["marker"] == "kept"
    got, want = saved["runs"][1], json.loads((fresh / "runs.json").read_text())["runs"][0]
    assert [h["round"] for h in got["history"]] == [0.0, 1.0]
    # resuming is bitwise: the same history (metrics, bytes, edits) as the uninterrupted run, times aside
    untimed = lambda history: [{k: v for k, v in h.items() if "time" not in k} for h in history]  # noqa: E731
    assert untimed(got["history"]) == untimed(want["history"])
    assert got["edits"] == want["edits"] and got["edits"] is not None
    logged.clear()
    compare.compare(args, overrides, log=logged.append)  # everything done: nothing runs
    assert not any(line.startswith("[") for line in logged)


def _parsed(argv: list[str], out: Path):
    return compare.parse_args([*argv[: argv.index("--")], "--out", str(out), *argv[argv.index("--") :]])


@pytest.mark.slow
def test_quick_comparison_writes_table_and_plots(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "compare.py"), "--quick", "--out", str(tmp_path)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    with (tmp_path / "table.csv").open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0][:6] == ["method", "global complete, round 1", "global complete", "global image only",
                           "global text only", "personalized"]  # fmt: skip
    assert [r[0] for r in rows[1:]] == ["fedilora", "hetlora"]
    for row in rows[1:]:
        # accuracies, and bytes were communicated
        assert 0.0 <= float(row[1]) <= 1.0 and 0.0 <= float(row[2]) <= 1.0 and float(row[-1]) > 0
    assert " / " in rows[1][6]  # fedilora's edits are counted (ModelEditing is on)
    assert rows[2][6] == "off"  # hetlora has no editing
    assert "| fedilora |" in (tmp_path / "table.md").read_text()
    for plot in ("accuracy_per_round.png", "communication_per_round.png", "accuracy_vs_missing_rate.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_methods_are_required_unless_quick_or_tabulate(tmp_path, capsys):
    # no silent default of every config: 17 methods x 3 seeds would start 51 runs
    for argv, expected in [([], "--methods is required"), (["--method", "fedavg"], "(did you mean --methods?)")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["compare", *argv, "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and expected in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())
    assert compare.parse_args(["--quick"])[0].methods == ["fedilora", "hetlora"]
    assert compare.parse_args([], methods=compare.METHODS)[0].methods == compare.METHODS  # experiments/compare.py
