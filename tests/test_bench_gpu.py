"""experiments/bench_gpu.py: it refuses without a GPU, and ``--quick`` runs its code path on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture
def bench_gpu(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))  # the scripts import their siblings (_bench, bench_overhead)
    import _bench
    import bench_gpu

    monkeypatch.setattr(_bench, "RESULTS", tmp_path)  # the results file goes to tmp_path, not the checkout
    return bench_gpu


def test_without_a_gpu_it_refuses_unless_quick(bench_gpu, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        bench_gpu.main([])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU here" in err and "--quick" in err and err.count("\n") == 1 and err.endswith("\n")


@pytest.mark.slow
def test_quick_runs_both_loops_for_the_same_steps(bench_gpu, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU path, also on a GPU machine
    bench_gpu.main(["--quick", "--json"])
    out = capsys.readouterr().out
    printed = json.loads(out.strip().splitlines()[-1])
    written = json.loads(next(tmp_path.glob("bench_gpu_quick*.json")).read_text())
    assert printed["ratio"] == written["ratio"] and written["machine"]["cpu_count"] >= 1
    cfg = printed["config"]
    assert cfg["ranks"] == [32, 32, 16, 16, 8, 8, 4, 4, 4, 4] and cfg["precision"] == "32-true"
    expected = cfg["rounds"] * cfg["per_round"] * cfg["steps"]  # 1 round x 10 clients x 2 steps
    assert printed["steps"] == {"federated": expected, "plain": expected} and expected == 20
    assert printed["samples"]["federated"] == printed["samples"]["plain"] == expected * cfg["batch_size"]
    for side in ("federated", "plain"):
        assert printed["samples_per_s"][side] > 0
        assert printed["samples_per_s"][side] == pytest.approx(printed["samples"][side] / printed["median_s"][side])
        assert printed["peak_gpu_memory_gib"][side] is None  # no GPU memory on the CPU path
    assert printed["ratio"] == pytest.approx(printed["median_s"]["federated"] / printed["median_s"]["plain"])
    assert "| (a) FederatedTrainer.fit  |    20 |     160 |" in out and "overhead (a)/(b) = " in out
