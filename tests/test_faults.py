"""A client's failure or poisoned update must not end the federation or reach the global model; a data
error must stop the run; a run that aggregated (almost) nothing must not pass for a success."""

import json
import math
import time

import pytest
import torch
from PIL import Image

from fedilora.aggregation import DimensionWise, sample_weights, weighted_average
from fedilora.callbacks import FederatedCallback
from fedilora.cli import main
from fedilora.data.files import decode_image
from fedilora.data.source import MultimodalData
from fedilora.data.synthetic import SyntheticBenchmark
from fedilora.editing import ModelEditing
from fedilora.errors import ConfigError, RunFailed
from fedilora.model import LoRACLIPClassifier
from fedilora.server import outliers, run_problem
from fedilora.trainer import FederatedTrainer
from helpers import Sabotage, tiny_datamodule


class RoundStarts(FederatedCallback):
    """The global adapter at the start of every round."""

    def __init__(self):
        self.lora: dict[int, dict[str, torch.Tensor]] = {}

    def on_round_start(self, trainer, round):
        self.lora[round] = {k: v.clone() for k, v in trainer.global_lora.items()}


def _fit(tmp_path, callbacks, rounds=1, datamodule=None, **kwargs):
    torch.manual_seed(0)
    starts = RoundStarts()
    trainer = FederatedTrainer(rounds=rounds, clients_per_round=3, ranks=[4, 4, 4], max_local_steps=2,
                               callbacks=[starts, *callbacks], root_dir=str(tmp_path), progress=False,
                               **kwargs)  # fmt: skip
    trainer.fit(LoRACLIPClassifier(num_classes=12), datamodule or tiny_datamodule(num_clients=3))
    return trainer, starts.lora


REASONS = {
    "raise": "RuntimeError: disk full",
    "nan": "non-finite values in",
    "nan_head": "non-finite values in head.",
    "huge": "exceeds trainer.max_update_norm=100.0",
    "huge_default": "the round's median",
}


@pytest.mark.parametrize("mode", list(REASONS))
def test_bad_client_is_left_out_and_the_rest_aggregate(tmp_path, capsys, mode):
    callback = Sabotage(mode.removesuffix("_default"), victims=[1])
    trainer, starts = _fit(tmp_path, [callback], max_update_norm=100.0 if mode == "huge" else None)
    healthy = [callback.seen[c] for c in (0, 2)]
    expected = DimensionWise().aggregate(starts[0], healthy)
    for key, value in trainer.global_lora.items():
        assert torch.isfinite(value).all()
        torch.testing.assert_close(value, expected[key])
    expected_head = weighted_average([u.extra for u in healthy], sample_weights(healthy))
    for key, value in trainer.global_extra.items():
        torch.testing.assert_close(value, expected_head[key])
    assert trainer.history[0]["round/rejected_updates"] == 1.0
    assert 1 not in trainer.personal
    warning = capsys.readouterr().out
    assert "round 0: client 1 left out of the aggregation" in warning
    assert REASONS[mode] in warning


def test_poisoned_update_is_aggregated_only_with_the_defence_off(tmp_path, capsys):
    # the same attack as `huge_default` above, with trainer.update_norm_factor: null: it reaches the model
    trainer, _ = _fit(tmp_path, [Sabotage("huge", victims=[1])], update_norm_factor=None)
    assert trainer.history[0]["round/rejected_updates"] == 0.0
    assert max(float(v.abs().max()) for v in trainer.global_lora.values()) > 1e5  # ~1e6 / 3 of the poison
    assert "left out" not in capsys.readouterr().out


