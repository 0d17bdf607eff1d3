"""A client's failure or poisoned update must not end the federation or reach the global model."""

import math

import pytest
import torch

from fedilora.aggregation import ClientUpdate, DimensionWise, sample_weights, weighted_average
from fedilora.callbacks import FederatedCallback
from fedilora.errors import ConfigError
from fedilora.model import LoRACLIPClassifier
from fedilora.trainer import FederatedTrainer
from helpers import tiny_datamodule


class Sabotage(FederatedCallback):
    """Breaks chosen clients' updates in ``on_client_fit_end`` (which runs before upload)."""

    def __init__(self, mode, victims, round_=0):
        self.mode, self.victims, self.round = mode, set(victims), round_
        self.seen: dict[int, ClientUpdate] = {}

    def on_client_fit_end(self, trainer, round, update, received):
        self.seen[update.client_id] = update
        if round != self.round or update.client_id not in self.victims:
            return
        if self.mode == "raise":
            raise RuntimeError("disk full on the client")
        key = next(iter(update.lora))
        update.lora[key] = update.lora[key].clone()
        update.lora[key].view(-1)[0] = math.nan if self.mode == "nan" else 1e6


def _fit(tmp_path, callback, **kwargs):
    torch.manual_seed(0)
    trainer = FederatedTrainer(rounds=1, clients_per_round=3, ranks=[4, 4, 4], max_local_steps=2,
                               callbacks=[callback], root_dir=str(tmp_path), progress=False, **kwargs)  # fmt: skip
    initial = None

    class Keep(FederatedCallback):
        def on_fit_start(self, trainer):
            nonlocal initial
            initial = {k: v.clone() for k, v in trainer.global_lora.items()}

    trainer.fabric._callbacks.append(Keep())
    trainer.fit(LoRACLIPClassifier(num_classes=12), tiny_datamodule(num_clients=3))
    return trainer, initial


@pytest.mark.parametrize("mode", ["raise", "nan", "huge"])
def test_bad_client_is_left_out_and_the_rest_aggregate(tmp_path, capsys, mode):
    callback = Sabotage(mode, victims=[1])
    trainer, initial = _fit(tmp_path, callback, max_update_norm=100.0 if mode == "huge" else None)
    healthy = [callback.seen[c] for c in (0, 2)]
    expected = DimensionWise().aggregate(initial, healthy)
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
    assert {"raise": "RuntimeError: disk full", "nan": "non-finite", "huge": "max_update_norm"}[mode] in warning


def test_too_few_healthy_updates_skip_the_round(tmp_path, capsys):
    trainer, initial = _fit(tmp_path, Sabotage("raise", victims=[0, 1]), min_clients_per_round=2)
    for key, value in trainer.global_lora.items():
        assert torch.equal(value, initial[key])
    assert trainer.history[0]["round/skipped"] == 1.0
    assert "round 0 skipped: 1 healthy update(s), fewer than trainer.min_clients_per_round=2" in capsys.readouterr().out


def test_min_clients_above_clients_per_round_is_refused(tmp_path):
    trainer = FederatedTrainer(rounds=1, clients_per_round=2, ranks=4, min_clients_per_round=3, root_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"trainer\.min_clients_per_round"):
        trainer.fit(LoRACLIPClassifier(num_classes=12), tiny_datamodule(num_clients=3))
