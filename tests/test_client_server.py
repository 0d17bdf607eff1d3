"""The shared core on its own: ``fit_client`` without a trainer, ``FederatedServer`` over hand-made updates."""

import torch
from lightning.fabric import Fabric

from fedilora.aggregation import ClientUpdate, DimensionWise
from fedilora.baselines import Local
from fedilora.callbacks import FederatedCallback, hook_caller
from fedilora.client import fit_client
from fedilora.editing import ModelEditing
from fedilora.server import FederatedServer, sample_clients
from fedilora.trainer import FederatedTrainer
from helpers import lora_pair, tiny_datamodule, tiny_model


class Record(FederatedCallback):
    def __init__(self):
        self.calls = []

    def on_client_fit_start(self, trainer, round, client_id, rank):
        self.calls.append(("start", trainer, round, client_id, rank))

    def on_client_fit_end(self, trainer, round, update, received):
        self.calls.append(("end", trainer, round, update.client_id, update.rank))


def test_fit_client_without_a_trainer_equals_the_fabric_engine(tmp_path):
    datamodule = tiny_datamodule(num_clients=3)
    datamodule.setup("fit")
    model = tiny_model(ranks=(4, 2))
    lora, extra = model.lora_state(2), model.extra_state()
    received = {k: v + 0.01 for k, v in lora.items()}  # not the initialisation, so that editing has work
    record = Record()
    loader = lambda g: datamodule.client_dataloader(1, "train", g)  # noqa: E731
    fabric, call = Fabric(accelerator="cpu", devices=1), hook_caller([ModelEditing(threshold=1.0), record])
    alone = fit_client(model, fabric, loader, datamodule.num_train_samples(1), round=3, client_id=1, rank=2,
                       lora=received, extra=extra, seed=5, max_local_steps=3, call=call)  # fmt: skip
    assert record.calls == [("start", None, 3, 1, 2), ("end", None, 3, 1, 2)]
    assert alone.metrics["edits"] == 1.0 and alone.num_samples == datamodule.num_train_samples(1)

    trainer = FederatedTrainer(ranks=[4, 2, 2], max_local_steps=3, seed=5, root_dir=str(tmp_path), progress=False,
                               callbacks=[ModelEditing(threshold=1.0)])  # fmt: skip
    engine = trainer.train_client(model, datamodule, 3, 1, 2, received, extra)
    for key in alone.lora:
        assert torch.equal(alone.lora[key], engine.lora[key])
    for key in alone.extra:
        assert torch.equal(alone.extra[key], engine.extra[key])
    assert alone.train_loss == engine.train_loss


def _update(client, rank, num_samples, generator, head=0.0):
    lora = lora_pair("m", rank, 3, 5, generator)
    return ClientUpdate(client, rank, num_samples, lora, {"head.w": torch.full((2,), head, dtype=torch.float64)})


def _server(aggregator, ranks, **kwargs):
    generator = torch.Generator().manual_seed(0)
    lora = lora_pair("m", max(ranks), 3, 5, generator)
    extra = {"head.w": torch.zeros(2, dtype=torch.float64)}
    return FederatedServer(aggregator.setup(1.0), ranks, len(ranks), max(ranks), 0, lora, extra, **kwargs)


def test_server_round_step_filters_aggregates_and_averages_heads():
    server = _server(DimensionWise(), [4, 2, 2, 2])
    assert server.plan(0) == [(c, [4, 2, 2, 2][c]) for c in sample_clients(4, 4, 0, 0)]
    lora, extra = server.payload(1, 2)
    assert extra is server.global_extra
    assert lora["m.lora_A.weight"].shape == (2, 3) and torch.equal(
        lora["m.lora_A.weight"], server.global_lora["m.lora_A.weight"][:2]
    )
    generator = torch.Generator().manual_seed(1)
    updates = [_update(0, 4, 1, generator, 1.0), _update(1, 2, 1, generator, 2.0), _update(2, 2, 2, generator, 4.0)]
    poisoned = _update(3, 2, 1, generator, 0.0)
    poisoned.lora = {k: v * 1e6 for k, v in poisoned.lora.items()}
    nan = _update(3, 2, 1, generator)
    nan.extra["head.w"][0] = float("nan")
    assert server.check(nan, *server.payload(3, 2)).startswith("non-finite values in head.w")
    for update in [*updates, poisoned]:
        assert server.check(update, *server.payload(update.client_id, update.rank)) is None
    previous = dict(server.global_lora)
    result = server.aggregate(0, [*updates, poisoned], [])
    assert [c for c, _ in result.rejected] == [3] and "above trainer.update_norm_factor=10.0" in result.rejected[0][1]
    assert [u.client_id for u in result.updates] == [0, 1, 2] and not result.skipped
    expected = DimensionWise().aggregate(previous, updates)
    for key, value in server.global_lora.items():
        assert torch.equal(value, expected[key])
    torch.testing.assert_close(
        server.global_extra["head.w"], torch.full((2,), (1.0 + 2.0 + 2 * 4.0) / 4, dtype=torch.float64)
    )
    assert sorted(server.personal) == [0, 1, 2]
    assert result.metrics(True, 0, 0.0)["round/rejected_updates"] == 1.0

    state = server.state_dict()
    again = _server(DimensionWise(), [4, 2, 2, 2])
    again.load_state_dict(state)
    assert all(torch.equal(again.global_lora[k], v) for k, v in server.global_lora.items())
    assert again.personal.keys() == server.personal.keys()


def test_a_skipped_round_keeps_the_global_state_and_local_clients_keep_their_own():
    server = _server(DimensionWise(), [2, 2, 2], min_clients_per_round=2)
    before = dict(server.global_lora)
    generator = torch.Generator().manual_seed(2)
    update = _update(0, 2, 1, generator, 3.0)
    server.check(update, *server.payload(0, 2))
    result = server.aggregate(0, [update], [(1, "RuntimeError: boom")])
    assert result.skipped and result.warnings(2)[-1].startswith("warning: round 0 skipped: 1 healthy update(s)")
    assert all(server.global_lora[k] is v for k, v in before.items())
    assert 0 in server.personal  # a healthy update is still the client's personalized model

    local = _server(Local(), [2, 2, 2])
    own = _update(0, 2, 1, generator, 5.0)
    local.check(own, *local.payload(0, 2))
    local.aggregate(0, [own])
    lora, extra = local.payload(0, 2)
    assert torch.equal(lora["m.lora_A.weight"], own.lora["m.lora_A.weight"]) and float(extra["head.w"][0]) == 5.0
