"""The Flower ServerApp: ``FederatedTrainer.fit`` with Flower messages as the transport of client work.

``FlowerTrainer`` is the Fabric engine whose clients live on SuperNodes. The round loop, the plan, the
per-rank payloads, the fault filter, the aggregation (any ``Aggregator``: FediLoRA, FedAvg, HetLoRA,
FLoRA with its base merge, FlexLoRA, Local), evaluation, TensorBoard logs, checkpoints (resume with
run config ``ckpt-path``) and the results table are the inherited ones; only three steps differ:

- ``connect``: wait for ``data.num_clients`` SuperNodes and ask each (a QUERY message) for its client
  id and LoRA rank; the ranks the nodes report are the run's ranks.
- ``train_client``: at the first client of a round every sampled client gets a TRAIN message with its
  payload (the global adapter truncated to its rank, the head, and under FLoRA the merged base weights);
  then each reply is awaited in plan order. A node that fails, is lost or does not answer within
  ``round-timeout`` is left out of the round like a failing client of ``fedilora fit``.
- ``evaluate``: the global model on the server's global test set (as in ``fedilora fit``); every
  personalized model on its own client's test split through an EVALUATE message.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedilora.aggregation import ClientUpdate
from fedilora.data.datamodule import FederatedDataModule
from fedilora.errors import ConfigError
from fedilora.evaluation import evaluate_global, personalized_summary
from fedilora.flower.config import parse, resolve_path, set_threads
from fedilora.flower.records import to_arrays, update_from_record
from fedilora.model import LoRACLIPClassifier, State
from fedilora.server import Personal, strategy_name
from fedilora.trainer import FederatedTrainer


class ClientLost(RuntimeError):
    """A client's node failed, disconnected or did not answer in time (the client is left out)."""


