"""The Flower ServerApp: ``FederatedTrainer.fit`` with Flower messages as the transport of client work.

``FlowerTrainer`` is the Fabric engine whose clients live on SuperNodes. A round is ``fedilora.round.run_round``
(plan, per-rank payloads, fault filter, aggregation by any ``Aggregator``, FLoRA's base merge); evaluation,
TensorBoard logs, checkpoints (resume with run config ``ckpt-path``) and the results table are the inherited
ones; three steps differ:

- ``connect``: wait for ``data.num_clients`` SuperNodes and ask each (a QUERY message) for its client
  id and LoRA rank; the ranks the nodes report are the run's ranks.
- the round's transport, ``FlowerPool``: every sampled client gets a TRAIN message with its payload (the
  global adapter truncated to its rank, the head, and under FLoRA the merged base weights) and all replies
  are awaited (up to ``round-timeout``) before any is read. A node that fails, is lost or does not answer
  in time is left out of the round like a failing client of ``fedilora fit``.
- ``evaluate``: the global model on the server's global test set (as in ``fedilora fit``); every
  personalized model on its own client's test split through an EVALUATE message.

Two losses stop the run instead (``RunFailed``), before the round under way is aggregated, so that no
checkpoint ever holds a round that did not run: a round in which every sampled client was lost (no
node answered: a federation without its nodes trains nothing), and a SuperLink that is gone or no
longer serves the run (``SuperLinkLost``). Flower's grid retries a SuperLink it cannot reach forever;
``connect`` bounds that to ``link-timeout`` seconds (run config, default 60, at most ``round-timeout``),
so a ServerApp whose SuperLink was killed ends instead of waiting, orphaned, for a link that will not
come back. On the way out the last completed round is saved (as on Ctrl-C), to resume from with
``ckpt-path=last`` once the SuperLink and every SuperNode are restarted.

With ``trainer.secure_aggregation`` the server never sees an update (``_masked_round``): TRAIN replies
carry each client's report and a public key only; a second message per pass (``train.mask``) relays the
participants' public keys and returns each client's masked contribution, which the server adds
(``unmask_sum``) and releases (``FederatedServer.aggregate_sums``: the simulator's ``release``, with the
server's noise under DP). A client lost after TRAIN or during a pass is left out and the pass is redone
among the others with fresh keys (``train.keys``); training is not repeated. The personalized models
stay on the clients (EVALUATE asks each to evaluate the one it kept), so the server's checkpoint has
none; the norm rule over the round (``update_norm_factor``) cannot run on masked vectors: clipping on
the client (DP) is the defence, and each client checks finiteness and ``max_update_norm`` itself.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedilora.aggregation import ClientUpdate
from fedilora.checkpoint import Stopped
from fedilora.client import Interrupted
from fedilora.data.datamodule import FederatedDataModule
from fedilora.errors import ConfigError, RunFailed
from fedilora.evaluation import evaluate_global, personalized_summary
from fedilora.flower.config import parse, resolve_path, set_threads
from fedilora.flower.records import report_from_record, to_arrays, update_from_record
from fedilora.model import LoRACLIPClassifier, State
from fedilora.privacy.rounds import layout
from fedilora.round import Payloads, Plan, RoundUploads, record
from fedilora.server import Personal, RoundResult, strategy_name
from fedilora.trainer import FederatedTrainer

T = TypeVar("T")
LINK_TIMEOUT = 60.0  # default seconds a grid call may retry an unreachable SuperLink (run config link-timeout)
RESTART = (
    "restart the SuperLink if it is gone and every SuperNode (they exit by themselves after a few reconnection "
    "attempts), then resume with run config ckpt-path=last"
)


class ClientLost(RuntimeError):
    """A client's node failed, disconnected or did not answer in time (the client is left out)."""


class SuperLinkLost(RunFailed):
    """The SuperLink cannot be reached or no longer serves this run: the run stops."""


class AllClientsLost(RunFailed):
    """No sampled client of a round answered: the run stops rather than record a round that did not run."""


