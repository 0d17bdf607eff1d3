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
from fedilora.checkpoint import digest, find_last, load_checkpoint
from fedilora.editing import ModelEditing
from fedilora.errors import ConfigError
from fedilora.model import LoRACLIPClassifier
from fedilora.trainer import FederatedTrainer
from helpers import tiny_datamodule

ROOT = Path(__file__).resolve().parents[1]


class Crash(FederatedCallback):
    """A power cut at the start of round ``at_round``. It is set after construction, as no option of the run:
    a resume with ``Crash()`` has the same configuration (callbacks are part of a checkpoint's fingerprint)."""

    at_round = None

    def on_round_start(self, trainer, round):
        if round == self.at_round:
            raise RuntimeError("power cut")


def crash(at_round):
    callback = Crash()
    callback.at_round = at_round
    return callback


def _trainer(root, callbacks=(), aggregator=None, ranks=(4, 2, 2), **kwargs):
    options = {"rounds": 4, "clients_per_round": 2, "max_local_steps": 2, "checkpoint_every": 1, "keep_last": 10,
               "progress": False, **kwargs}  # fmt: skip
    if aggregator is not None:
        options["aggregator"] = aggregator
    return FederatedTrainer(ranks=list(ranks), callbacks=[ModelEditing(), *callbacks], root_dir=str(root), **options)


def _history(trainer):
    return [{k: v for k, v in h.items() if k != "round/time_s"} for h in trainer.history]


@pytest.mark.parametrize("aggregator", [None, FLoRA], ids=["fedilora", "flora"])
def test_resume_equals_uninterrupted_run(tmp_path, aggregator):
    make = (lambda: aggregator()) if aggregator else (lambda: None)
    full = _trainer(tmp_path / "full", aggregator=make())
    full.fit(LoRACLIPClassifier(num_classes=12), tiny_datamodule(num_clients=3))

    broken = _trainer(tmp_path / "broken", callbacks=[crash(at_round=2)], aggregator=make())
    with pytest.raises(RuntimeError, match="power cut"):
        broken.fit(LoRACLIPClassifier(num_classes=12), tiny_datamodule(num_clients=3))
    checkpoint = broken.log_dir / "checkpoints" / "round-0002.ckpt"
    assert checkpoint.is_file()

    resumed = _trainer(tmp_path / "broken", callbacks=[Crash()], aggregator=make())
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
    assert state["fingerprint"]["config"]["trainer.ranks"] == [4, 2, 2]
    assert state["fingerprint"]["config"]["trainer.seed"] == 0 and state["fingerprint"]["data"] is not None
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


def _resume(root, model=None, datamodule=None, **kwargs):
    trainer = _trainer(root, **kwargs)
    trainer.fit(model or LoRACLIPClassifier(num_classes=12), datamodule or tiny_datamodule(num_clients=3),
                ckpt_path="last")  # fmt: skip
    return trainer


