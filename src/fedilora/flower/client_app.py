"""The Flower ClientApp: one client of ``fedilora fit`` on its own SuperNode.

Every message carries the resolved fedilora config; the node config says which client this node is
(``partition-id``, required) and may set its LoRA rank (``rank``; default: ``trainer.ranks`` of the
config for this client). In simulation Flower sets ``partition-id`` itself.

- QUERY: client id, rank and number of training samples (the server plans rounds with them).
- TRAIN: ``fedilora.client.fit_client`` from the payload, with the config's callbacks (e.g.
  ``ModelEditing``); the update goes back (a data error goes back as ``fatal`` and stops the run).
- EVALUATE: the personalized model sent by the server on this client's test split.

What survives between messages is the ``ClientRuntime`` (parsed config, data, frozen backbone): kept in
this process for the next message. The simulation engine keeps its worker processes for the whole run,
so a client is built once per worker; a deployed SuperNode starts a fresh process per message (Flower
1.42 has no long-lived ClientApp), which then rebuilds it (see experiments/bench_flower.py).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedilora.callbacks import hook_caller
from fedilora.client import fit_client
from fedilora.errors import ConfigError
from fedilora.evaluation import evaluate_state
from fedilora.flower.config import Parsed, parse
from fedilora.flower.records import from_arrays, update_to_record
from fedilora.model import State
from fedilora.server import client_ranks


class ClientRuntime:
    """What one process needs to serve clients of one config: the parsed config, the data and the model
    with its frozen backbone, built in the order ``fedilora fit`` builds them (so that a random-init
    backbone is the same tensor bit for bit)."""

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

    def identity(self, node_config: Mapping) -> tuple[int, int]:
        """(client id, rank) of this node: ``partition-id`` and ``rank`` of its node config."""
        if "partition-id" not in node_config:
            raise ConfigError(
                "node config: partition-id is missing; start the SuperNode with --node-config 'partition-id=K'"
            )
        client = int(node_config["partition-id"])
        if not 0 <= client < self.num_clients:
            raise ConfigError(f"node config: partition-id={client} is outside [0, data.num_clients={self.num_clients})")
        if "rank" in node_config:
            rank = int(node_config["rank"])
            if rank < 1:
                raise ConfigError(f"node config: rank={rank} must be a positive integer")
        else:
            rank = client_ranks(self.parsed.trainer.ranks, self.num_clients)[client]
        return client, rank

    def prepare(self, rank: int, base: State) -> None:
        """An adapter of ``rank`` and the base weights the server's aggregator merged (FLoRA)."""
        model = self.parsed.model
        if rank not in model.ranks:
            model.add_ranks([rank])
        for module in base.keys() - self._pristine.keys():
            self._pristine[module] = model.base_weight(module).detach().clone()
        model.load_base_weights({**self._pristine, **base})  # modules not sent are back to their build


_RUNTIMES: dict[str, ClientRuntime] = {}


def runtime_for(config_yaml: str) -> ClientRuntime:
    """The runtime of this config, built on first use and kept in this process (one config at a time)."""
    key = hashlib.sha256(config_yaml.encode()).hexdigest()
    if key not in _RUNTIMES:
        _RUNTIMES.clear()
        threads = int(os.environ.get("FEDILORA_FLOWER_THREADS", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        _RUNTIMES[key] = ClientRuntime(config_yaml)
    return _RUNTIMES[key]


def _received(message: Message) -> tuple[ClientRuntime, dict, State, State, State]:
    config = dict(message.content.config_records["config"])
    runtime = runtime_for(str(config["fedilora-config"]))
    arrays = message.content.array_records
    return runtime, config, from_arrays(arrays["lora"]), from_arrays(arrays["extra"]), from_arrays(arrays["base"])


app = ClientApp()


@app.query()
def query(message: Message, context: Context) -> Message:
    try:
        runtime = runtime_for(str(message.content.config_records["config"]["fedilora-config"]))
        client, rank = runtime.identity(context.node_config)
        answer = {"client-id": client, "rank": rank, "num-samples": runtime.parsed.datamodule.num_train_samples(client)}
    except ConfigError as err:
        answer = {"error": str(err)}
    return Message(RecordDict({"client": ConfigRecord(answer)}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    runtime, config, lora, extra, base = _received(message)
    client, rank = runtime.identity(context.node_config)
    if (client, rank) != (int(config["client-id"]), int(config["rank"])):
        raise RuntimeError(f"this node is client {client} of rank {rank}, the message is for {config['client-id']}")
    trainer, datamodule = runtime.parsed.trainer, runtime.parsed.datamodule
    runtime.prepare(rank, base)
    try:
        update = fit_client(
            runtime.parsed.model,
            runtime.fabric,
            lambda generator: datamodule.client_dataloader(client, "train", generator),
            datamodule.num_train_samples(client),
            round=int(config["round"]),
            client_id=client,
            rank=rank,
            lora=lora,
            extra=extra,
            seed=trainer.seed,
            local_epochs=trainer.local_epochs,
            max_local_steps=trainer.max_local_steps,
            call=runtime.call,
        )
    except ConfigError as err:
        return Message(RecordDict({"fatal": ConfigRecord({"error": str(err)})}), reply_to=message)
    return Message(update_to_record(update), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    runtime, config, lora, extra, base = _received(message)
    client, _ = runtime.identity(context.node_config)
    rank = int(config["rank"])  # the personalized model's rank (this client's, as trained)
    runtime.prepare(rank, base)
    loader = runtime.parsed.datamodule.client_dataloader(client, "test")
    evaluated = len(loader) > 0
    metrics = evaluate_state(runtime.parsed.model, runtime.fabric, (rank, lora, extra), loader) if evaluated else {}
    content = RecordDict({"metrics": MetricRecord(metrics), "evaluation": ConfigRecord({"evaluated": evaluated})})
    return Message(content, reply_to=message)