def bound_retries(grid: Grid, seconds: float) -> bool:
    """Make the grid give up on an unreachable SuperLink after ``seconds`` (Flower retries forever).

    Flower's HTTP grid (1.42) sends every call, its heartbeats and log uploads included, through one
    ``RetryInvoker`` with neither ``max_tries`` nor ``max_time``; ``max_time`` is read at every retry,
    so setting it bounds the calls under way too. False where the grid has no such invoker (the
    simulation's in-memory grid, which has no link to lose)."""
    invoker = getattr(grid, "_retry_invoker", None)
    if invoker is None or not hasattr(invoker, "max_time"):
        return False
    invoker.max_time = seconds
    return True


class Inbox:
    """Messages pushed through the grid and their replies, pulled as they arrive.

    A failing grid call (the SuperLink gone, past ``bound_retries``, or refusing the run) raises
    ``SuperLinkLost``, and so does every later call: the link is not tried again. While waiting, a true
    ``stop()`` (a SIGINT or SIGTERM seen by the trainer) raises ``Interrupted``: waiting for replies is
    the server's safe point, as an optimizer step is a client's."""

    def __init__(self, grid: Grid, stop: Callable[[], object] = lambda: False) -> None:
        self.grid, self.stop = grid, stop
        self.pending: dict[str, object] = {}  # message id -> key
        self.replies: dict[object, Message] = {}
        self.sent: dict[object, float] = {}  # key -> when its message was pushed (time.monotonic)
        self.arrived: dict[object, float] = {}  # key -> when its reply was pulled
        self.lost: SuperLinkLost | None = None

    def link(self, what: str, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)``, a grid call; ``SuperLinkLost`` if it fails."""
        if self.lost is not None:
            raise self.lost
        try:
            return call(*args)
        except Exception as err:  # transport errors past the retries, or Flower's "run not running"
            reason = f"{type(err).__name__}: {err}".strip().splitlines()[0]
            self.lost = SuperLinkLost(f"the SuperLink is gone or no longer serves this run ({what} failed: {reason})")
            raise self.lost from None

    def send(self, messages: Mapping[object, Message]) -> None:
        keys = list(messages)
        now = time.monotonic()
        pushed = self.link("pushing messages", self.grid.push_messages, [messages[k] for k in keys])
        for key, message_id in zip(keys, pushed, strict=True):
            self.pending[message_id] = key
            self.sent[key] = now

    def wait(self, key: object, deadline: float) -> Message | None:
        """The reply for ``key``, or None if none came before ``deadline`` (``time.monotonic``)."""
        while key not in self.replies:
            if self.stop():
                raise Interrupted
            if self.pending:
                for reply in self.link("pulling replies", self.grid.pull_messages, list(self.pending)):
                    owner = self.pending.pop(reply.metadata.reply_to_message_id, None)
                    if owner is not None:
                        self.replies[owner] = reply
                        self.arrived[owner] = time.monotonic()
            if key in self.replies or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return self.replies.pop(key, None)

    def forget(self, keys: object) -> None:
        """Drop what is pending or arrived for ``keys`` (a late reply to a finished pass is never read)."""
        keys = set(keys)
        self.pending = {m: k for m, k in self.pending.items() if k not in keys}
        for key in keys:
            self.replies.pop(key, None)


def _reason(reply: Message | None, what: str, timeout: float) -> str | None:
    if reply is None:
        return f"no {what} reply within round-timeout={timeout:g} s"
    if reply.has_error():
        return f"{what} failed on its node (Flower error {reply.error.code}: {reply.error.reason})"
    return None


class FlowerTrainer(FederatedTrainer):
    """``FederatedTrainer`` whose clients are Flower SuperNodes (see the module docstring)."""

    grid: Grid | None = None

    def connect(
        self,
        grid: Grid,
        num_clients: int,
        node_timeout: float,
        round_timeout: float,
        link_timeout: float = LINK_TIMEOUT,
    ) -> None:
        """Wait for ``num_clients`` nodes, learn each one's client id and rank (QUERY); a SuperLink that
        cannot be reached for ``min(link_timeout, round_timeout)`` seconds ends the run (``SuperLinkLost``)."""
        if self.aggregator.pooled:
            raise ConfigError(
                f"trainer.aggregator: {strategy_name(self.aggregator)} pools every client's data in one model and "
                "has no federated form; run it with `fedilora fit`"
            )
        if not link_timeout > 0:
            raise ConfigError(f"link-timeout (run config): must be > 0 seconds, got {link_timeout}")
        self.grid, self.round_timeout = grid, round_timeout
        bound_retries(grid, min(link_timeout, round_timeout))
        self._inbox = Inbox(grid, stop=lambda: self._interrupted)
        self._kept: dict[int, int] = {}  # secure aggregation: client -> rank of the personalized model it keeps
        deadline = time.monotonic() + node_timeout
        nodes = sorted(self._inbox.link("listing the nodes", grid.get_node_ids))
        while len(nodes) < num_clients:
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"data.num_clients is {num_clients} but {len(nodes)} SuperNode(s) connected within "
                    f"node-timeout={node_timeout:g} s; start one flower-supernode per client"
                )
            time.sleep(0.5)
            nodes = sorted(self._inbox.link("listing the nodes", grid.get_node_ids))
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
        config = {"fedilora-config": self.config_yaml, "round": round_, "client-id": client, "rank": rank}
        if self.secure_aggregation is not None:
            config.update({"secure-aggregation": True, "global-rank": self.server.global_rank})
            if self.privacy is not None:
                config["clip-norm"] = float(self.privacy.clip_norm)
            if kind == MessageType.EVALUATE:
                config["kept"] = True  # the client evaluates the personalized model it kept
        arrays = {"lora": to_arrays(lora), "extra": to_arrays(extra), "base": self._base(model)}
        content = RecordDict({**arrays, "config": ConfigRecord(config)})
        return Message(content, dst_node_id=self._nodes[client], message_type=kind, group_id=str(round_))

    # ------------------------------------------------------------------------ the engine's steps
    def _update(self, reply: Message | None, client: int, rank: int) -> ClientUpdate:
        """The update in ``client``'s TRAIN reply; ``ClientLost`` if there is none."""
        problem = _reason(reply, "train", self.round_timeout)
        if problem is not None:
            raise ClientLost(problem)
        fatal = reply.content.config_records.get("fatal")
        if fatal is not None:  # a data error on the client stops the run, as in `fedilora fit`
            raise ConfigError(f"client {client}: {fatal['error']}")
        self._count_build(reply.content, client)
        update = update_from_record(reply.content)
        if (update.client_id, update.rank) != (client, rank):
            raise ClientLost(f"answered as client {update.client_id} of rank {update.rank}")
        return update

    def _run_round(self, model: LoRACLIPClassifier, datamodule: FederatedDataModule, round_: int) -> dict[str, float]:
        """``run_round`` over Flower messages, plus how many client runtimes its TRAINs built (a fresh
        ClientApp process builds one; a kept runtime does not), their seconds, and per client the median
        of the trip (TRAIN pushed to reply pulled) and of the work on the node within it."""
        self._builds = {"built": 0.0, "seconds": 0.0, "trips": [], "work": []}
        if self.secure_aggregation is None:
            metrics = self._round(model, FlowerPool(self, model), round_)
        else:
            metrics = self._masked_round(model, round_)
        metrics["flower/client_builds"] = self._builds["built"]
        metrics["flower/client_build_s"] = self._builds["seconds"]
        if self._builds["trips"]:
            metrics["flower/trip_s"] = statistics.median(self._builds["trips"])
            metrics["flower/client_work_s"] = statistics.median(self._builds["work"])
        return metrics

    def _stop_if_all_lost(self, round_: int, problems: Mapping[int, str | None]) -> None:
        """``AllClientsLost`` when no client of the round answered (``problems``: client -> why lost, or None)."""
        if problems and all(problems.values()):
            first, why = next(iter(problems.items()))
            raise AllClientsLost(
                f"round {round_}: every one of its {len(problems)} sampled clients was lost (client {first}: {why})"
            )

    def fit(self, model: LoRACLIPClassifier, datamodule: FederatedDataModule, ckpt_path: str | None = None) -> dict:
        """``FederatedTrainer.fit``; a lost SuperLink or a round that lost all its clients ends it with
        ``RunFailed``, after saving the last completed round (never the round under way)."""
        try:
            return super().fit(model, datamodule, ckpt_path=ckpt_path)
        except Stopped as err:  # SIGINT/SIGTERM (Flower's own when its SuperExec is gone): end as a failed run
            raise RunFailed(f"the ServerApp was stopped by {err} (what it saved is printed above); {RESTART}") from None
        except (SuperLinkLost, AllClientsLost) as err:
            if getattr(self, "_bar", None) is not None:
                self._bar.close()
            snapshot = getattr(self, "_snapshot", None)
            if snapshot is None:
                raise type(err)(f"{err}; no round had completed, nothing is saved") from None
            path = self.save_checkpoint(snapshot)
            raise type(err)(
                f"{err}; the run stops: the last completed round ({snapshot['completed_rounds']}) is saved in "
                f"{path}, no later one; {RESTART}"
            ) from None

    # -------------------------------------------------------------------------- secure aggregation
    def _masked_round(self, model: LoRACLIPClassifier, round_: int) -> dict[str, float]:
        """``FederatedTrainer._run_round`` where the server sees no update: TRAIN returns reports and
        public keys, masking passes return masked contributions, ``aggregate_sums`` releases their sum."""
        server, started = self.server, time.perf_counter()
        self._call("on_round_start", round=round_)
        plan, messages, downloaded = server.plan(round_), {}, 0
        for client, rank in plan:
            lora, extra = server.payload(client, rank)
            downloaded += server.download_nbytes(lora, extra)
            messages[client] = self._message(MessageType.TRAIN, model, round_, client, rank, lora, extra)
        self._inbox.send(messages)
        deadline = time.monotonic() + self.round_timeout
        updates, failures, keys = [], [], {}
        replies = {client: self._inbox.wait(client, deadline) for client, _ in plan}
        self._stop_if_all_lost(round_, {c: _reason(r, "train", self.round_timeout) for c, r in replies.items()})
        for client, rank in plan:
            reply = replies[client]
            problem = _reason(reply, "train", self.round_timeout)
            if problem is None:
                content = reply.content
                if "fatal" in content.config_records:  # a data error on the client stops the run
                    raise ConfigError(f"client {client}: {content.config_records['fatal']['error']}")
                self._count_build(content, client)
                if "refused" in content.config_records:  # the client's own check_update, as in `fedilora fit`
                    failures.append((client, str(content.config_records["refused"]["reason"])))
                    continue
                update = report_from_record(content)
                if (update.client_id, update.rank) != (client, rank):
                    problem = f"answered as client {update.client_id} of rank {update.rank}"
            if problem is not None:  # worded as `fedilora fit` words a client that raised
                failures.append((client, f"{ClientLost.__name__}: {problem}"))
                continue
            updates.append(update)
            keys[client] = bytes(content.config_records["secagg"]["public-key"])
            self._kept[client] = rank  # its personalized model, kept on its node
        totals, cost, lost = None, {}, []
        if not server.skips(len(updates)):
            totals, cost, lost = self._masked_sum(round_, keys)
            failures += lost
            gone = {client for client, _ in lost}
            updates = [u for u in updates if u.client_id not in gone]
        result: RoundResult = server.aggregate_sums(round_, updates, failures, totals, cost)
        for line in result.warnings(self.min_clients_per_round):
            self.fabric.print(line)
        self._call("on_aggregate_end", round=round_, global_lora=server.global_lora, updates=result.updates)
        return result.metrics(self.aggregator.communicates, downloaded, time.perf_counter() - started)

    def _masked_sum(
        self, round_: int, keys: dict[int, bytes]
    ) -> tuple[dict[str, torch.Tensor] | None, dict[str, float], list[tuple[int, str]]]:
        """The masking passes (``SecureAggregation.run``) over Flower messages: the summed contributions
        (None: too few clients left), the cost, and the clients lost on the way with the reason."""
        secure, server, lost = self.secure_aggregation, self.server, []
        config = {"fedilora-config": self.config_yaml, "round": round_, "fraction-bits": secure.fraction_bits}

        def send(kind: str, number: int, clients: list[int], extra: dict) -> dict[int, Message]:
            messages = {
                (kind, number, c): Message(
                    RecordDict({"config": ConfigRecord({**config, **extra, "client-id": c})}),
                    dst_node_id=self._nodes[c],
                    message_type=f"{MessageType.TRAIN}.{kind}",
                    group_id=str(round_),
                )
                for c in clients
            }
            self._inbox.send(messages)
            deadline, replies = time.monotonic() + self.round_timeout, {}
            for c in clients:
                reply = self._inbox.wait((kind, number, c), deadline)
                problem = _reason(reply, kind, self.round_timeout)
                if problem is None:
                    replies[c] = reply
                else:
                    lost.append((c, f"{ClientLost.__name__}: {problem} (masking pass {number})"))
            self._inbox.forget(messages)  # a late reply to this pass is never read
            return replies

        def one_pass(participants: list[int], number: int, context: bytes) -> dict[int, torch.Tensor]:
            publics = keys
            if number > 1:  # fresh keys: a key masks once
                replies = send("keys", number, participants, {})
                publics = {c: bytes(r.content.config_records["secagg"]["public-key"]) for c, r in replies.items()}
            present = [c for c in participants if c in publics]
            peers = {"peers": present, "public-keys": [publics[c] for c in present], "context": context}
            replies = send("mask", number, present, peers)
            return {
                c: torch.from_numpy(np.array(r.content.array_records["masked"]["vector"].numpy(), copy=True))
                for c, r in replies.items()
            }

        masked, _, cost = secure.run(
            sorted(keys), server.masking_context(round_), one_pass, min_participants=self.min_clients_per_round
        )
        if masked is None:
            return None, cost, lost
        return secure.unmask(masked, layout(server.global_lora, server.global_extra)), cost, lost

    def _count_build(self, content: RecordDict, client: int) -> None:
        process = content.metric_records.get("process", {})
        self._builds["built"] += float(process.get("built", 0.0))
        self._builds["seconds"] += float(process.get("build-seconds", 0.0))
        # where a round's time goes: the client's own work against the whole trip through Flower
        self._builds["trips"].append(self._inbox.arrived[client] - self._inbox.sent[client])
        self._builds["work"].append(float(process.get("handle-seconds", 0.0)))

    def evaluate(self, model: LoRACLIPClassifier, datamodule: FederatedDataModule) -> dict[str, float]:
        metrics = evaluate_global(model, self.fabric, datamodule, self.server.global_models())
        personal: Mapping[int, Personal] = self.server.personalized_models(datamodule.num_clients)
        if self.secure_aggregation is not None:  # the personalized models are on the clients
            personal = {client: (rank, {}, {}) for client, rank in sorted(self._kept.items())}
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


