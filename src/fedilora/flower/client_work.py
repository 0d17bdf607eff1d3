"""What a Flower client does with one message, on plain data (no Flower types): shared by the ClientApp
process and by the node's keep-alive worker (``fedilora.flower.worker``).

A request is ``{"kind": "query" | "train" | "evaluate" | "keys" | "mask", "config": {...}, "node_config":
{...}, "arrays": {"lora": {name: ndarray}, "extra": ..., "base": ...}, "state": {"config": {record: {...}},
"arrays": {record: {name: ndarray}}}}``; a reply is ``{"config": {record:
{...}}, "metrics": {record: {...}}, "arrays": {record: {name: ndarray}}}``, the records of the reply
message. Every request carries the resolved fedilora config; the node config says which client this
node is (``partition-id``) and may set its rank (``rank``; default ``trainer.ranks`` of the config).

- query: client id, rank and number of training samples (the server plans rounds with them);
- train: ``fedilora.client.fit_client`` from the payload, with the config's callbacks (e.g.
  ``ModelEditing``); a data error goes back as ``fatal`` (the server stops the run, as ``fedilora fit`` does);
- evaluate: the personalized model sent by the server, on this client's test split.

Under secure aggregation (the server sets ``secure-aggregation`` in the message config) no update leaves
the node in the clear:

- train: after ``fit_client`` the client checks its update (``check_update``: finite, within
  ``max_update_norm``; a failing update is refused here and the server leaves the client out), computes
  its contribution to the round's sums itself (``client_contribution``: under DP clipped with the clip
  norm the server sends), keeps it with its personalized model and a fresh X25519 key pair, and replies
  its report (client id, rank, samples, loss, metrics, info) and the public key only;
- keys: a fresh key pair for the kept contribution (a masking pass redone among the survivors);
- mask: the kept contribution masked against the other participants' public keys (``secagg.mask``):
  one int64 vector. The private key is deleted after one use: a key never masks twice;
- evaluate (``kept``): the personalized model this client kept.

What the client keeps between messages is the request's ``state`` (records of the ClientApp's
``Context.state``, which the SuperNode holds for the run); a reply's ``state`` replaces the records it
names (None deletes one).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import yaml

from fedilora.callbacks import hook_caller
from fedilora.client import fit_client
from fedilora.errors import ConfigError
from fedilora.evaluation import evaluate_state
from fedilora.flower.config import Parsed, parse, set_threads
from fedilora.flower.records import info_to_json
from fedilora.model import State
from fedilora.privacy.rounds import client_contribution
from fedilora.privacy.secagg import MaskingKey, mask
from fedilora.server import check_update, client_ranks

Request = dict[str, Any]
Reply = dict[str, Any]


class ClientRuntime:
    """What one process needs to serve clients of one config: the parsed config, the data and the model
    with its frozen backbone, built in the order ``fedilora fit`` builds them (a random-init backbone is
    then the same tensor bit for bit). One model serves every client of the process: a client is its
    rank's adapter, its received state and its data.

    Args:
        config_yaml: The resolved config the server sent.
        data_path: A node's own data file (node config ``data-path``): it replaces the path of the
            config's file dataset (e.g. ``fedilora.data.generic.MultimodalTable``) and is this node's
            only client (data index 0); ``client`` picks its missing rate from a per-client list.
    """

    def __init__(self, config_yaml: str, data_path: str | None = None, client: int = 0) -> None:
        started = time.perf_counter()
        data = (yaml.safe_load(config_yaml) or {}).get("data") or {}
        self.num_clients = int(data.get("num_clients", 1))  # of the federation, whatever this node holds
        overrides = []
        if data_path is not None:
            dataset = data.get("dataset") or {}
            if "path" not in (dataset.get("init_args") or {}):
                raise ConfigError(
                    f"node config: data-path needs a file dataset in the config (data.dataset with a path, e.g. "
                    f"fedilora.data.generic.MultimodalTable), not {dataset.get('class_path', dataset)}"
                )
            rate = data.get("missing_rate", 0.0)
            rate = rate[client] if isinstance(rate, list) else rate
            overrides = [f"--data.dataset.init_args.path={data_path}", "--data.num_clients=1"]
            overrides.append(f"--data.missing_rate={rate}")
        self.own_data = data_path is not None
        self.parsed: Parsed = parse(config_yaml, overrides)
        trainer, model, datamodule = self.parsed.trainer, self.parsed.model, self.parsed.datamodule
        self.fabric = trainer.fabric
        self.fabric.seed_everything(trainer.seed, verbose=False)
        datamodule.setup("fit")
        model.configure_model()
        model.to(self.fabric.device)
        self.call = hook_caller(trainer.callbacks, trainer=None)  # a client has no engine: trainer=None
        self._pristine: dict[str, torch.Tensor] = {}  # base weights as built, of modules a merge changed
        self.build_seconds = time.perf_counter() - started

    def identity(self, node_config: Mapping[str, Any]) -> tuple[int, int]:
        return node_identity(node_config, self.num_clients, self.parsed.trainer.ranks)

    def data_index(self, client: int) -> int:
        """Where ``client``'s splits are in this runtime's datamodule."""
        return 0 if self.own_data else client

    def prepare(self, rank: int, base: State, extra: State) -> None:
        """An adapter of ``rank``, the base weights the server's aggregator merged (FLoRA), and a check
        that the head sent fits this node's data."""
        model = self.parsed.model
        own = {k: tuple(v.shape) for k, v in model.extra_state().items()}
        sent = {k: tuple(v.shape) for k, v in extra.items()}
        if own != sent:
            differ = [k for k in own if k in sent and own[k] != sent[k]] or sorted(own.keys() ^ sent.keys())
            key = differ[0]
            raise ConfigError(
                f"node config: data-path gives {model.num_classes} classes ({self.parsed.datamodule.task}) but the "
                f"federation's head differs ({key}: {own.get(key)} here, {sent.get(key)} sent); list "
                "data.dataset.init_args.classes in the config"
            )
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


