"""A trainer's run state: what a checkpoint holds to continue a run, saving it, restoring it, and Ctrl-C's save.

The file format and its checks are ``fedilora.checkpoint``; this is the glue between them and a
``FederatedTrainer`` (its server, model, history and random generators).
"""

from __future__ import annotations

import random
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedilora.checkpoint import Stopped, check_resumable, checkpoint_path, find_last, load_checkpoint
from fedilora.model import LoRACLIPClassifier
from fedilora.personal import Snapshot

if TYPE_CHECKING:
    from fedilora.trainer import FederatedTrainer


def run_state(trainer: FederatedTrainer, model: LoRACLIPClassifier, completed_rounds: int) -> dict:
    """Everything needed to continue after ``completed_rounds`` rounds (references, not copies:
    the round loop replaces these tensors rather than changing them in place)."""
    return {
        "completed_rounds": completed_rounds,
        **trainer.server.state_dict(),
        "base_weights": {m: model.base_weight(m).detach().clone() for m in trainer.server.merged_modules()},
        "history": list(trainer.history),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "fingerprint": trainer._fingerprint,
        "config": trainer.config_yaml or "",
    }


def save_run_state(trainer: FederatedTrainer, state: dict) -> Path:
    """Personalized states in RAM go into the checkpoint; spilled ones by file name (see ``fedilora.personal``)."""
    snapshot: Snapshot = state["personal"]
    folder = checkpoint_path(trainer.log_dir, state["completed_rounds"]).parent
    path = trainer.output.save_checkpoint(trainer.fabric, {**state, "personal": snapshot.to_checkpoint(folder)},
                                          trainer.keep_last)  # fmt: skip
    trainer.server.personal.pin(str(path), snapshot)
    return path


def restore_run_state(trainer: FederatedTrainer, model: LoRACLIPClassifier, ckpt_path: str) -> int:
    """Load ``ckpt_path`` (or ``last``) into the trainer and model; returns the rounds it had completed."""
    path = find_last(trainer.root_dir, trainer.name) if ckpt_path == "last" else Path(ckpt_path)
    state = load_checkpoint(trainer.fabric, path)
    check_resumable(path, state, trainer._fingerprint, trainer.rounds)
    trainer.server.load_state_dict(state, trainer.fabric.device, path.parent)
    model.load_base_weights(state["base_weights"])
    trainer.history = list(state["history"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    trainer.fabric.print(f"resumed from {path} after {state['completed_rounds']} round(s)")
    return state["completed_rounds"]


def stop_with_checkpoint(trainer: FederatedTrainer) -> None:
    """Ctrl-C: keep the last completed round and say how to go on."""
    if trainer._snapshot is None:
        trainer.fabric.print("interrupted before the first round completed; nothing to save")
        raise Stopped(trainer._interrupted or signal.SIGINT)
    path = trainer.save_checkpoint(trainer._snapshot)
    trainer.fabric.print(
        f"interrupted: saved round {trainer._snapshot['completed_rounds']} to {path}\n"
        f"resume with the same command plus --ckpt_path {path} (or --ckpt_path last)"
    )
    raise Stopped(trainer._interrupted or signal.SIGINT)