class FlowerPool:
    """The round's clients on SuperNodes, a ``ClientPool``: all replies are in before any is read, so that
    a lost SuperLink or a round without a single answer stops the run before anything is aggregated."""

    def __init__(self, trainer: FlowerTrainer, model: LoRACLIPClassifier) -> None:
        self.trainer, self.model = trainer, model

    def train(self, round_: int, plan: Plan, payloads: Payloads) -> RoundUploads:
        trainer, sent, messages = self.trainer, {}, {}
        for client, rank in plan:
            sent[client] = payloads(client, rank)
            messages[client] = trainer._message(MessageType.TRAIN, self.model, round_, client, rank, *sent[client])
        trainer._inbox.send(messages)
        deadline = time.monotonic() + trainer.round_timeout
        replies = {client: trainer._inbox.wait(client, deadline) for client in messages}
        trainer._stop_if_all_lost(round_, {c: _reason(r, "train", trainer.round_timeout) for c, r in replies.items()})
        uploads = RoundUploads(downloaded=payloads.downloaded)
        for client, rank in plan:  # a lost client is worded as `fedilora fit` words a client that raised
            update, problem = record(
                lambda: trainer._update(replies[client], client, rank),  # noqa: B023 (called at once)
                lambda update: payloads.check(update, *sent[client]),  # noqa: B023
            )
            if problem is None:
                uploads.updates.append(update)
            else:
                uploads.failures.append((client, problem))
        return uploads


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """One federated run from the run config: ``config`` (the YAML of ``fedilora fit``), ``overrides``
    (more ``fedilora fit`` arguments), ``ckpt-path`` (resume), ``node-timeout``, ``round-timeout``,
    ``link-timeout``."""
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
        link_timeout=float(run_config.get("link-timeout", LINK_TIMEOUT)),
    )
    ckpt_path = str(run_config.get("ckpt-path", "")) or None
    trainer.fit(parsed.model, parsed.datamodule, ckpt_path=ckpt_path)
