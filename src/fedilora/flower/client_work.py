"""What a Flower client does with one message, on plain data (no Flower types): shared by the ClientApp
process and by the node's keep-alive worker (``fedilora.flower.worker``).

A request is ``{"kind": "query" | "train" | "evaluate", "config": {...}, "node_config": {...},
"arrays": {"lora": {name: ndarray}, "extra": ..., "base": ...}}``; a reply is ``{"config": {record:
{...}}, "metrics": {record: {...}}, "arrays": {record: {name: ndarray}}}``, the records of the reply
message. Every request carries the resolved fedilora config; the node config says which client this
node is (``partition-id``) and may set its rank (``rank``; default ``trainer.ranks`` of the config).

- query: client id, rank and number of training samples (the server plans rounds with them);
- train: ``fedilora.client.fit_client`` from the payload, with the config's callbacks (e.g.
  ``ModelEditing``); a data error goes back as ``fatal`` (the server stops the run, as ``fedilora fit`` does);
- evaluate: the personalized model sent by the server, on this client's test split.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedilora.callbacks import hook_caller
from fedilora.client import fit_client
from fedilora.errors import ConfigError
from fedilora.evaluation import evaluate_state
from fedilora.flower.config import Parsed, parse, set_threads
from fedilora.flower.records import info_to_json
from fedilora.model import State
from fedilora.server import client_ranks

Request = dict[str, Any]
Reply = dict[str, Any]


class ClientRuntime:
    """What one process needs to serve the clients of one config: the parsed config, the data and the
    model with its frozen backbone, built in the order ``fedilora fit`` builds them (a random-init
    backbone is then the same tensor bit for bit). One model serves every client of the process: a
    client is its rank's adapter, its received state and its data."""

    def __init__(self, config_yaml: str) -> None:
        started = time.perf_counter()
        self.parsed: Parsed = parse(config_yaml)
        trainer, model, datamodule = self.parsed.trainer, self.parsed.model, self.parsed.datamodule
        self.fabric = trainer.fabric
        self.fabric.seed_everything(trainer.seed, verbose=False)
        datamodule.setup("fit")
        model.configure_model()
        model.to(self.fabric.device)
        self.call = hook_caller(trainer.callbacks, trainer=None)  # a client has no engine: trainer=None
        self._pristine: dict[str, torch.Tensor] = {}  # base weights as built, of modules a merge changed
        self.build_seconds = time.perf_counter() - started

    @property
    def num_clients(self) -> int:
        return self.parsed.datamodule.num_clients

    def identity(self, node_config: Mapping[str, Any]) -> tuple[int, int]:
        return node_identity(node_config, self.num_clients, self.parsed.trainer.ranks)

    def prepare(self, rank: int, base: State) -> None:
        """An adapter of ``rank``, and the base weights the server's aggregator merged (FLoRA)."""
        model = self.parsed.model
        if rank not in model.ranks:
            model.add_ranks([rank])
        for module in base.keys() - self._pristine.keys():
            self._pristine[module] = model.base_weight(module).detach().clone()
        model.load_base_weights({**self._pristine, **base})  # modules not sent go back to their build


def node_identity(node_config: Mapping[str, Any], num_clients: int, ranks: int | list[int]) -> tuple[int, int]:
    """(client id, LoRA rank) of a node: its ``partition-id``, and its ``rank`` or else the config's
    ``trainer.ranks`` for that client."""
    if "partition-id" not in node_config:
        raise ConfigError(
            "node config: partition-id is missing; start the SuperNode with --node-config 'partition-id=K'"
        )
    client = node_config["partition-id"]
    if not isinstance(client, int) or not 0 <= client < num_clients:
        raise ConfigError(
            f"node config: partition-id={client!r} is not a client id in [0, data.num_clients={num_clients})"
        )
    if "rank" not in node_config:
        return client, client_ranks(ranks, num_clients)[client]
    rank = node_config["rank"]
    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"node config: rank={rank!r} must be a positive integer")
    return client, rank


_RUNTIMES: dict[str, ClientRuntime] = {}
#: how many runtimes this process built (the benchmark reads it to show the cache at work)
BUILDS = {"count": 0, "seconds": 0.0}


