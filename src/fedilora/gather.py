"""Gathering a round's client updates across the processes of a Fabric job, so every process aggregates them all."""

from __future__ import annotations

from lightning.fabric import Fabric

from fedilora.types import ClientUpdate


def gather_round(
    fabric: Fabric,
    updates: list[ClientUpdate],
    failures: list[tuple[int, str]],
    downloaded: int,
    fatal: str | None,
    plan: list[tuple[int, int]],
) -> tuple[list[ClientUpdate], list[tuple[int, str]], int, str | None]:
    """Every process receives every update, in plan order, so all compute the same aggregate (and
    all stop on a data error met by any of them)."""
    import torch.distributed as dist

    local = ([_to_cpu(u) for u in updates], failures, downloaded, fatal)
    gathered: list = [None] * fabric.world_size
    dist.all_gather_object(gathered, local)
    order = {client: i for i, (client, _) in enumerate(plan)}
    all_updates = sorted((u for part, _, _, _ in gathered for u in part), key=lambda u: order[u.client_id])
    all_failures = sorted((f for _, part, _, _ in gathered for f in part), key=lambda f: order[f[0]])
    device = fabric.device
    for update in all_updates:
        update.lora = {k: v.to(device) for k, v in update.lora.items()}
        update.extra = {k: v.to(device) for k, v in update.extra.items()}
    fatal = next((error for *_, error in gathered if error is not None), None)
    return all_updates, all_failures, sum(count for _, _, count, _ in gathered), fatal


def _to_cpu(update: ClientUpdate) -> ClientUpdate:
    update.lora = {k: v.cpu() for k, v in update.lora.items()}
    update.extra = {k: v.cpu() for k, v in update.extra.items()}
    return update
