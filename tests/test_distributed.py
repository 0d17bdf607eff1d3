"""Several processes give the single-process run: two CPU processes on one node (Fabric's ``ddp``
launcher), and two nodes launched by hand on this machine (node ranks 0 and 1, master at 127.0.0.1),
as a cluster's launcher starts them."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedilora.errors import ConfigError
from fedilora.model import LoRACLIPClassifier
from fedilora.trainer import FederatedTrainer
from helpers import tiny_datamodule

FIT = Path(__file__).with_name("ddp_run.py")
EVALUATE = Path(__file__).with_name("ddp_eval.py")
TASKS = ("multiclass", "binary", "multilabel")


def _run(script: Path, devices: int, out: Path, **extra_env: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **extra_env}
    done = subprocess.run([sys.executable, str(script), str(devices), str(out)], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_nodes(script: Path, nodes: int, out: Path) -> None:
    """``nodes`` launches of ``script`` with one device each, as on ``nodes`` machines: Fabric reads the
    node rank and the master's address and port from the environment and makes the process group."""
    out.mkdir(parents=True)
    port, procs = _free_port(), []
    try:
        for node in range(nodes):
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "NODE_RANK": str(node)}  # fmt: skip
            log = (out / f"node{node}.log").open("w")
            procs.append(subprocess.Popen([sys.executable, str(script), "1", str(out), str(nodes)], env=env,
                                          stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
        for proc in procs:
            proc.wait(timeout=600)
        for node, proc in enumerate(procs):
            assert proc.returncode == 0, (out / f"node{node}.log").read_text()[-3000:]
    finally:  # a node that failed leaves the other waiting for it: stop what was started here
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# ------------------------------------------------------------------------------------ a whole fit
def _fit_results(out: Path, processes: int) -> tuple[dict, list, list[int]]:
    assert (out / "world_size.txt").read_text() == str(processes)
    # what decides float32 rounding is pinned: every process trained with one thread (see ddp_run.py)
    assert [(out / f"threads_rank{r}.txt").read_text() for r in range(processes)] == ["1"] * processes
    evaluated = [int((out / f"evaluated_rank{r}.txt").read_text()) for r in range(processes)]
    return load_file(str(out / "state.safetensors")), json.loads((out / "history.json").read_text()), evaluated


@pytest.fixture(scope="module")
def single_fit(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    _run(FIT, 1, out)
    return _fit_results(out, 1)


def _assert_same_run(single, several) -> None:
    (single_state, single_history, (single_evaluated,)), (state, history, evaluated) = single, several
    assert single_state.keys() == state.keys()
    assert any(k.startswith("client") for k in single_state)  # personalized models came back from every process
    # bitwise: the same clients train with the same seeds and one thread per process, and every process
    # aggregates the gathered updates in plan order, so no float32 rounding may differ
    for key, value in single_state.items():
        assert torch.equal(state[key], value), key
    assert len(single_history) == len(history) == 2
    assert [h["round/rejected_updates"] for h in history] == [1.0, 1.0]  # the sabotaged clients 1 and 2
    assert not any(k.startswith("client2.") for k in state)  # its only update was rejected
    assert all(torch.isfinite(v).all() for v in state.values())
    for one, many in zip(single_history, history, strict=True):
        assert one.keys() == many.keys()
        for key, value in one.items():
            assert many[key] == value, key
    # the evaluations were shared, not repeated: every process evaluated a part, together everything once
    assert all(0 < e < single_evaluated for e in evaluated) and sum(evaluated) == single_evaluated


@pytest.mark.slow
def test_two_cpu_processes_give_the_single_process_result(single_fit, tmp_path):
    _run(FIT, 2, tmp_path)
    _assert_same_run(single_fit, _fit_results(tmp_path, 2))


@pytest.mark.slow
def test_under_dp_every_process_releases_the_same_noised_model(tmp_path):
    # the noise is secure (not derived from the seed), so the processes must share one source to agree
    _run(FIT, 2, tmp_path, DP="1")
    digests = [(tmp_path / f"global_rank{r}.sha256").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
    _run(FIT, 1, tmp_path / "again", DP="1")  # and it is not the seed's: another run, another model
    assert (tmp_path / "again" / "global_rank0.sha256").read_text() != digests[0]


@pytest.mark.slow
def test_two_nodes_give_the_single_process_result(single_fit, tmp_path):
    _run_nodes(FIT, 2, tmp_path / "nodes")
    _assert_same_run(single_fit, _fit_results(tmp_path / "nodes", 2))


# -------------------------------------------------------------------------------- the evaluation
@pytest.mark.slow
def test_shared_evaluation_gives_exactly_the_single_process_figures(tmp_path):
    _run(EVALUATE, 1, tmp_path / "one")
    _run(EVALUATE, 2, tmp_path / "two")
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for task in TASKS:
        single, shares = one[task], [r[task] for r in ranks]
        # exact: each sample counted once, in the batch it has in one process (AUROC and samples F1 included)
        for share in shares:
            assert share["metrics"] == single["metrics"], task
        assert single["metrics"]["personalized/num_clients"] == 5.0
        # the global test set (150 samples = 5 batches of 32, under 4 modality conditions) was split at a
        # batch boundary, 2 batches and 3; the clients round-robin, as training splits a round's plan
        assert single["global_samples"] == 4 * 150
        assert [s["global_samples"] for s in shares] == [4 * 64, 4 * 86]
        assert single["clients"] == [0, 1, 2, 3, 4]
        assert [s["clients"] for s in shares] == [[0, 2, 4], [1, 3]]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["global", "personal"])
def test_a_data_error_in_one_process_evaluation_stops_every_process_with_it(where, tmp_path):
    # process 1 alone meets the bad file (its shard, or its clients); process 0 must not wait for it in
    # a collective, and stops with the same one-line error
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BREAK": where}
    done = subprocess.run([sys.executable, str(EVALUATE), "2", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode != 0
    for rank in (0, 1):
        error = (tmp_path / f"error_rank{rank}.txt").read_text()
        assert error.endswith("broken.png, line 1: not an image (process 1)"), (rank, error)
    assert (tmp_path / "error_rank1.txt").read_text().startswith("DataError: ")
    assert not list(tmp_path.glob("rank*.json"))


# ---------------------------------------------------------------------------- a launcher's settings
def test_torchrun_world_size_that_disagrees_with_devices_and_num_nodes_is_one_config_error(monkeypatch, tmp_path):
    # what torchrun sets for the first of 3 processes; the config asks for 2 nodes x 1 device
    torchrun = {"TORCHELASTIC_RUN_ID": "test", "WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}  # fmt: skip
    for name, value in torchrun.items():
        monkeypatch.setenv(name, value)
    trainer = FederatedTrainer(devices=1, num_nodes=2, strategy="ddp", root_dir=str(tmp_path), progress=False)
    expected = r"^trainer.devices/num_nodes .*\(1 \* 2\) does not match the world size \(3\)"
    with pytest.raises(ConfigError, match=expected):
        trainer.fit(LoRACLIPClassifier(num_classes=12), tiny_datamodule())