def runtime_for(config_yaml: str) -> ClientRuntime:
    """The runtime of this config, built on first use and kept in this process (one config at a time)."""
    key = hashlib.sha256(config_yaml.encode()).hexdigest()
    if key not in _RUNTIMES or os.environ.get("FEDILORA_FLOWER_CACHE", "1") == "0":
        _RUNTIMES.clear()
        set_threads()
        _RUNTIMES[key] = ClientRuntime(config_yaml)
        BUILDS["count"] += 1
        BUILDS["seconds"] += _RUNTIMES[key].build_seconds
    return _RUNTIMES[key]


def _tensors(arrays: Mapping[str, np.ndarray]) -> State:
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}


def _numpy(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().contiguous().numpy() for k, v in state.items()}


def handle(request: Request) -> Reply:
    """The reply to one request; its ``process`` metrics say whether this message had to build the
    client runtime (``built``, ``build-seconds``) and how long it took here (``handle-seconds``)."""
    started, builds = time.perf_counter(), dict(BUILDS)
    reply = _handle(request)
    process = {
        "built": float(BUILDS["count"] - builds["count"]),
        "build-seconds": BUILDS["seconds"] - builds["seconds"],
        "handle-seconds": time.perf_counter() - started,
    }
    reply.setdefault("metrics", {})["process"] = process
    return reply


def _handle(request: Request) -> Reply:
    kind, config, node_config = request["kind"], request["config"], request["node_config"]
    try:
        runtime = runtime_for(str(config["fedilora-config"]))
        client, rank = runtime.identity(node_config)
    except ConfigError as err:
        key = "client" if kind == "query" else "fatal"
        return {"config": {key: {"error": str(err)}}}
    datamodule, trainer = runtime.parsed.datamodule, runtime.parsed.trainer
    if kind == "query":
        answer = {"client-id": client, "rank": rank, "num-samples": datamodule.num_train_samples(client)}
        return {"config": {"client": answer}}
    if client != int(config["client-id"]):
        raise RuntimeError(f"this node is client {client}, the message is for client {config['client-id']}")
    arrays = {name: _tensors(request["arrays"][name]) for name in ("lora", "extra", "base")}
    if kind == "evaluate":
        rank = int(config["rank"])  # the personalized model's rank (this client's, as it trained)
        runtime.prepare(rank, arrays["base"])
        loader = datamodule.client_dataloader(client, "test")
        evaluated = len(loader) > 0
        state = (rank, arrays["lora"], arrays["extra"])
        metrics = evaluate_state(runtime.parsed.model, runtime.fabric, state, loader) if evaluated else {}
        return {
            "config": {"evaluation": {"evaluated": evaluated}},
            "metrics": {"metrics": metrics},
        }
    if kind != "train":
        raise ValueError(f"unknown request {kind!r}")
    if rank != int(config["rank"]):
        raise RuntimeError(f"this node has rank {rank}, the message is for rank {config['rank']}")
    runtime.prepare(rank, arrays["base"])
    try:
        update = fit_client(
            runtime.parsed.model,
            runtime.fabric,
            lambda generator: datamodule.client_dataloader(client, "train", generator),
            datamodule.num_train_samples(client),
            round=int(config["round"]),
            client_id=client,
            rank=rank,
            lora=arrays["lora"],
            extra=arrays["extra"],
            seed=trainer.seed,
            local_epochs=trainer.local_epochs,
            max_local_steps=trainer.max_local_steps,
            call=runtime.call,
        )
    except ConfigError as err:
        return {"config": {"fatal": {"error": str(err)}}}
    return {
        "arrays": {"lora": _numpy(update.lora), "extra": _numpy(update.extra)},
        "config": {
            "update": {
                "client-id": update.client_id,
                "rank": update.rank,
                "num-samples": update.num_samples,
                "train-loss": float(update.train_loss),
                "info": info_to_json(update.info),
            }
        },
        "metrics": {
            "metrics": {k: float(v) for k, v in update.metrics.items()},
        },
    }