def runtime_for(config_yaml: str, node_config: Mapping[str, Any]) -> ClientRuntime:
    """The runtime of this config (and node data file), built on first use and kept in this process
    (one at a time); ``FEDILORA_FLOWER_CACHE=0`` rebuilds it for every message."""
    data_path = node_config.get("data-path")
    data_path = None if data_path in (None, "") else str(data_path)
    client = node_config.get("partition-id", 0) if data_path is not None else 0
    key = hashlib.sha256(f"{config_yaml}\0{data_path}\0{client}".encode()).hexdigest()
    if key not in _RUNTIMES or os.environ.get("FEDILORA_FLOWER_CACHE", "1") == "0":
        _RUNTIMES.clear()
        set_threads()
        _RUNTIMES[key] = ClientRuntime(config_yaml, data_path, client if isinstance(client, int) else 0)
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
        runtime = runtime_for(str(config["fedilora-config"]), node_config)
        client, rank = runtime.identity(node_config)
    except ConfigError as err:
        key = "client" if kind == "query" else "fatal"
        return {"config": {key: {"error": str(err)}}}
    datamodule, trainer, index = runtime.parsed.datamodule, runtime.parsed.trainer, runtime.data_index(client)
    if kind == "query":
        answer = {"client-id": client, "rank": rank, "num-samples": datamodule.num_train_samples(index)}
        return {"config": {"client": answer}}
    if client != int(config["client-id"]):
        raise RuntimeError(f"this node is client {client}, the message is for client {config['client-id']}")
    if kind in ("keys", "mask"):
        return _masking(kind, request, client)
    arrays = {name: _tensors(request["arrays"].get(name, {})) for name in ("lora", "extra", "base")}
    if kind == "evaluate" and config.get("kept", False):  # secure aggregation: the model this client kept
        kept = request.get("state", {}).get("config", {}).get(PERSONAL)
        if kept is None:  # e.g. a node restarted since it trained: nothing to evaluate
            return {"config": {"evaluation": {"evaluated": False}}}
        saved = request["state"]["arrays"]
        config = {**config, "rank": int(kept["rank"])}
        arrays["lora"], arrays["extra"] = _tensors(saved[PERSONAL_LORA]), _tensors(saved[PERSONAL_EXTRA])
    if kind == "evaluate":
        rank = int(config["rank"])  # the personalized model's rank (this client's, as it trained)
        try:
            runtime.prepare(rank, arrays["base"], arrays["extra"])
        except ConfigError as err:
            return {"config": {"fatal": {"error": str(err)}}}
        loader = datamodule.client_dataloader(index, "test")
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
    try:
        runtime.prepare(rank, arrays["base"], arrays["extra"])
        update = fit_client(
            runtime.parsed.model,
            runtime.fabric,
            lambda generator: datamodule.client_dataloader(index, "train", generator),
            datamodule.num_train_samples(index),
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
    if config.get("secure-aggregation", False):
        return _masked_train(runtime, config, arrays, update)
    return {
        "arrays": {"lora": _numpy(update.lora), "extra": _numpy(update.extra)},
        "config": {"update": _report(update)},
        "metrics": {
            "metrics": {k: float(v) for k, v in update.metrics.items()},
        },
    }


def _report(update) -> dict[str, Any]:
    return {
        "client-id": update.client_id,
        "rank": update.rank,
        "num-samples": update.num_samples,
        "train-loss": float(update.train_loss),
        "info": info_to_json(update.info),
    }


# ------------------------------------------------------------------------- secure aggregation (client)
PERSONAL, PERSONAL_LORA, PERSONAL_EXTRA = "fedilora-personal", "fedilora-personal-lora", "fedilora-personal-extra"
MASKING, CONTRIBUTION = "fedilora-masking", "fedilora-contribution"


def _masked_train(runtime: ClientRuntime, config: Mapping[str, Any], arrays: dict[str, State], update) -> Reply:
    """Check the update, compute and keep the contribution and the personalized model; reply the report
    and a public key, no tensor."""
    trainer = runtime.parsed.trainer
    update.lora = {k: v.detach().cpu() for k, v in update.lora.items()}
    update.extra = {k: v.detach().cpu() for k, v in update.extra.items()}
    forget = {MASKING: None, CONTRIBUTION: None}  # whatever an earlier round left
    problem = check_update(update, arrays["lora"], arrays["extra"], trainer.max_update_norm)
    update.metrics.pop("update_norm", None)  # a property of this one update: it stays here
    if problem is not None:
        return {"config": {"refused": {"reason": problem}}, "state": {"config": forget, "arrays": forget}}
    privacy = trainer.privacy
    if privacy is not None:  # the clip norm is the server's (adaptive clipping moves it between rounds)
        privacy.clip_norm = float(config["clip-norm"])
    contribution = client_contribution(
        trainer.aggregator, arrays["lora"], arrays["extra"], int(config["global-rank"]), update, privacy
    )
    key = MaskingKey()
    state = {
        "config": {
            MASKING: {"round": int(config["round"]), "private-key": key.private},
            PERSONAL: {"rank": update.rank, "round": int(config["round"])},
        },
        "arrays": {
            CONTRIBUTION: _numpy(contribution),
            PERSONAL_LORA: _numpy(update.lora),
            PERSONAL_EXTRA: _numpy(update.extra),
        },
    }
    return {
        "config": {"update": _report(update), "secagg": {"public-key": key.public}},
        "metrics": {"metrics": {k: float(v) for k, v in update.metrics.items()}},
        "state": state,
    }


def _masking(kind: str, request: Request, client: int) -> Reply:
    """A fresh key pair (``keys``), or the kept contribution masked with the kept key (``mask``)."""
    config, state = request["config"], request.get("state", {})
    masking = state.get("config", {}).get(MASKING)
    round_ = int(config["round"])
    if masking is None or int(masking["round"]) != round_ or CONTRIBUTION not in state.get("arrays", {}):
        raise RuntimeError(f"client {client} holds no contribution of round {round_} to mask")
    if kind == "keys":
        key = MaskingKey()
        masking = {"round": round_, "private-key": key.private}
        return {"config": {"secagg": {"public-key": key.public}}, "state": {"config": {MASKING: masking}}}
    if "private-key" not in masking:
        raise RuntimeError(f"client {client}: its key of round {round_} has masked once already; a pass needs new keys")
    peers = dict(zip(config["peers"], config["public-keys"], strict=True))
    if client not in peers:
        raise RuntimeError(f"client {client} is not among the participants {sorted(peers)} it is asked to mask with")
    contribution = _tensors(state["arrays"][CONTRIBUTION])
    masked = mask(
        contribution,
        client,
        MaskingKey(bytes(masking["private-key"])),
        peers,
        bytes(config["context"]),
        int(config["fraction-bits"]),
    )
    used = {"round": round_}  # the private key is gone: a second mask with it would reveal mask differences
    return {
        "arrays": {"masked": {"vector": masked.numpy()}},
        "state": {"config": {MASKING: used}},
    }