def test_rejection_with_model_editing_on(tmp_path, capsys):
    # editing works from round 1 on; the poison is added after the edit, as an attacker would send it
    editing, sabotage = ModelEditing(), Sabotage("huge", victims=[1], round_=1)
    trainer, starts = _fit(tmp_path, [editing, sabotage], rounds=2)
    healthy = [sabotage.seen[c] for c in (0, 2)]
    assert all("edits" in u.metrics for u in healthy)  # the edit ran on the updates that were aggregated
    assert [client for client, _ in editing._reports] == [0, 2]  # edit statistics only of accepted updates
    expected = DimensionWise().aggregate(starts[1], healthy)
    for key, value in trainer.global_lora.items():
        torch.testing.assert_close(value, expected[key])
    assert [h["round/rejected_updates"] for h in trainer.history] == [0.0, 1.0]
    assert max(float(v.abs().max()) for v in trainer.personal[1][1].values()) < 1e3  # round 0's model kept
    assert "round 1: client 1 left out of the aggregation" in capsys.readouterr().out


def test_too_few_healthy_updates_skip_the_round_and_fail_the_run(tmp_path, capsys):
    with pytest.raises(RunFailed, match="every round was skipped") as failed:
        _fit(tmp_path, [Sabotage("raise", victims=[0, 1])], min_clients_per_round=2)
    out = capsys.readouterr().out
    assert "round 0 skipped: 1 healthy update(s), fewer than trainer.min_clients_per_round=2" in out
    assert "NOT A SUCCESS: every round was skipped" in out  # the table is printed, marked
    results = failed.value.results
    assert results["skipped_rounds"] == 1 and results["problem"].startswith("every round was skipped")
    written = json.loads((tmp_path / "fedilora" / "version_0" / "results.json").read_text())
    assert written["problem"] == results["problem"]


def test_every_update_rejected_exits_non_zero_with_one_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/demo.yaml", "--trainer.rounds", "2", "--trainer.max_local_steps", "1",
              "--trainer.max_update_norm", "1e-9", "--data.dataset.init_args.num_train", "400",
              "--data.dataset.init_args.num_test", "60", "--trainer.root_dir", str(tmp_path),
              "--trainer.progress", "false"])  # fmt: skip
    out, err = capsys.readouterr()
    assert exit_info.value.code == 1
    assert err.strip().splitlines()[-1] == (
        "fedilora: error: every round was skipped: too few healthy client updates to aggregate (see the warnings "
        "above for each client's reason); the global model is not trained as configured"
    )
    assert "Traceback" not in err
    assert out.count("exceeds trainer.max_update_norm=1e-09") == 8  # 4 clients x 2 rounds
    assert "NOT A SUCCESS" in out


class _OneBadFile:
    """The benchmark's images, except that the rows in ``bad`` decode a truncated PNG (a data error)."""

    def __init__(self, images, path):
        self.images, self.path, self.bad = images, path, set()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        rows = torch.as_tensor(index).reshape(-1)
        if self.bad & set(rows.tolist()):
            decode_image(self.path, 32)
        return self.images[rows]


class _WithBadFile(SyntheticBenchmark):
    def __init__(self, path, **kwargs):
        super().__init__(**kwargs)
        self.path, self.store = path, None

    def load(self):
        pool, test = super().load()
        self.store = _OneBadFile(pool.images, self.path)
        return MultimodalData(self.store, pool.texts, pool.labels), test


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_data_error_in_training_stops_the_run_with_the_file(tmp_path, capsys, num_workers):
    bad = tmp_path / "images" / "bad.png"
    bad.parent.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(bad)
    bad.write_bytes(bad.read_bytes()[:60])  # a truncated file, as a broken copy leaves it
    dataset = _WithBadFile(bad, num_train=400, num_test=60)
    datamodule = tiny_datamodule(num_clients=3, num_workers=num_workers)
    datamodule.dataset = dataset
    datamodule.setup("fit")
    dataset.store.bad = set(datamodule.clients[1]["train"][0].tolist())  # client 1's training rows
    with pytest.raises(ConfigError) as error:
        _fit(tmp_path, [], datamodule=datamodule)
    message = str(error.value)
    # one line naming the client's split and the file (fedilora.data.DataError's wording)
    assert message.startswith(f"client 1's train split: image file {bad} cannot be decoded") and "\n" not in message
    assert "left out" not in capsys.readouterr().out  # not taken for a client fault
    assert not list(tmp_path.glob("fedilora/version_*/results.json"))