class Inbox:
    """Messages pushed through the grid and their replies, pulled as they arrive."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.pending: dict[str, object] = {}  # message id -> key
        self.replies: dict[object, Message] = {}

    def send(self, messages: Mapping[object, Message]) -> None:
        keys = list(messages)
        for key, message_id in zip(keys, self.grid.push_messages([messages[k] for k in keys]), strict=True):
            self.pending[message_id] = key

    def wait(self, key: object, deadline: float) -> Message | None:
        """The reply for ``key``, or None if none came before ``deadline`` (``time.monotonic``)."""
        while key not in self.replies:
            if self.pending:
                for reply in self.grid.pull_messages(list(self.pending)):
                    owner = self.pending.pop(reply.metadata.reply_to_message_id, None)
                    if owner is not None:
                        self.replies[owner] = reply
            if key in self.replies or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return self.replies.pop(key, None)


def _reason(reply: Message | None, what: str, timeout: float) -> str | None:
    if reply is None:
        return f"no {what} reply within round-timeout={timeout:g} s"
    if reply.has_error():
        return f"{what} failed on its node (Flower error {reply.error.code}: {reply.error.reason})"
    return None


class FlowerTrainer(FederatedTrainer):
    """``FederatedTrainer`` whose clients are Flower SuperNodes (see the module docstring)."""

    grid: Grid | None = None

    def connect(self, grid: Grid, num_clients: int, node_timeout: float, round_timeout: float) -> None:
        """Wait for ``num_clients`` nodes, learn each one's client id and rank (QUERY)."""
        if self.aggregator.pooled:
            raise ConfigError(
                f"trainer.aggregator: {strategy_name(self.aggregator)} pools every client's data in one model and "
                "has no federated form; run it with `fedilora fit`"
            )
        self.grid, self.round_timeout = grid, round_timeout
        self._inbox, self._round_sent = Inbox(grid), None
        deadline = time.monotonic() + node_timeout
        nodes = sorted(grid.get_node_ids())
        while len(nodes) < num_clients:
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"data.num_clients is {num_clients} but {len(nodes)} SuperNode(s) connected within "
                    f"node-timeout={node_timeout:g} s; start one flower-supernode per client"
                )
            time.sleep(0.5)
            nodes = sorted(grid.get_node_ids())
        content = RecordDict({"config": ConfigRecord({"fedilora-config": self.config_yaml})})
        self._inbox.send({node: Message(content, dst_node_id=node, message_type=MessageType.QUERY) for node in nodes})
        found: dict[int, tuple[int, int]] = {}  # client id -> (node, rank)
        deadline = time.monotonic() + node_timeout
        for node in nodes:
            reply = self._inbox.wait(node, deadline)
            problem = _reason(reply, "query", node_timeout)
            if problem is not None:
                raise ConfigError(f"SuperNode {node}: {problem}")
            answer = reply.content.config_records["client"]
            if "error" in answer:
                raise ConfigError(f"SuperNode {node}: {answer['error']}")
            client, rank = int(answer["client-id"]), int(answer["rank"])
            if client in found:
                raise ConfigError(
                    f"SuperNodes {found[client][0]} and {node} both say partition-id={client}; give every "
                    "flower-supernode its own --node-config 'partition-id=K'"
                )
            found[client] = (node, rank)
        missing = sorted(set(range(num_clients)) - set(found))
        if missing:
            raise ConfigError(
                f"no SuperNode has partition-id {missing} (data.num_clients={num_clients}); nodes report "
                f"{sorted(found)}"
            )
        self._nodes = {client: node for client, (node, _) in found.items() if client < num_clients}
        self.ranks = [found[client][1] for client in range(num_clients)]
        self.fabric.print(
            f"flower: {len(self._nodes)} clients on SuperNodes {[self._nodes[k] for k in range(num_clients)]}, "
            f"ranks {self.ranks}"
        )

    # ------------------------------------------------------------------------------- messages
    def _base(self, model: LoRACLIPClassifier) -> ArrayRecord:
        """The base weights the aggregator changed so far (FLoRA's merges): every model copy needs them."""
        return to_arrays({m: model.base_weight(m) for m in self.server.merged_modules()})

    def _message(
        self,
        kind: str,
        model: LoRACLIPClassifier,
        round_: int,
        client: int,
        rank: int,
        lora: State,
        extra: State,
    ) -> Message:
        config = ConfigRecord({"fedilora-config": self.config_yaml, "round": round_, "client-id": client, "rank": rank})
        content = RecordDict(
            {"lora": to_arrays(lora), "extra": to_arrays(extra), "base": self._base(model), "config": config}
        )
        return Message(content, dst_node_id=self._nodes[client], message_type=kind, group_id=str(round_))

    # ------------------------------------------------------------------------ the engine's steps
    def train_client(
        self,
        model: LoRACLIPClassifier,
        datamodule: FederatedDataModule,
        round_: int,
        client: int,
        rank: int,
        lora: State,
        extra: State,
    ) -> ClientUpdate:
        if self._round_sent != round_:  # first client of the round: every sampled client starts now
            messages = {}
            for planned, planned_rank in self.server.plan(round_):
                payload = self.server.payload(planned, planned_rank)
                messages[planned] = self._message(MessageType.TRAIN, model, round_, planned, planned_rank, *payload)
            self._inbox.send(messages)
            self._round_sent, self._deadline = round_, time.monotonic() + self.round_timeout
        reply = self._inbox.wait(client, self._deadline)
        problem = _reason(reply, "train", self.round_timeout)
        if problem is not None:
            raise ClientLost(problem)
        fatal = reply.content.config_records.get("fatal")
        if fatal is not None:  # a data error on the client stops the run, as in `fedilora fit`
            raise ConfigError(f"client {client}: {fatal['error']}")
        process = reply.content.metric_records.get("process", {})
        self._builds["built"] += float(process.get("built", 0.0))
        self._builds["seconds"] += float(process.get("build-seconds", 0.0))
        update = update_from_record(reply.content)
        if (update.client_id, update.rank) != (client, rank):
            raise ClientLost(f"answered as client {update.client_id} of rank {update.rank}")
        return update

    def _run_round(self, model: LoRACLIPClassifier, datamodule: FederatedDataModule, round_: int) -> dict[str, float]:
        """The inherited round, plus how many client runtimes its TRAIN messages had to build (a fresh
        ClientApp process builds one; a kept runtime does not) and the seconds they took."""
        self._builds = {"built": 0.0, "seconds": 0.0}
        metrics = super()._run_round(model, datamodule, round_)
        metrics["flower/client_builds"] = self._builds["built"]
        metrics["flower/client_build_s"] = self._builds["seconds"]
        return metrics

    def evaluate(self, model: LoRACLIPClassifier, datamodule: FederatedDataModule) -> dict[str, float]:
        metrics = evaluate_global(model, self.fabric, datamodule, self.server.global_models())
        personal: Mapping[int, Personal] = self.server.personalized_models(datamodule.num_clients)
        messages = {
            client: self._message(MessageType.EVALUATE, model, -1, client, rank, lora, extra)
            for client, (rank, lora, extra) in personal.items()
        }
        self._inbox.send(messages)
        deadline = time.monotonic() + self.round_timeout
        per_client: dict[int, dict[str, float]] = {}
        for client in sorted(messages):
            reply = self._inbox.wait(client, deadline)
            problem = _reason(reply, "evaluate", self.round_timeout)
            if problem is not None:
                self.fabric.print(f"warning: client {client}: personalized evaluation left out ({problem})")
                continue
            fatal = reply.content.config_records.get("fatal")
            if fatal is not None:
                raise ConfigError(f"client {client}: {fatal['error']}")
            if reply.content.config_records["evaluation"]["evaluated"]:
                per_client[client] = dict(reply.content.metric_records["metrics"])
        metrics.update(personalized_summary(per_client))
        return metrics


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """One federated run from the run config: ``config`` (the YAML of ``fedilora fit``), ``overrides``
    (more ``fedilora fit`` arguments), ``ckpt-path`` (resume), ``node-timeout``, ``round-timeout``."""
    run_config = context.run_config
    set_threads()
    path = resolve_path(str(run_config["config"]), [Path.cwd()])
    parsed = parse(str(path), str(run_config.get("overrides", "")), trainer_class=FlowerTrainer)
    trainer: FlowerTrainer = parsed.trainer
    trainer.connect(
        grid,
        parsed.datamodule.num_clients,
        node_timeout=float(run_config.get("node-timeout", 600.0)),
        round_timeout=float(run_config.get("round-timeout", 3600.0)),
    )
    ckpt_path = str(run_config.get("ckpt-path", "")) or None
    trainer.fit(parsed.model, parsed.datamodule, ckpt_path=ckpt_path)
