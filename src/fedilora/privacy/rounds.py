"""One round's aggregation under differential privacy and/or secure aggregation.

Both act on what a client adds to the server's streaming sums (:class:`fedilora.aggregation.WeightedSums`):
per-tensor sums in the global shapes and a per-rank-dimension weight vector. ``contribution`` is the
client's side (in the simulator it runs on the server's process, in the order a client would run it; a
Flower client runs it on its own node through ``client_contribution``), ``release`` the server's: it
turns the summed contributions — plain, or unmasked by secure aggregation — into the next global
adapter and head.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fedilora.aggregation import Aggregator, ClientUpdate, DimensionAccumulator, State, WeightedSums
from fedilora.lora_ops import pad_rank
from fedilora.privacy.dp import DifferentialPrivacy, NoiseSource, delta
from fedilora.privacy.secagg import flatten

Contribution = dict[str, Tensor]


def contribution(
    aggregator: Aggregator,
    global_lora: Mapping[str, Tensor],
    global_extra: Mapping[str, Tensor],
    update: ClientUpdate,
    privacy: DifferentialPrivacy | None,
) -> Contribution:
    """What one client adds to the round's sums: with ``privacy`` its clipped deltas with weight 1 on its
    rank dimensions, otherwise the aggregator's own weighted sums (n_k on its first r_k dimensions)."""
    lora = WeightedSums.zeros(global_lora)
    extra = WeightedSums.zeros(global_extra, ranked=False)
    unclipped = 1.0
    if privacy is not None:
        received = aggregator.broadcast(global_lora, update.rank)
        lora_delta, extra_delta, within = privacy.clip_update(
            delta(update.lora, received), delta(update.extra, global_extra)
        )
        lora.add(lora_delta, 1.0, covers=update.rank, source=f"client {update.client_id}")
        extra.add(extra_delta, 1.0, source=f"client {update.client_id}")
        unclipped = float(within)
    else:
        acc = aggregator.begin(global_lora, global_extra)
        if not isinstance(acc, DimensionAccumulator):
            raise TypeError(f"{type(aggregator).__name__} has no per-dimension sums to mask")
        acc.add(update)
        lora, extra = acc.lora, acc.extra
    return _pack(lora, extra, unclipped, 1.0, float(update.num_samples))


def _pack(lora: WeightedSums, extra: WeightedSums, unclipped: float, count: float, num_samples: float) -> Contribution:
    return {
        **{f"lora/{k}": v for k, v in lora.sums.items()},
        "lora_weight": lora.weight,
        **{f"extra/{k}": v for k, v in extra.sums.items()},
        "extra_weight": extra.weight,
        "unclipped": torch.tensor([unclipped], dtype=torch.float64),
        "count": torch.tensor([count], dtype=torch.float64),
        "num_samples": torch.tensor([num_samples], dtype=torch.float64),
    }


def zero_contribution(global_lora: Mapping[str, Tensor], global_extra: Mapping[str, Tensor]) -> Contribution:
    """What no client adds: the sums of a DP round whose every client failed (its release is the noise)."""
    return _pack(WeightedSums.zeros(global_lora), WeightedSums.zeros(global_extra, ranked=False), 0.0, 0.0, 0.0)


def layout(global_lora: Mapping[str, Tensor], global_extra: Mapping[str, Tensor]) -> list[tuple[str, torch.Size]]:
    """The layout of a flattened contribution (``secagg.flatten``): what a server that receives only
    masked vectors needs to unflatten their sum."""
    return flatten(zero_contribution(global_lora, global_extra))[1]


