"""Evaluation of federated models: the global model per modality condition, and every client's
personalized model on its own test split. Models are ``(rank, lora, extra)`` states loaded into one
``LoRACLIPClassifier`` in turn; metrics are the model's own torchmetrics collection.

With several processes (``trainer.devices``/``num_nodes``) the work is shared: each process evaluates a
shard of the global test set and torchmetrics gathers the metric states of all of them, and each process
evaluates its share of the clients, whose figures are then gathered. Every process ends with the same
figures as a single process would compute.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from lightning.fabric import Fabric
from torch import Tensor

from fedilora.data.datamodule import FederatedDataModule
from fedilora.errors import ConfigError
from fedilora.model import LoRACLIPClassifier
from fedilora.personal import Personal


def shared_by(fabric: Fabric) -> tuple[int, int]:
    """``(rank, number)`` of the processes that share the evaluation: Fabric's, once its process group
    is up; ``(0, 1)`` in a single process (or before ``fabric.launch()``)."""
    if fabric.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        return fabric.global_rank, fabric.world_size
    return 0, 1


@torch.no_grad()
def evaluate_loader(
    model: LoRACLIPClassifier, fabric: Fabric, loader: Iterable[Mapping[str, Tensor]], sync: bool = False
) -> dict[str, float]:
    """The model's validation metrics over ``loader`` (as loaded now).

    ``sync``: ``loader`` is this process's shard of a set that every process evaluates in step; the
    metrics are then over the whole set (torchmetrics gathers the states of all processes on compute).
    Otherwise they are over ``loader`` alone, whatever the other processes evaluate meanwhile.
    """
    model.eval()
    own = model.val_metrics
    model.val_metrics = model.build_metrics(sync_on_compute=sync)  # what validation_step updates
    try:
        problem = None
        try:
            for batch_idx, batch in enumerate(loader):
                with fabric.autocast():
                    model.validation_step(fabric.to_device(batch), batch_idx)
        except ConfigError as err:  # a data error, e.g. an image that does not decode
            if not sync:
                raise
            problem = err
        if sync:  # the others must not wait in compute() for a process that stopped: all stop together
            raise_on_every_process(problem)
        return {k: float(v) for k, v in model.val_metrics.compute().items()}
    finally:
        model.val_metrics = own


def raise_on_every_process(problem: ConfigError | None) -> None:
    """Raise ``problem`` (this process's) or, as a ``ConfigError``, the problem of any other process, so
    that all processes stop together instead of waiting for one that stopped."""
    messages = [None if problem is None else str(problem)]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        messages = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(messages, None if problem is None else str(problem))
    if problem is not None:
        raise problem
    first = next((message for message in messages if message is not None), None)
    if first is not None:
        raise ConfigError(first)


def evaluate_state(
    model: LoRACLIPClassifier,
    fabric: Fabric,
    state: Personal,
    loader: Iterable[Mapping[str, Tensor]],
    sync: bool = False,
) -> dict[str, float]:
    model.load_client_state(*state)
    return evaluate_loader(model, fabric, loader, sync)


def evaluate_global(
    model: LoRACLIPClassifier, fabric: Fabric, datamodule: FederatedDataModule, states: Sequence[Personal]
) -> dict[str, float]:
    """``global/<condition>/<metric>`` on the global test set under each modality condition, averaged
    over ``states`` (one global model, or under ``Local`` every client's own). With several processes
    each evaluates its shard of the test set (every process must call this with the same ``states``)."""
    rank, processes = shared_by(fabric)
    metrics: dict[str, float] = {}
    for condition in datamodule.conditions():
        loader = datamodule.global_test_dataloader(condition)
        # Each process takes a contiguous run of the set's own batches, with no padding (a
        # DistributedSampler pads the last shards with repeated samples, which the gathered metric states
        # would count twice). Every sample is then counted once, in the batch it has in one process, and
        # the gathered states are the single-process ones in the same order: counts (accuracy, F1) and
        # concatenated scores (AUROC, samples F1) give exactly the single-process figures. A shard must not
        # be empty (torchmetrics cannot gather an empty list state with filled ones): with fewer batches
        # than processes, every process evaluates the whole set alone.
        sharded = 1 < processes <= len(loader)
        if sharded:
            loader = datamodule.global_test_dataloader(condition, shard=(rank, processes))
        runs = [evaluate_state(model, fabric, state, loader, sync=sharded) for state in states]
        for name in runs[0] if runs else ():
            metrics[f"global/{condition}/{name}"] = sum(r[name] for r in runs) / len(runs)
    return metrics


def evaluate_personalized(
    model: LoRACLIPClassifier, fabric: Fabric, datamodule: FederatedDataModule, personal: Mapping[int, Personal]
) -> dict[str, float]:
    """``personalized/client_<k>/<metric>`` of every client's model on its own test split (clients
    without test samples are left out), their mean, and how many clients it covers. With several
    processes each evaluates its share of the clients (every ``processes``-th, as training splits a
    round's plan) and every process receives all the figures."""
    rank, processes = shared_by(fabric)
    per_client: dict[int, dict[str, float]] = {}
    problem = None
    # one state read at a time: a ``PersonalStore`` may hold them on disk
    for client in sorted(personal)[rank::processes]:
        loader = datamodule.client_dataloader(client, "test")
        if len(loader) > 0:
            try:
                per_client[client] = evaluate_state(model, fabric, personal[client], loader)
            except ConfigError as err:  # a data error: raised below on every process, not only here
                if processes == 1:
                    raise
                problem = err
                break
    if processes > 1:
        raise_on_every_process(problem)
        gathered: list = [None] * processes
        torch.distributed.all_gather_object(gathered, per_client)
        per_client = {client: figures for part in gathered for client, figures in part.items()}
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
