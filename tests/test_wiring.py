"""Trainer-level wiring of editing and aggregation: what is compared, what is kept, what is weighted.

Each test fails on one plausible wiring mistake that the unit tests of the pure functions cannot see:
editing against the client's own trained adapter instead of the global it received, keeping the
pre-edit adapter as the personalized model, and averaging the heads uniformly instead of by samples.
"""

from __future__ import annotations

import pytest
import torch

from fedilora.aggregation import truncate
from fedilora.callbacks import FederatedCallback
from fedilora.editing import ModelEditing
from fedilora.model import LoRACLIPClassifier
from fedilora.trainer import FederatedTrainer
from helpers import tiny_datamodule

RANKS = [4, 2, 2]


def _copy(state):
    return {k: v.detach().clone() for k, v in state.items()}


class _Spy(FederatedCallback):
    """Snapshots the update at ``on_client_fit_end`` (before or after the editing callback, by position)."""

    def __init__(self, log: dict):
        self.log = log

    def on_round_start(self, trainer, round):
        self.log.setdefault("global", {})[round] = _copy(trainer.global_lora)

    def on_client_fit_end(self, trainer, round, update, received):
        self.log.setdefault("lora", {})[(round, update.client_id)] = _copy(update.lora)
        self.log.setdefault("received", {})[(round, update.client_id)] = _copy(received)
        self.log.setdefault("rank", {})[update.client_id] = update.rank

    def on_aggregate_end(self, trainer, round, global_lora, updates):
        self.log.setdefault("aggregated", {})[round] = (
            [(u.num_samples, _copy(u.extra)) for u in updates],
            _copy(trainer.global_extra),
        )


@pytest.fixture(scope="module")
def edited_run(tmp_path_factory):
    """3 rounds, 2 of 3 clients per round, editing that always fires (threshold 1, blend 0.5) and
    Dirichlet label skew, so that the clients hold clearly different numbers of samples."""
    before, after = {}, {}
    torch.manual_seed(0)
    model = LoRACLIPClassifier(num_classes=12)
    trainer = FederatedTrainer(
        rounds=3, clients_per_round=2, ranks=RANKS, max_local_steps=2, eval_every=3, seed=0,
        callbacks=[_Spy(before), ModelEditing(keys="lora_A", num_edits=1, threshold=1.0, blend="half"), _Spy(after)],
        root_dir=str(tmp_path_factory.mktemp("runs")), progress=False, checkpoint_every=None,
    )  # fmt: skip
    # 13, 109 and 196 training samples
    datamodule = tiny_datamodule(num_clients=3, partition="dirichlet", dirichlet_alpha=0.1, seed=2)
    results = trainer.fit(model, datamodule)
    return trainer, before, after, results


def test_editing_blends_towards_the_received_global_not_the_trained_adapter(edited_run):
    _, before, after, results = edited_run
    checked = 0
    for (round_, client), trained in before["lora"].items():
        received = truncate(before["global"][round_], before["rank"][client])
        for key, value in received.items():  # what the client was handed is the broadcast global
            torch.testing.assert_close(before["received"][(round_, client)][key], value, rtol=0, atol=0)
        if round_ == 0:
            continue
        edited = after["lora"][(round_, client)]
        changed = [k for k in trained if not torch.equal(edited[k], trained[k])]
        assert len(changed) == 1 and ".lora_A." in changed[0]  # threshold 1: the least similar A always edits
        key = changed[0]
        torch.testing.assert_close(edited[key], 0.5 * trained[key] + 0.5 * received[key])
        checked += 1
    assert checked == 4  # 2 clients in each of rounds 1 and 2
    assert results["edits"]["total"] == 4 and results["edits"]["rounds_with_edits"] == 2


def test_the_personalized_model_is_the_edited_adapter(edited_run):
    trainer, before, after, _ = edited_run
    last_round = {client: r for (r, client) in sorted(after["lora"])}
    edited_clients = 0
    for client, (rank, lora, _) in trainer.personal.items():
        key = (last_round[client], client)
        assert rank == RANKS[client]
        for name, value in lora.items():
            torch.testing.assert_close(value, after["lora"][key][name], rtol=0, atol=0)
        if last_round[client] >= 1:
            edited_clients += 1
            assert any(not torch.equal(lora[k], before["lora"][key][k]) for k in lora)  # not the pre-edit one
    assert edited_clients >= 2


def test_heads_are_averaged_by_sample_count(edited_run):
    _, before, _, _ = edited_run
    for updates, global_extra in before["aggregated"].values():
        counts = torch.tensor([n for n, _ in updates], dtype=torch.float64)
        assert counts.max() > 1.5 * counts.min(), "the test needs clearly unequal sample counts"
        for key, value in global_extra.items():
            stacked = torch.stack([extra[key].double() for _, extra in updates])
            weighted = torch.einsum("k,k...->...", counts / counts.sum(), stacked)
            uniform = stacked.mean(dim=0)
            torch.testing.assert_close(value.double(), weighted, rtol=1e-5, atol=1e-7)
            if key.endswith("weight"):  # the uniform mean is measurably different: the test can tell them apart
                assert (weighted - uniform).abs().max() > 1e-5
