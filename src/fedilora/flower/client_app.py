"""The Flower ClientApp: one client of ``fedilora fit`` on its own SuperNode.

The work is ``fedilora.flower.client_work.handle`` (query, train, evaluate; see there). Where it runs:

- in this process (default). The simulation engine keeps its worker processes for the whole run, so
  the client runtime (parsed config, data, frozen backbone) is built once per worker and reused; a
  deployed SuperNode starts a fresh process per message (Flower 1.42 has no long-lived ClientApp), which
  then imports and builds everything again;
- in the node's keep-alive worker (``--node-config '... keep-alive=SECONDS'``, ``fedilora.flower.worker``),
  which keeps the runtime across messages of a deployed node. This module then imports no model code.

What a client keeps between messages of a run (secure aggregation: its contribution, masking key and
personalized model) is in ``Context.state``, which the SuperNode holds for the run (deployment: in the
SuperNode's state, handed to each fresh ClientApp process and taken back with its reply; simulation: in
the engine's node state). It never leaves the node.

Message types: ``query``, ``train``, ``evaluate``, and under secure aggregation ``train.keys`` (a fresh
key pair) and ``train.mask`` (the masked contribution).

Node config: ``partition-id`` (which client this node is; required in deployment), ``rank`` (its LoRA
rank; default: ``trainer.ranks`` of the config), ``keep-alive`` (seconds; 0 or absent: off).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedilora.flower.records import record_arrays, reply_to_records


def _request(kind: str, message: Message, context: Context) -> dict[str, Any]:
    content, state = message.content, context.state
    return {
        "kind": kind,
        "config": dict(content.config_records["config"]),
        "node_config": dict(context.node_config),
        "arrays": {name: record_arrays(record) for name, record in content.array_records.items()},
        "state": {
            "config": {name: dict(record) for name, record in state.config_records.items()},
            "arrays": {name: record_arrays(record) for name, record in state.array_records.items()},
        },
    }


def _keep(state: dict[str, dict[str, Any]], context: Context) -> None:
    """The records a reply's ``state`` names replace those of ``Context.state`` (None deletes one)."""
    for kind, make in (("config", ConfigRecord), ("arrays", None)):
        for name, values in state.get(kind, {}).items():
            if values is None:
                if name in context.state:
                    del context.state[name]
            elif make is not None:
                context.state[name] = make(dict(values))
            else:
                context.state[name] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in values.items()})


def _reply(kind: str, message: Message, context: Context) -> Message:
    request = _request(kind, message, context)
    keep_alive = float(context.node_config.get("keep-alive", 0))
    if keep_alive > 0:
        from fedilora.flower.worker import call

        reply = call(request, context.node_id, keep_alive)
    else:
        from fedilora.flower.client_work import handle

        reply = handle(request)
    _keep(reply.pop("state", {}), context)
    return Message(reply_to_records(reply), reply_to=message)


app = ClientApp()


@app.query()
def query(message: Message, context: Context) -> Message:
    return _reply("query", message, context)


@app.train()
def train(message: Message, context: Context) -> Message:
    return _reply("train", message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return _reply("evaluate", message, context)


@app.train("keys")
def keys(message: Message, context: Context) -> Message:
    return _reply("keys", message, context)


@app.train("mask")
def mask(message: Message, context: Context) -> Message:
    return _reply("mask", message, context)