def client_contribution(
    aggregator: Aggregator,
    received_lora: Mapping[str, Tensor],
    received_extra: Mapping[str, Tensor],
    global_rank: int,
    update: ClientUpdate,
    privacy: DifferentialPrivacy | None,
) -> Contribution:
    """``contribution`` computed by the client itself, which has only what it received: the global
    adapter is rebuilt by zero-padding the payload to ``global_rank``. Sound because the contribution
    needs of the global adapter only its shapes and what the client received, and the broadcast of the
    rebuilt adapter is checked to be exactly the payload (true of truncation; an aggregator with
    another broadcast, e.g. FlexLoRA's SVD, is refused)."""
    reference = pad_rank(received_lora, global_rank)
    again = aggregator.broadcast(reference, update.rank)
    if again.keys() != received_lora.keys() or not all(torch.equal(again[k], received_lora[k]) for k in again):
        raise ValueError(
            f"{type(aggregator).__name__}: its broadcast is not a truncation, so a client cannot rebuild the "
            "global adapter from its payload"
        )
    return contribution(aggregator, reference, received_extra, update, privacy)


def add_contributions(contributions: list[Contribution]) -> Contribution:
    """The plain sum (no secure aggregation)."""
    total = {k: v.clone() for k, v in contributions[0].items()}
    for c in contributions[1:]:
        for k, v in c.items():
            total[k] += v
    return total


def _sums(totals: Mapping[str, Tensor], prefix: str, like: Mapping[str, Tensor], ranked: bool) -> WeightedSums:
    sums = {k: totals[f"{prefix}/{k}"].to(v.device) for k, v in like.items()}
    weight = totals[f"{prefix}_weight"].to(torch.float64).cpu()
    return WeightedSums(sums, weight, ranked, {k: v.dtype for k, v in like.items()})


def release(
    aggregator: Aggregator,
    global_lora: Mapping[str, Tensor],
    global_extra: Mapping[str, Tensor],
    totals: Mapping[str, Tensor],
    privacy: DifferentialPrivacy | None,
    generator: NoiseSource,
) -> tuple[State, State, dict[str, float]]:
    """The next global adapter and head from the round's summed contributions, and privacy figures.

    The aggregator's own ``finish`` turns the sums into the result. Without privacy the sums are its
    weighted sums, so it starts from the global adapter. Under privacy they are clipped deltas of weight
    1 each, noised here: ``finish`` from a zero adapter turns them into the step (``DimensionWise``: the
    noised sum over the n_i clients that cover dimension i; ``DimensionWiseDelta``: over the round's K).
    """
    lora = _sums(totals, "lora", global_lora, ranked=True)
    extra = _sums(totals, "extra", global_extra, ranked=False)
    count, num_samples = int(totals["count"].item()), float(totals["num_samples"].item())
    if privacy is None:
        acc = _accumulator(aggregator, global_lora, global_extra, lora, extra, total=num_samples)
        acc.count, acc.num_samples = count, round(num_samples)
        return aggregator.finish(acc), aggregator.finish_extra(acc), {}
    lora.sums = privacy.noise(lora.sums, generator)
    extra.sums = privacy.noise(extra.sums, generator)
    zero_lora = {k: torch.zeros_like(v) for k, v in global_lora.items()}
    zero_extra = {k: torch.zeros_like(v) for k, v in global_extra.items()}
    acc = _accumulator(aggregator, zero_lora, zero_extra, lora, extra, total=float(count))
    lora_step, extra_step = aggregator.finish(acc), aggregator.finish_extra(acc)
    new_lora = {k: global_lora[k] + lora_step[k].to(global_lora[k]) for k in global_lora}
    new_extra = {k: global_extra[k] + extra_step[k].to(global_extra[k]) for k in global_extra}
    metrics = privacy.after_round(float(totals["unclipped"].item()), count, generator)
    return new_lora, new_extra, metrics


def _accumulator(
    aggregator: Aggregator,
    previous_lora: Mapping[str, Tensor],
    previous_extra: Mapping[str, Tensor],
    lora: WeightedSums,
    extra: WeightedSums,
    total: float,
) -> DimensionAccumulator:
    """The aggregator's accumulator holding sums taken elsewhere (``total``: the weight of all of them)."""
    acc = aggregator.begin(previous_lora, previous_extra)
    if not isinstance(acc, DimensionAccumulator):
        raise TypeError(f"{type(aggregator).__name__} has no per-dimension sums to release")
    acc.lora.merge(lora)
    acc.extra.merge(extra)
    acc.total = total
    return acc
