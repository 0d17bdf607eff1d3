"""The Flower ClientApp: one client of ``fedilora fit`` on its own SuperNode.

The work is ``fedilora.flower.client_work.handle`` (query, train, evaluate; see there). Where it runs:

- in this process (default). The simulation engine keeps its worker processes for the whole run, so
  the client runtime (parsed config, data, frozen backbone) is built once per worker and reused; a
  deployed SuperNode starts a fresh process per message (Flower 1.42 has no long-lived ClientApp), which
  then imports and builds everything again;
- in the node's keep-alive worker (``--node-config '... keep-alive=SECONDS'``, ``fedilora.flower.worker``),
  which keeps the runtime across messages of a deployed node. This module then imports no model code.

Node config: ``partition-id`` (which client this node is; required in deployment), ``rank`` (its LoRA
rank; default: ``trainer.ranks`` of the config), ``keep-alive`` (seconds; 0 or absent: off).
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedilora.flower.records import record_arrays, reply_to_records


def _request(kind: str, message: Message, context: Context) -> dict[str, Any]:
    content = message.content
    return {
        "kind": kind,
        "config": dict(content.config_records["config"]),
        "node_config": dict(context.node_config),
        "arrays": {name: record_arrays(record) for name, record in content.array_records.items()},
    }


def _reply(kind: str, message: Message, context: Context) -> Message:
    request = _request(kind, message, context)
    keep_alive = float(context.node_config.get("keep-alive", 0))
    if keep_alive > 0:
        from fedilora.flower.worker import call

        reply = call(request, context.node_id, keep_alive)
    else:
        from fedilora.flower.client_work import handle

        reply = handle(request)
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
