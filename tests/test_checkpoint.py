"""Checkpoints: exact resume, interrupted runs, damaged files, mismatched configs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedilora.baselines import FLoRA
from fedilora.callbacks import FederatedCallback
from fedilora.checkpoint import load_checkpoint
from fedilora.editing import ModelEditing
from fedilora.errors import ConfigError
from fedilora.model import LoRACLIPClassifier
from fedilora.trainer import FederatedTrainer
from helpers import tiny_datamodule

ROOT = Path(__file__).resolve().parents[1]


class Crash(FederatedCallback):
    def __init__(self, at_round):
        self.at_round = at_round

    def on_round_start(self, trainer, round):
        if round == self.at_round:
            raise RuntimeError("power cut")


def _trainer(root, callbacks=(), aggregator=None, ranks=(4, 2, 2), keep_last=10, **kwargs):
    extra = {"aggregator": aggregator} if aggregator is not None else {}
    return FederatedTrainer(rounds=4, clients_per_round=2, ranks=list(ranks), max_local_steps=2, checkpoint_every=1,
                            keep_last=keep_last, callbacks=[ModelEditing(), *callbacks], root_dir=str(root),
                            progress=False, **extra, **kwargs)  # fmt: skip


def _history(trainer):
    return [{k: v for k, v in h.items() if k != "round/time_s"} for h in trainer.history]


@pytest.mark.parametrize("aggregator", [None, FLoRA], ids=["fedilora", "flora"])
def test_resume_equals_uninterrupted_run(tmp_path, aggregator):
    make = (lambda: aggregator()) if aggregator else (lambda: None)
    full = _trainer(tmp_path / "full", aggregator=make())
    full.fit(LoRACLIPClassifier(num_classes=12), tiny_datamodule(num_clients=3))

    broken = _trainer(tmp_path / "broken", callbacks=[Crash(at_round=2)], aggregator=make())
    with pytest.raises(RuntimeError, match="power cut"):
        broken.fit(LoRACLIPClassifier(num_classes=12), tiny_datamodule(num_clients=3))
    checkpoint = broken.log_dir / "checkpoints" / "round-0002.ckpt"
    assert checkpoint.is_file()

    resumed = _trainer(tmp_path / "broken", aggregator=make())
    resumed.fit(LoRACLIPClassifier(num_classes=12), tiny_datamodule(num_clients=3), ckpt_path="last")
    for key, value in full.global_lora.items():
        assert torch.equal(resumed.global_lora[key], value), key  # bitwise on CPU
    for key, value in full.global_extra.items():
        assert torch.equal(resumed.global_extra[key], value), key
    assert _history(resumed) == _history(full)


def test_checkpoint_holds_the_run_and_keep_last_prunes(tmp_path):
    trainer = _trainer(tmp_path, keep_last=2)
    trainer.fit(LoRACLIPClassifier(num_classes=12), tiny_datamodule(num_clients=3))
    files = sorted(p.name for p in (trainer.log_dir / "checkpoints").glob("*.ckpt"))
    assert files == ["round-0003.ckpt", "round-0004.ckpt"]
    state = load_checkpoint(trainer.fabric, trainer.log_dir / "checkpoints" / "round-0004.ckpt")
    assert state["completed_rounds"] == 4 and len(state["history"]) == 4
    assert set(state["personal"]) == {str(c) for c in trainer.personal}
    assert state["fingerprint"]["ranks"] == [4, 2, 2]
    assert not list((trainer.log_dir / "checkpoints").glob(".*tmp"))  # no temporary file left behind


def test_damaged_checkpoint_is_refused_and_the_previous_one_still_loads(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.fit(LoRACLIPClassifier(num_classes=12), tiny_datamodule(num_clients=3))
    folder = trainer.log_dir / "checkpoints"
    last, previous = folder / "round-0004.ckpt", folder / "round-0003.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"round-0004\.ckpt is not a readable fedilora checkpoint"):
        load_checkpoint(trainer.fabric, last)
    flipped = bytearray(data)
    index = data.index(b"data/") + 200  # inside the tensor records, past the zip headers
    flipped[index] ^= 0xFF
    last.write_bytes(bytes(flipped))
    with pytest.raises(ConfigError, match=r"round-0004\.ckpt"):
        load_checkpoint(trainer.fabric, last)
    assert load_checkpoint(trainer.fabric, previous)["completed_rounds"] == 3


def test_checkpoint_from_a_different_config_is_refused(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.fit(LoRACLIPClassifier(num_classes=12), tiny_datamodule(num_clients=3))
    other = _trainer(tmp_path, ranks=(4, 4, 2))
    with pytest.raises(ConfigError, match=r"different configuration \(ranks: checkpoint has \[4, 2, 2\]"):
        other.fit(LoRACLIPClassifier(num_classes=12), tiny_datamodule(num_clients=3), ckpt_path="last")
    targets = _trainer(tmp_path)
    with pytest.raises(ConfigError, match="different configuration"):
        targets.fit(
            LoRACLIPClassifier(num_classes=12, lora_targets=["c_fc"]), tiny_datamodule(num_clients=3), ckpt_path="last"
        )


def _cli(root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fedilora.cli", "fit", "--config", str(ROOT / "configs" / "demo.yaml"),
            "--trainer.rounds", "4", "--trainer.max_local_steps", "2", "--trainer.clients_per_round", "2",
            "--trainer.checkpoint_every", "1", "--trainer.keep_last", "10", "--trainer.eval_every", "2",
            "--trainer.progress", "false", "--trainer.root_dir", str(root),
            "--data.dataset.init_args.num_train", "400", "--data.dataset.init_args.num_test", "120",
            *extra]  # fmt: skip


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_result(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(_cli(tmp_path / "full"), env=env, check=True, capture_output=True, timeout=600)
    process = subprocess.Popen(_cli(tmp_path / "killed"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    _wait_for(tmp_path / "killed" / "demo" / "version_0" / "checkpoints" / "round-0002.ckpt", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = subprocess.run(_cli(tmp_path / "killed", "--ckpt_path", "last"), env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout
    full = json.loads((tmp_path / "full" / "demo" / "version_0" / "results.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "demo" / "version_1" / "results.json").read_text())
    assert resumed["global"] == full["global"] and resumed["personalized"] == full["personalized"]


@pytest.mark.slow
def test_ctrl_c_saves_the_last_completed_round_and_says_how_to_resume(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(_cli(tmp_path, "--trainer.rounds", "50"), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait_for(tmp_path / "demo" / "version_0" / "checkpoints" / "round-0001.ckpt", process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, err[-2000:]
    assert "interrupted: saved round" in out and "--ckpt_path" in out
    assert "Traceback" not in err
    saved = int(out.split("interrupted: saved round ")[1].split()[0])
    assert saved >= 1
    assert (tmp_path / "demo" / "version_0" / "checkpoints" / f"round-{saved:04d}.ckpt").is_file()
