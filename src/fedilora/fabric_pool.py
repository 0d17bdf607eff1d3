"""The clients of a Fabric job as a ``ClientPool``: each process trains its share of the round's clients
and ``gather_round`` gives every process every upload, so all aggregate the same round."""

from __future__ import annotations

import time
from collections.abc import Callable

from lightning.fabric import Fabric

from fedilora.errors import ConfigError
from fedilora.gather import gather_round
from fedilora.round import Payloads, Plan, RoundUploads, record
from fedilora.types import ClientUpdate, State

TrainClient = Callable[[int, int, State, State], ClientUpdate]  # (client, rank, lora, extra) -> its update


class FabricPool:
    """``train_client(client, rank, lora, extra)`` in this process; a client not started by ``deadline``
    (``time.monotonic``, from ``trainer.round_timeout_s``) is left out as late."""

    def __init__(self, fabric: Fabric, train_client: TrainClient, deadline: float | None, timeout_s: float | None):
        self.fabric, self.train_client, self.deadline, self.timeout_s = fabric, train_client, deadline, timeout_s

    def train(self, round_: int, plan: Plan, payloads: Payloads) -> RoundUploads:
        fabric, plan = self.fabric, list(plan)
        uploads, fatal = RoundUploads(), None
        for client, rank in plan[fabric.global_rank :: fabric.world_size]:  # this process's share
            if self.deadline is not None and time.monotonic() > self.deadline:
                late = f"LateClient: not started by trainer.round_timeout_s={self.timeout_s}"
                uploads.failures.append((client, late))
                continue
            lora, extra = payloads(client, rank)
            try:
                update, problem = record(
                    lambda: self.train_client(client, rank, lora, extra),  # noqa: B023 (called at once)
                    lambda update: payloads.check(update, lora, extra),  # noqa: B023
                )
            except ConfigError as err:  # a data error (a bad file or row): the run stops, on every process
                fatal = str(err)
                break
            if problem is None:
                uploads.updates.append(update)
            else:
                uploads.failures.append((client, problem))
        uploads.downloaded = payloads.downloaded
        if fabric.world_size > 1:
            gathered = gather_round(fabric, uploads.updates, uploads.failures, uploads.downloaded, fatal, plan)
            uploads.updates, uploads.failures, uploads.downloaded, fatal = gathered
        if fatal is not None:
            raise ConfigError(fatal)
        return uploads