def test_outlier_rule_on_hand_computed_norms():
    assert outliers([1.0, 1.2, 0.9, 1e6], 10.0) == ([3], pytest.approx(1e6 / 1.1))  # median of 4: (1.0 + 1.2) / 2
    assert outliers([1.0, 1.0, 10.0], 10.0)[0] == []  # exactly 10x the median is kept
    assert outliers([1.0, 1.0, 10.01], 10.0)[0] == [2]
    assert outliers([3.0, 1e6], 10.0)[0] == []  # 2 updates: no median to trust
    assert math.isnan(outliers([3.0, 1e6], 10.0)[1])
    assert outliers([0.0, 0.0, 0.0, 5.0], 10.0)[0] == []  # median 0: nothing trained, nothing to compare
    assert outliers([1.0, 2.0, 1e6], None) == ([], 1e6 / 2.0)  # off: the ratio is still reported


def test_run_problem_counts_skipped_rounds():
    assert run_problem([], 3) is None
    assert run_problem([False, False, False], 3) is None
    assert run_problem([True, False, False], 3) is None
    assert run_problem([True, False], 2) is None  # half is not most
    assert run_problem([True, True, False], 3).startswith("2 of 3 rounds were skipped")
    assert run_problem([True], 1).startswith("every round was skipped")
    assert run_problem([True, True], 2).startswith("every round was skipped")


def test_min_clients_above_clients_per_round_is_refused(tmp_path):
    trainer = FederatedTrainer(rounds=1, clients_per_round=2, ranks=4, min_clients_per_round=3, root_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"trainer\.min_clients_per_round"):
        trainer.fit(LoRACLIPClassifier(num_classes=12), tiny_datamodule(num_clients=3))


class Stall(FederatedCallback):
    """Client ``victim`` stalls ``seconds`` before it trains in round ``round_`` (a slow or stuck node): the
    test's clock jumps ahead instead of sleeping, so the outcome does not depend on this machine's speed."""

    def __init__(self, clock, victim: int, seconds: float, round_: int = 0) -> None:
        self.clock, self.victim, self.seconds, self.round = clock, victim, seconds, round_

    def on_client_fit_start(self, trainer, round, client_id, rank):
        if round == self.round and client_id == self.victim:
            self.clock.offset += self.seconds


def test_a_round_deadline_leaves_late_clients_out_and_the_round_goes_on(tmp_path, capsys, monkeypatch):
    # 3 clients a round (plan order 0, 1, 2): client 1 stalls 2000 s in round 0, past a 1000 s deadline, so it
    # is stopped after its first step, client 2 is never started, and client 0 alone is aggregated
    class Clock:
        offset, real = 0.0, time.monotonic

        def __call__(self) -> float:
            return self.real() + self.offset

    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    trainer = FederatedTrainer(rounds=2, clients_per_round=3, ranks=[4, 2, 2], max_local_steps=2,
                               round_timeout_s=1000.0, callbacks=[Stall(clock, victim=1, seconds=2000.0)],
                               root_dir=str(tmp_path), progress=False, update_norm_factor=None)  # fmt: skip
    trainer.fit(LoRACLIPClassifier(num_classes=12), tiny_datamodule(num_clients=3, num_train=90, num_test=24))
    out = capsys.readouterr().out
    first, second = trainer.history
    assert (first["round/num_clients"], first["round/rejected_updates"], first["round/skipped"]) == (1.0, 2.0, 0.0)
    assert "client 1 left out of the aggregation (LateClient: still training at the round's deadline (step 1" in out
    assert "client 2 left out of the aggregation (LateClient: not started by trainer.round_timeout_s=1000.0)" in out
    assert (second["round/num_clients"], second["round/rejected_updates"]) == (3.0, 0.0)  # nobody late in round 1


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_a_bad_round_deadline_is_one_config_error(bad):
    with pytest.raises(ConfigError, match=r"^trainer\.round_timeout_s: must be a finite number of seconds > 0"):
        FederatedTrainer(round_timeout_s=bad)
