"""Evaluation of federated models: the global model per modality condition, and every client's
personalized model on its own test split. Models are ``(rank, lora, extra)`` states loaded into one
``LoRACLIPClassifier`` in turn; metrics are the model's own torchmetrics collection."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from lightning.fabric import Fabric
from torch import Tensor

from fedilora.data.datamodule import FederatedDataModule
from fedilora.model import LoRACLIPClassifier
from fedilora.personal import Personal


@torch.no_grad()
def evaluate_loader(
    model: LoRACLIPClassifier, fabric: Fabric, loader: Iterable[Mapping[str, Tensor]]
) -> dict[str, float]:
    """The model's validation metrics over ``loader`` (as loaded now)."""
    model.eval()
    model.val_metrics.reset()
    for batch_idx, batch in enumerate(loader):
        with fabric.autocast():
            model.validation_step(fabric.to_device(batch), batch_idx)
    values = {k: float(v) for k, v in model.val_metrics.compute().items()}
    model.val_metrics.reset()
    return values


def evaluate_state(
    model: LoRACLIPClassifier, fabric: Fabric, state: Personal, loader: Iterable[Mapping[str, Tensor]]
) -> dict[str, float]:
    model.load_client_state(*state)
    return evaluate_loader(model, fabric, loader)


def evaluate_global(
    model: LoRACLIPClassifier, fabric: Fabric, datamodule: FederatedDataModule, states: Sequence[Personal]
) -> dict[str, float]:
    """``global/<condition>/<metric>`` on the global test set under each modality condition, averaged
    over ``states`` (one global model, or under ``Local`` every client's own)."""
    metrics: dict[str, float] = {}
    for condition in datamodule.conditions():
        loader = datamodule.global_test_dataloader(condition)
        runs = [evaluate_state(model, fabric, state, loader) for state in states]
        for name in runs[0] if runs else ():
            metrics[f"global/{condition}/{name}"] = sum(r[name] for r in runs) / len(runs)
    return metrics


def evaluate_personalized(
    model: LoRACLIPClassifier, fabric: Fabric, datamodule: FederatedDataModule, personal: Mapping[int, Personal]
) -> dict[str, float]:
    """``personalized/client_<k>/<metric>`` of every client's model on its own test split (clients
    without test samples are left out), their mean, and how many clients it covers."""
    per_client: dict[int, dict[str, float]] = {}
    for client in sorted(personal):  # one state read at a time: a ``PersonalStore`` may hold them on disk
        loader = datamodule.client_dataloader(client, "test")
        if len(loader) > 0:
            per_client[client] = evaluate_state(model, fabric, personal[client], loader)
    return personalized_summary(per_client)


def personalized_summary(per_client: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """The logged personalized figures from each client's own metrics, wherever they were computed (here,
    or on the client's own node under Flower): ``personalized/client_<k>/<metric>``, the mean over the
    clients (in client order) and their number."""
    metrics: dict[str, float] = {}
    columns: dict[str, list[float]] = {}
    for client, figures in sorted(per_client.items()):
        for name, value in figures.items():
            metrics[f"personalized/client_{client}/{name}"] = value
            columns.setdefault(name, []).append(value)
    for name, values in columns.items():
        metrics[f"personalized/mean/{name}"] = sum(values) / len(values)
        metrics["personalized/num_clients"] = float(len(values))
    return metrics
