"""Tiny objects shared by tests."""

from __future__ import annotations

import torch

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
