"""One federated round, written once for every engine: the transport of client work is injected.

``run_round`` holds the round's steps: hooks, the server's plan, the pool's client work (payloads out,
checked updates and failures back), aggregation, the round's warnings, FLoRA's merge into the base
weights and the metrics. A ``ClientPool`` is how the clients are reached: ``fedilora.fabric_pool``
trains them in the processes of a Fabric job, ``fedilora.flower.server_app`` sends them Flower messages.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fedilora.errors import ConfigError
from fedilora.server import FederatedServer, RoundResult
from fedilora.types import ClientUpdate, State

Plan = Sequence[tuple[int, int]]  # the round's (client, rank) pairs, in the server's order


class Payloads:
    """The server's side of one round as a pool sees it: what each client starts from (counted as
    downloaded bytes) and the fault filter its upload must pass."""

    def __init__(self, server: FederatedServer) -> None:
        self.server, self.downloaded = server, 0

    def __call__(self, client: int, rank: int) -> tuple[State, State]:
        lora, extra = self.server.payload(client, rank)
        self.downloaded += self.server.download_nbytes(lora, extra)
        return lora, extra

    def check(self, update: ClientUpdate, lora: State, extra: State) -> str | None:
        """None if ``update`` may be aggregated, else why it is left out (``FederatedServer.check``)."""
        return self.server.check(update, lora, extra)


@dataclass
class RoundUploads:
    """What a pool brings back from a round: the checked updates (plan order), the clients left out
    with the reason, and the bytes the clients downloaded."""

    updates: list[ClientUpdate] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)
    downloaded: int = 0


class ClientPool(Protocol):
    """How a round's clients are reached. ``train`` runs every planned client's local training from
    ``payloads(client, rank)`` and returns what passed ``payloads.check``; a data error (``ConfigError``)
    stops the run and must reach every process of the engine before it is raised."""

    def train(self, round_: int, plan: Plan, payloads: Payloads) -> RoundUploads: ...


def run_round(
    server: FederatedServer,
    pool: ClientPool,
    round_: int,
    call: Callable[..., None],
    *,
    min_clients: int,
    say: Callable[[str], None],
    merge_into_base: Callable[[dict], None],
) -> dict[str, float]:
    """One round: ``call`` fires the callbacks' hooks, ``say`` prints the round's warnings,
    ``merge_into_base`` applies an aggregator's change of the shared base weights (FLoRA)."""
    started = time.perf_counter()
    call("on_round_start", round=round_)
    uploads = pool.train(round_, server.plan(round_), Payloads(server))
    result: RoundResult = server.aggregate(round_, uploads.updates, uploads.failures)
    for line in result.warnings(min_clients):
        say(line)
    if result.base_delta:  # the model of this process shares the base weights every client trains on
        merge_into_base(result.base_delta)
    call("on_aggregate_end", round=round_, global_lora=server.global_lora, updates=result.updates)
    return result.metrics(server.aggregator.communicates, uploads.downloaded, time.perf_counter() - started)


def record(
    call: Callable[[], ClientUpdate], check: Callable[[ClientUpdate], str | None]
) -> tuple[ClientUpdate | None, str | None]:
    """``call()`` then ``check`` its update: (update, None), or (None, why) where the client raised
    (worded ``"<exception class>: <message>"``, as every engine words a failing client) or failed the
    check. A ``ConfigError`` (a data error) is not a client's failure: it propagates."""
    try:
        update = call()
        problem = check(update)
    except ConfigError:
        raise
    except Exception as err:  # a client's failure must not end the federation
        return None, f"{type(err).__name__}: {err}"
    return (update, None) if problem is None else (None, problem)
