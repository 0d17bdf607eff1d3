"""What a run shows while and after it trains: TensorBoard steps, the HParams view, the progress bar."""

from __future__ import annotations

import io
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from fedilora.model import LoRACLIPClassifier
from fedilora.trainer import FederatedTrainer
from helpers import tiny_datamodule


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two rounds of 2 clients, evaluated after each, with the progress bar on; its stderr is kept."""
    root = tmp_path_factory.mktemp("runs")
    trainer = FederatedTrainer(rounds=2, clients_per_round=2, ranks=[4, 2], max_local_steps=2, eval_every=1,
                               root_dir=str(root), progress=True)  # fmt: skip
    capture, err = pytest.MonkeyPatch(), io.StringIO()  # capsys is per test; this fixture is per module
    capture.setattr(sys, "stderr", err)
    try:
        trainer.fit(LoRACLIPClassifier(num_classes=12), tiny_datamodule(num_clients=2))
    finally:
        capture.undo()
    return trainer, EventAccumulator(str(trainer.log_dir)).Reload(), err.getvalue()


def test_tensorboard_steps_are_round_numbers(run):
    trainer, events, _ = run
    assert [h["round"] for h in trainer.history] == [0, 1]  # the engine's round index counts from 0
    for tag in ("train/loss", "global/complete/acc", "comm/bytes_uploaded"):
        assert [e.step for e in events.Scalars(tag)][:2] == [1, 2], tag  # round 1 and round 2
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([h["train/loss"] for h in trainer.history])
    checkpoint = sorted((trainer.log_dir / "checkpoints").glob("round-*.ckpt"))[-1]
    assert checkpoint.name == "round-0002.ckpt"  # the same number as the last step


def test_hparams_hold_the_config_and_the_final_metrics(run):
    trainer, events, _ = run
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["trainer/rounds"].number_value == 2 and hparams["trainer/ranks"].string_value == "[4, 2]"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert {"global/complete/acc", "global/text_only/acc", "personalized/mean/acc"} <= metrics
    assert not any(m.startswith(("train/", "comm/")) for m in metrics)  # final evaluation only
    last = trainer.history[-1]
    for tag in metrics:  # the view reads each metric's value at the run's last step
        final = events.Scalars(tag)[-1]
        assert final.step == 2 and final.value == pytest.approx(last[tag])


def test_the_progress_bar_shows_the_training_loss(run):
    trainer, _, err = run
    for round_, entry in enumerate(trainer.history, start=1):
        assert f"train loss {entry['train/loss']:.4g} (round {round_})" in err
