"""What a run shows while and after it trains: TensorBoard steps, the HParams view, the progress bar."""

from __future__ import annotations

import io
import sys

import pytest
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from fedilora.cli import main
from fedilora.data import FederatedDataModule, MultimodalTable
from fedilora.model import LoRACLIPClassifier
from fedilora.output import majority_warning
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


# ------------------------------------------------------------------------- own data: classes, majority
def _write_table(folder, name: str, labels: list[str]) -> str:
    """A CSV of coloured 8 px squares, one per label, with texts naming the colour."""
    colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220)}
    (folder / "images").mkdir(exist_ok=True)
    lines = ["image,text,label"]
    for k, label in enumerate(labels):
        path = f"images/{name}_{k}.png"
        Image.new("RGB", (8, 8), colours[label]).save(folder / path)
        lines.append(f"{path},a {label} square number {k},{label}")
    (folder / f"{name}.csv").write_text("\n".join(lines) + "\n")
    return str(folder / f"{name}.csv")


def test_class_counts_majority_and_summary(tmp_path):
    train = _write_table(tmp_path, "train", ["red"] * 5 + ["green"] * 3 + ["blue"] * 2)
    test = _write_table(tmp_path, "test", ["blue"] * 4 + ["red"])
    data = FederatedDataModule(dataset=MultimodalTable(train, test_path=test, image_size=8), num_clients=2)
    data.setup("fit")
    assert data.class_names() == ["blue", "green", "red"]  # sorted distinct labels
    assert data.class_counts["train"].tolist() == [2, 3, 5] and data.class_counts["test"].tolist() == [4, 0, 1]
    assert data.majority() == ("blue", 0.8)
    assert data.class_summary() == ("classes (training pool 10 / global test 5 samples): red 5/1, green 3/0, "
                                    "blue 2/4; majority class 'blue': 80.0% of the global test set")  # fmt: skip
    assert data.class_summary(with_train=False, shown=2) == (
        "classes (global test, 5 samples): red 1, green 0, ... (1 more); majority class 'blue': 80.0% of the "
        "global test set"
    )


def test_majority_warning_flags_what_a_constant_predictor_would_score():
    results = {"global": {"complete": {"acc": 0.52, "f1_macro": 0.34}, "image_only": {"acc": 0.71}}}
    warning = majority_warning(results, ("cat", 0.52))  # 0.52: exactly predicting "cat" for everything
    assert warning is not None and "(complete 0.5200) is not above 0.5200" in warning and "image only" not in warning
    assert "'cat'" in warning
    results["global"]["complete"]["acc"] = 0.53
    assert majority_warning(results, ("cat", 0.52)) is None
    assert majority_warning(results, None) is None  # multi-label: no majority share


def test_own_data_config_runs_and_prints_classes_and_the_warning(tmp_path, capsys):
    # configs/own_data.yaml as the README runs it, on a tiny CSV; the global test set is all "blue", so
    # the majority share is 1.0 and no model can score above it: the warning must be printed
    train = _write_table(tmp_path, "train", ["red", "green", "blue"] * 10)
    test = _write_table(tmp_path, "test", ["blue"] * 6)
    main(["fit", "--config", "configs/own_data.yaml", "--data.dataset.init_args.path", train,
          "--data.dataset.init_args.test_path", test, "--trainer.rounds", "2", "--trainer.root_dir", str(tmp_path),
          "--trainer.progress", "false"])  # fmt: skip
    out = capsys.readouterr().out
    assert "classes (training pool 30 / global test 6 samples): blue 10/6, green 10/0, red 10/0; majority class " \
           "'blue': 100.0% of the global test set" in out
    assert "is not above 1.0000, the share of the majority class 'blue'" in out
    config = yaml.safe_load((tmp_path / "own_data" / "version_0" / "config.yaml").read_text())
    assert config["model"]["model_name"] == "fedilora-tiny" and config["trainer"]["aggregator"]["class_path"] \
        == "fedilora.algorithms.DimensionWiseDelta"  # the default method (configs/fedilora.yaml) and the tiny model


def test_the_progress_bar_shows_the_steps_loss_except_under_dp(monkeypatch):
    import torch

    from fedilora.progress import RoundBar

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    bar = RoundBar(rounds=3, initial=0, enabled=True)
    bar.show(0, 5, 4, 2, 10, torch.tensor(1.23456))
    assert bar._bar.postfix == "round 1/3 client 5 (r=4) step 2/10 loss 1.235"
    bar._last_refresh = 0.0
    bar.show(0, 5, 4, 3, 10, None)  # what the trainer passes under DP: no single client's figure
    assert bar._bar.postfix == "round 1/3 client 5 (r=4) step 3/10"
    bar.show(0, 5, 4, 4, 10, torch.tensor(9.0))  # within 0.5 s of the last redraw: not read, not drawn
    assert bar._bar.postfix == "round 1/3 client 5 (r=4) step 3/10"
    bar.close()
