"""The baselines and references run through the same trainer: trainer-level properties."""

import torch

from fedilora.aggregation import DimensionWise
from fedilora.baselines import Centralized, FlexLoRA, FLoRA, HetLoRA, Local, lora_deltas
from fedilora.model import LoRACLIPClassifier
from fedilora.server import POOLED, round_plan
from fedilora.trainer import FederatedTrainer
from helpers import tiny_datamodule, tiny_model


def _fit(tmp_path, aggregator, ranks=(4, 2, 2), rounds=2, **kwargs):
    torch.manual_seed(0)
    model = LoRACLIPClassifier(num_classes=12)
    trainer = FederatedTrainer(rounds=rounds, clients_per_round=kwargs.pop("clients_per_round", 2), ranks=list(ranks),
                               max_local_steps=2, aggregator=aggregator, root_dir=str(tmp_path), progress=False,
                               **kwargs)  # fmt: skip
    datamodule = tiny_datamodule(num_clients=len(ranks))
    results = trainer.fit(model, datamodule)
    return trainer, model, datamodule, results


def test_flora_merge_equals_base_plus_adapter():
    model = tiny_model(ranks=(4,), head_dropout=0.0)
    model.eval()
    lora = {k: torch.randn_like(v) * 0.05 for k, v in model.lora_state(4).items()}
    model.load_lora_state(lora, 4)
    batch = {
        "image": torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8),
        "tokens": torch.randint(1, 400, (3, 32)),
        "image_present": torch.ones(3, dtype=torch.bool),
        "text_present": torch.ones(3, dtype=torch.bool),
    }
    with torch.no_grad():
        adapted = model(batch)
        model.merge_into_base(lora_deltas(lora, model.lora_scale))
        model.load_lora_state({k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in lora.items()}, 4)
        merged = model(batch)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-4)


def test_flora_run_merges_into_the_base_and_restarts_clients(tmp_path):
    aggregator = FLoRA()
    trainer, model, _, _ = _fit(tmp_path, aggregator)
    assert aggregator.merged, "FLoRA must have merged deltas"
    assert all(torch.count_nonzero(v) == 0 for k, v in trainer.global_lora.items() if ".lora_B." in k)
    prefix, delta = next(iter(aggregator.merged.items()))
    torch.manual_seed(trainer.seed)  # the trainer seeds the backbone's initialisation the same way
    fresh = LoRACLIPClassifier(num_classes=12)
    fresh.configure_model()
    fresh.add_ranks([4])
    base = model.clip.get_submodule(prefix).get_base_layer()
    fresh_base = fresh.clip.get_submodule(prefix).get_base_layer()
    weight = base.in_proj_weight if hasattr(base, "in_proj_weight") else base.weight
    fresh_weight = fresh_base.in_proj_weight if hasattr(fresh_base, "in_proj_weight") else fresh_base.weight
    torch.testing.assert_close(weight - fresh_weight, delta, atol=1e-6, rtol=1e-5)


def test_flexlora_gives_each_client_its_own_rank(tmp_path):
    aggregator = FlexLoRA()
    trainer, _, _, _ = _fit(tmp_path, aggregator, ranks=(4, 2, 1), clients_per_round=3)
    for rank in (4, 2, 1):
        sent = aggregator.broadcast(trainer.global_lora, rank)
        assert all(v.shape[0] == rank for k, v in sent.items() if ".lora_A." in k)
        assert all(v.shape[1] == rank for k, v in sent.items() if ".lora_B." in k)
    assert {rank for rank, _, _ in trainer.personal.values()} == {4, 2, 1}


def test_hetlora_runs_and_changes_the_global_adapter(tmp_path):
    torch.manual_seed(0)
    initial = tiny_model(ranks=(4,)).lora_state(4)
    trainer, _, _, _ = _fit(tmp_path, HetLoRA())
    assert any(not torch.equal(trainer.global_lora[k], initial[k]) for k in initial)


def test_local_never_communicates(tmp_path):
    trainer, _, _, results = _fit(tmp_path, Local(), rounds=3)
    initial = trainer.history[0]
    assert all(h["comm/bytes_uploaded"] == 0 and h["comm/bytes_downloaded"] == 0 for h in trainer.history)
    fresh = tiny_model(ranks=(2, 4))
    for key, value in trainer.global_lora.items():  # the global adapter is never touched
        assert torch.equal(value, fresh.lora_state(4)[key])
    assert (trainer.personal and "global/complete/acc" in initial) or results["global"]
    # a client sampled twice continued from its own model, not from the (unchanged) global one
    client = next(iter(trainer.personal))
    rank = trainer.personal[client][0]
    assert any(not torch.equal(v, trainer.aggregator.broadcast(trainer.global_lora, rank)[k])
               for k, v in trainer.personal[client][1].items())  # fmt: skip


def test_centralized_trains_one_model_on_the_union_of_client_data(tmp_path):
    trainer, _, datamodule, results = _fit(tmp_path, Centralized(), rounds=1)
    pooled = datamodule.pooled_dataloader("train").dataset.index
    union = torch.cat([datamodule.clients[k]["train"][0] for k in range(datamodule.num_clients)])
    assert torch.equal(pooled.sort().values, union.sort().values)
    assert trainer.personal == {}  # one model, no clients
    assert results["personalized_clients"] == datamodule.num_clients  # evaluated on every client's test split
    assert round_plan(trainer.aggregator, [4, 2, 2], 2, 4, seed=0, round=0) == [(POOLED, 4)]


def test_dimension_wise_beats_zero_padding_on_dilution(tmp_path):
    # the same seeds and clients: the aggregates differ exactly on dimensions only some clients have
    dim_trainer, _, _, _ = _fit(tmp_path / "a", DimensionWise(), ranks=(4, 2), clients_per_round=2, rounds=1)
    het_trainer, _, _, _ = _fit(tmp_path / "b", HetLoRA(), ranks=(4, 2), clients_per_round=2, rounds=1)
    key = next(k for k in dim_trainer.global_lora if ".lora_A." in k)
    dim_rows, het_rows = dim_trainer.global_lora[key], het_trainer.global_lora[key]
    client0 = dim_trainer.personal[0][1][key]
    torch.testing.assert_close(dim_rows[2:], client0[2:])  # only client 0 (rank 4) has dims 2, 3
    assert het_rows[2:].norm() < client0[2:].norm()  # zero padding dilutes them
