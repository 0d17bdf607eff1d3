"""Tiny objects shared by tests."""

from __future__ import annotations

import math

import torch

from fedilora.aggregation import ClientUpdate
from fedilora.callbacks import FederatedCallback
from fedilora.data import FederatedDataModule, SyntheticBenchmark
from fedilora.model import LoRACLIPClassifier


def lora_pair(prefix: str, rank: int, d_in: int, d_out: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.lora_A.weight": torch.randn(rank, d_in, generator=generator, dtype=torch.float64),
        f"{prefix}.lora_B.weight": torch.randn(d_out, rank, generator=generator, dtype=torch.float64),
    }


def tiny_datamodule(num_clients: int = 4, num_train: int = 400, num_test: int = 120, **kwargs) -> FederatedDataModule:
    return FederatedDataModule(
        dataset=SyntheticBenchmark(num_train=num_train, num_test=num_test), num_clients=num_clients, **kwargs
    )


def tiny_model(ranks=(4,), **kwargs) -> LoRACLIPClassifier:
    torch.manual_seed(0)
    model = LoRACLIPClassifier(num_classes=12, **kwargs)
    model.add_ranks(ranks)
    return model


class Sabotage(FederatedCallback):
    """Breaks chosen clients' updates in ``on_client_fit_end`` (which runs before upload): ``raise`` an
    exception, ``nan`` in the adapter, ``nan_head`` in the head, ``huge`` (1e6) in the adapter."""

    def __init__(self, mode: str, victims, round_: int = 0):
        self.mode, self.victims, self.round = mode, set(victims), round_
        self.seen: dict[int, ClientUpdate] = {}

    def on_client_fit_end(self, trainer, round, update, received):
        if round == self.round:
            self.seen[update.client_id] = update
        if round != self.round or update.client_id not in self.victims:
            return
        if self.mode == "raise":
            raise RuntimeError("disk full on the client")
        state = update.extra if self.mode == "nan_head" else update.lora
        key = next(iter(state))
        state[key] = state[key].clone()
        state[key].view(-1)[0] = 1e6 if self.mode == "huge" else math.nan


#: two LoRA modules of small, unequal shapes (prefix -> (d_out, d_in)), one in the visual tower
SHAPES = {"visual.m.c_fc": (5, 6), "n": (3, 4)}


def make_lora(rank: int, seed: int) -> dict[str, torch.Tensor]:
    """Random float64 ``lora_A``/``lora_B`` of ``rank`` for every module of ``SHAPES``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, (d_out, d_in) in SHAPES.items():
        out[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=g, dtype=torch.float64)
        out[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=g, dtype=torch.float64)
    return out