def test_checkpoint_from_a_different_config_is_refused_naming_the_key(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.fit(LoRACLIPClassifier(num_classes=12), tiny_datamodule(num_clients=3))
    refused = [
        ({"ranks": (4, 4, 2)}, r"trainer\.ranks: checkpoint \[4, 2, 2\], config \[4, 4, 2\]"),
        ({"seed": 1}, r"trainer\.seed: checkpoint 0, config 1"),
        ({"max_local_steps": 3}, r"trainer\.max_local_steps: checkpoint 2, config 3"),
        ({"precision": "bf16-true"}, r"trainer\.precision: checkpoint \"32-true\", config \"bf16-true\""),
        ({"model": LoRACLIPClassifier(num_classes=12, lora_targets=["c_fc"])}, r"model\.lora_targets: checkpoint"),
        ({"model": LoRACLIPClassifier(num_classes=12, lr=0.01)}, r"model\.lr: checkpoint 0\.001, config 0\.01"),
        ({"datamodule": tiny_datamodule(num_clients=3, missing_rate=0.5)}, r"data: the samples, labels, texts"),
        ({"datamodule": tiny_datamodule(num_clients=3, num_train=300)}, r"data\.dataset\.init_args\.num_train: "
                                                                        r"checkpoint 400, config 300"),
        ({"datamodule": tiny_datamodule(num_clients=3, batch_size=16)}, r"data\.batch_size: checkpoint 32, config 16"),
    ]  # fmt: skip
    for change, message in refused:
        with pytest.raises(ConfigError, match=r"round-0004\.ckpt was written by a different configuration \(" +
                           message):  # fmt: skip
            _resume(tmp_path, **change)
    with pytest.raises(ConfigError, match=r"trainer\.rounds: 3 is fewer than the 4 rounds .*round-0004\.ckpt has "
                                          r"completed"):  # fmt: skip
        _resume(tmp_path, rounds=3)
    assert not (tmp_path / "fedilora" / "version_1").exists()  # every refused resume wrote nothing
    # how often to evaluate, checkpoint and show progress may change: the run resumes
    resumed = _resume(tmp_path, keep_last=1, checkpoint_every=3, eval_every=4, progress=True)
    assert resumed.history == trainer.history and resumed.log_dir.name == "version_1"


def test_last_is_the_newest_checkpoint_of_the_most_recent_run(tmp_path):
    # version_0: a finished seed-0 run; version_1: a seed-1 run stopped after round 2
    _trainer(tmp_path).fit(LoRACLIPClassifier(num_classes=12), tiny_datamodule(num_clients=3))
    broken = _trainer(tmp_path, seed=1, callbacks=[crash(at_round=2)])
    with pytest.raises(RuntimeError, match="power cut"):
        broken.fit(LoRACLIPClassifier(num_classes=12), tiny_datamodule(num_clients=3))
    assert find_last(tmp_path, "fedilora") == broken.log_dir / "checkpoints" / "round-0002.ckpt"
    # resuming seed 0 must not silently continue version_0's finished run: `last` is seed 1's
    with pytest.raises(ConfigError, match=r"version_1/checkpoints/round-0002\.ckpt was written by a different "
                                          r"configuration \(trainer\.seed: checkpoint 1, config 0\)"):  # fmt: skip
        _resume(tmp_path, callbacks=[Crash()])
    with pytest.raises(ConfigError, match=r"\(trainer\.callbacks\[1\]: checkpoint \{\"class_path\": \"Crash\", "
                                          r"\"init_args\": \{\}\}, config \(none\)\)"):  # fmt: skip
        _resume(tmp_path, seed=1)
    resumed = _resume(tmp_path, seed=1, callbacks=[Crash()])
    assert [h["round"] for h in resumed.history] == [0, 1, 2, 3]
    assert resumed.log_dir.name == "version_2"
    assert sorted(p.name for p in (resumed.log_dir / "checkpoints").glob("*.ckpt")) == ["round-0003.ckpt",
                                                                                      "round-0004.ckpt"]  # fmt: skip
    # a newer run that crashed before its first checkpoint: `last` is still the newest checkpoint there is
    (tmp_path / "fedilora" / "version_3" / "checkpoints").mkdir(parents=True)
    assert find_last(tmp_path, "fedilora") == resumed.log_dir / "checkpoints" / "round-0004.ckpt"


def _rewrite(path, change):
    """Change a checkpoint's content and store a matching digest, as a careful forger would."""
    content = torch.load(path, weights_only=True)
    content.pop("digest")
    change(content)
    content["digest"] = digest(content)
    torch.save(content, path)


def test_a_checkpoint_of_an_earlier_fedilora_is_refused_clearly(tmp_path):
    trainer = FederatedTrainer(rounds=1, clients_per_round=1, ranks=2, max_local_steps=1, root_dir=str(tmp_path),
                               progress=False)  # fmt: skip
    trainer.fit(LoRACLIPClassifier(num_classes=12), tiny_datamodule(num_clients=2, num_train=100, num_test=24))
    path = trainer.log_dir / "checkpoints" / "round-0001.ckpt"

    def to_v1(content):  # what fedilora wrote before the fingerprint covered the whole config
        content["format"] = "fedilora-checkpoint-v1"
        content["fingerprint"] = {"ranks": [2, 2], "global_lora_rank": 2, "num_clients": 2}

    _rewrite(path, to_v1)
    with pytest.raises(ConfigError, match=r"round-0001\.ckpt was written by an earlier fedilora "
                                          r"\(fedilora-checkpoint-v1\).*start a new run"):  # fmt: skip
        load_checkpoint(trainer.fabric, path)


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
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_saves_the_last_completed_round_and_says_how_to_resume(tmp_path, signum, status):
    # SIGTERM is what schedulers and `docker stop` send: treated like Ctrl-C, exit status 128 + 15
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(_cli(tmp_path, "--trainer.rounds", "50"), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait_for(tmp_path / "demo" / "version_0" / "checkpoints" / "round-0001.ckpt", process)
    process.send_signal(signum)
    out, err = process.communicate(timeout=300)
    assert process.returncode == status, err[-2000:]
    assert "interrupted: saved round" in out and "--ckpt_path" in out
    assert f"fedilora: interrupted ({signal.Signals(signum).name})" in err
    assert "Traceback" not in err
    saved = int(out.split("interrupted: saved round ")[1].split()[0])
    assert saved >= 1
    assert (tmp_path / "demo" / "version_0" / "checkpoints" / f"round-{saved:04d}.ckpt").is_file()


class ReadOnlyFolder:
    """What the kernel does to a process without write permission on ``folder`` (the tests run as root,
    for whom chmod changes nothing): creating, renaming into or deleting files there fails with EACCES,
    a rename of a file that does not exist with ENOENT."""

    def __init__(self, monkeypatch, folder):
        self.folder = Path(folder).resolve()
        real_open, real_replace, real_rename = open, os.replace, os.rename

        def inside(path):
            return Path(os.fsdecode(path)).resolve().parent == self.folder

        def refuse(path):
            raise PermissionError(13, "Permission denied", os.fsdecode(path))

        def guarded_open(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+") and inside(file):
                refuse(file)
            return real_open(file, mode, *args, **kwargs)

        def guarded_move(real):
            def move(src, dst, *args, **kwargs):
                if inside(src) or inside(dst):
                    if not os.path.exists(src):
                        raise FileNotFoundError(2, "No such file or directory", os.fsdecode(src))
                    refuse(dst)
                return real(src, dst, *args, **kwargs)

            return move

        monkeypatch.setattr("builtins.open", guarded_open)
        monkeypatch.setattr(os, "replace", guarded_move(real_replace))
        monkeypatch.setattr(os, "rename", guarded_move(real_rename))


class MakeReadOnly(FederatedCallback):
    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch

    def on_round_end(self, trainer, round, metrics):
        if round == 1:  # after round 1's checkpoint, before round 2's: the folder stops being writable mid-run
            ReadOnlyFolder(self.monkeypatch, trainer.log_dir / "checkpoints")


def test_an_unwritable_checkpoint_folder_mid_run_names_the_real_cause(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, callbacks=[MakeReadOnly(monkeypatch)])
    with pytest.raises(ConfigError) as error:
        trainer.fit(LoRACLIPClassifier(num_classes=12), tiny_datamodule(num_clients=3))
    message = str(error.value)
    assert "cannot write checkpoint" in message and "round-0002.ckpt" in message
    assert "Permission denied" in message and "No such file" not in message
    monkeypatch.undo()
    assert [p.name for p in (trainer.log_dir / "checkpoints").iterdir()] == ["round-0001.ckpt"]


_KILLED_WHILE_WRITING = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from helpers import tiny_datamodule
from fedilora.model import LoRACLIPClassifier
from fedilora.trainer import FederatedTrainer

def killed_at_the_rename(real):  # SIGKILL while a checkpoint is moved into the run folder
    def move(src, dst, *args, **kwargs):
        if "checkpoints" in os.fsdecode(dst):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst, *args, **kwargs)
    return move

os.replace, os.rename = killed_at_the_rename(os.replace), killed_at_the_rename(os.rename)
trainer = FederatedTrainer(rounds=1, clients_per_round=1, ranks=2, max_local_steps=1, root_dir={root!r}, progress=False)
trainer.fit(LoRACLIPClassifier(num_classes=12), tiny_datamodule(num_clients=2, num_train=100, num_test=24))
"""


def test_a_kill_during_a_checkpoint_write_leaves_nothing_the_next_start_does_not_remove(tmp_path):
    temp_dir, root = tmp_path / "tmpdir", tmp_path / "runs"
    temp_dir.mkdir()
    script = _KILLED_WHILE_WRITING.format(tests=str(ROOT / "tests"), root=str(root))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(temp_dir)}
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    staged = [p for p in temp_dir.rglob("*") if p.is_file() and "fedilora-open-clip-configs" not in str(p)]
    assert staged == []  # nothing staged under $TMPDIR (fedilora's model configs are all there is)
    folder = root / "fedilora" / "version_0" / "checkpoints"
    (stale,) = folder.iterdir()  # the temporary file, beside its target, never under the real name
    assert stale.name.startswith(".round-0001.ckpt.") and stale.name.endswith(".tmp")
    in_progress = folder / f".round-0002.ckpt.{os.getpid()}.tmp"  # a live process's write is left alone
    in_progress.write_bytes(b"")

    trainer = FederatedTrainer(rounds=1, clients_per_round=1, ranks=2, max_local_steps=1, root_dir=str(root),
                               progress=False)  # fmt: skip
    trainer.fit(LoRACLIPClassifier(num_classes=12), tiny_datamodule(num_clients=2, num_train=100, num_test=24))
    assert not stale.exists() and in_progress.exists()
    assert [p.name for p in (trainer.log_dir / "checkpoints").iterdir()] == ["round-0001.ckpt"]
