import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("ddp_run.py")


def _run(devices: int, out: Path) -> tuple[dict, list]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), str(devices), str(out)], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "world_size.txt").read_text() == str(devices)
    return load_file(str(out / "state.safetensors")), json.loads((out / "history.json").read_text())


@pytest.mark.slow
def test_two_cpu_processes_give_the_single_process_result(tmp_path):
    single_state, single_history = _run(1, tmp_path / "one")
    ddp_state, ddp_history = _run(2, tmp_path / "two")
    assert single_state.keys() == ddp_state.keys()
    assert any(k.startswith("client") for k in single_state)  # personalized models came back from both processes
    for key, value in single_state.items():
        torch.testing.assert_close(ddp_state[key], value, rtol=1e-5, atol=1e-6)
    assert len(single_history) == len(ddp_history) == 2
    assert [h["round/rejected_updates"] for h in ddp_history] == [1.0, 1.0]  # the sabotaged clients 1 and 2
    assert not any(k.startswith("client2.") for k in ddp_state)  # its only update was rejected
    assert all(torch.isfinite(v).all() for v in ddp_state.values())
    for single, ddp in zip(single_history, ddp_history, strict=True):
        assert single.keys() == ddp.keys()
        for key, value in single.items():
            assert ddp[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
