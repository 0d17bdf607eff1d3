"""Dimension-wise aggregation that counts a client without a rank dimension as "no change" there.

FediLoRA's rule (:func:`fedilora.algorithms.dimension_wise.dimension_wise_average`) renormalises every rank dimension
over the clients that have it. When a dimension is covered by one sampled client only (dims 16-31 in
the paper's setting whenever one rank-32 client is sampled), the global dimension becomes that client's
values wholesale: a full-size step of a single client, every round, on dimensions that the head shared
by all clients rarely saw. HetLoRA's zero padding has the opposite defect: it shrinks the dimension's
values, not only its step.

Averaging the *updates* instead, with every sampled client weighted by its samples and a client
without dimension i counted as having left it unchanged, gives for every rank dimension i

    A_g[i] = A_prev[i] + sum_{k in C_i} p_k (A_k[i] - A_prev[i]),   p_k = n_k / sum_{j in S_t} n_j

which is FedAvg of the rank-R adapter where a rank-r client's dimensions >= r were frozen at the
broadcast values (exact, because each client starts from the truncation of A_prev). With equal ranks it
is FedAvg; a dimension covered by clients holding a fraction m_i of the round's samples moves by m_i
times its FediLoRA step: m_i A_dw[i] + (1 - m_i) A_prev[i], with A_dw FediLoRA's renormalised average.

In streaming form (``begin``/``finish``) it needs FediLoRA's per-dimension sums S_i = sum_{k in C_i} w_k A_k[i]
and weights W_i plus one number more, the total weight W = sum_k w_k of every update:
A_g[i] = (S_i + (W - W_i) A_prev[i]) / W. So differential privacy (clipped deltas, weight 1 each: the step
is the noised sum over the round's client count, sigma C / K on every dimension) and secure aggregation
(masked S, W_i and counts) work on it as on FediLoRA's sums.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedilora.algorithms.base import Accumulator, Aggregator, DimensionAccumulator
from fedilora.algorithms.dimension_wise import dimension_wise_average
from fedilora.lora_ops import covers, rank_axis
from fedilora.types import State


def coverage_mass(ranks: Sequence[int], weights: Tensor, global_rank: int) -> Tensor:
    """``[R]``: m_i = sum_{k : r_k > i} p_k / sum_k p_k, the share of the round's weight that has dimension i."""
    w = weights.to(torch.float64)
    return (w[:, None] * covers(ranks, global_rank)).sum(dim=0) / w.sum()


def dimension_wise_delta_average(
    previous: Mapping[str, Tensor], client_loras: Sequence[Mapping[str, Tensor]], ranks: Sequence[int], weights: Tensor
) -> State:
    """A_prev + sum_{k in C_i} p_k (A_k - A_prev) per rank dimension (likewise B), p over every sampled client.

    Built on FediLoRA's renormalised average A_dw: the result is m_i A_dw[i] + (1 - m_i) A_prev[i].
    """
    if not client_loras:
        return dict(previous)
    averaged = dimension_wise_average(previous, client_loras, ranks, weights)
    global_rank = max(v.shape[rank_axis(k)] for k, v in previous.items())
    return blend(previous, averaged, coverage_mass(ranks, weights, global_rank))


def blend(previous: Mapping[str, Tensor], averaged: Mapping[str, Tensor], mass: Tensor) -> State:
    """m_i averaged[i] + (1 - m_i) previous[i] along every tensor's rank axis (``mass``: ``[R]``)."""
    out = {}
    for key, prev in previous.items():
        axis = rank_axis(key)
        m = mass[: prev.shape[axis]].to(prev.dtype)
        m = m.view(-1, 1) if axis == 0 else m.view(1, -1)
        out[key] = m * averaged[key] + (1 - m) * prev
    return out


class DimensionWiseDelta(Aggregator):
    """FediLoRA's dimension-wise aggregation of updates: a client without a rank dimension counts as no change.

    See :mod:`fedilora.algorithms.dimension_wise_delta`. Equal ranks: FedAvg; one client: that client.
    """

    accumulator = DimensionAccumulator
    dp_refusal = None
    secagg_refusal = None

    def finish(self, acc: Accumulator) -> State:
        """:func:`blend` of FediLoRA's streaming average with the previous adapter, m_i = W_i / W."""
        acc.close()
        mass = acc.lora.weight / acc.total if acc.total > 0 else torch.zeros_like(acc.lora.weight)
        return blend(acc.previous, acc.lora.average(acc.previous), mass)
