"""FediLoRA's aggregation: every rank dimension is the weighted mean over the clients that have it.

For rank dimension i let C_i = {k in S_t : r_k > i}; A_g[i, :] = sum_{k in C_i} p_k A_k[i, :] /
sum_{k in C_i} p_k (likewise B_g[:, i]): no dilution by zero padding, and a dimension no sampled client
has keeps its previous values. Streaming form: :class:`fedilora.algorithms.base.DimensionAccumulator`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedilora.algorithms.base import Accumulator, Aggregator, DimensionAccumulator, average_sums
from fedilora.algorithms.sums import WeightedSums
from fedilora.lora_ops import covers
from fedilora.types import State


def dimension_weights(ranks: Sequence[int], weights: Tensor, global_rank: int) -> Tensor:
    """``[K, R]`` coefficients of dimension-wise aggregation, in closed form.

    Column i holds p_k / sum_{j in C_i} p_j for the clients C_i = {k : r_k > i} that have dimension i
    and 0 for the others; a column no client covers is all zero. :class:`WeightedSums` reaches the same
    coefficients without knowing the other clients: w_k / weight[i], weight[i] = sum_{j in C_i} w_j.
    """
    mass = weights.to(torch.float64)[:, None] * covers(ranks, global_rank)
    total = mass.sum(dim=0, keepdim=True)
    return torch.where(total > 0, mass / total.clamp_min(torch.finfo(torch.float64).tiny), 0.0)


def dimension_wise_average(
    previous: Mapping[str, Tensor], client_loras: Sequence[Mapping[str, Tensor]], ranks: Sequence[int], weights: Tensor
) -> State:
    """FediLoRA's aggregation: every rank dimension is the weighted mean over the clients that have it.

    A_g[i, :] = sum_{k in C_i} p_k A_k[i, :] / sum_{k in C_i} p_k (likewise B_g[:, i]). Dimensions no
    sampled client has keep their ``previous`` values instead of being zeroed. Computed as a stream
    (:class:`WeightedSums`): sum_k w_k T_k into each client's first r_k dimensions, divided at the end by
    weight[i] = sum_{k in C_i} w_k, which equals the renormalised form above (w may be unnormalised).
    """
    sums = WeightedSums.zeros(previous)
    for k, (lora, rank) in enumerate(zip(client_loras, ranks, strict=True)):
        sums.add(lora, float(weights[k]), covers=rank, source=f"client {k}")
    return sums.average(previous)


class DimensionWise(Aggregator):
    """FediLoRA: dimension-wise reweighted averaging, no dilution by zero padding."""

    accumulator = DimensionAccumulator
    dp_refusal = None
    secagg_refusal = None

    def finish(self, acc: Accumulator) -> State:
        return average_sums(acc)
