"""The batch implementations the streaming aggregators replaced, kept as references for the tests.

They stack every client's tensors (zero-padded to the global rank) and reduce once: K padded copies,
which the streaming form never allocates. Copied from the code before the change, unchanged in math.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedilora.aggregation import dimension_weights, rank_axis
from fedilora.baselines import SVD, _compute_dtype, low_rank_svd, module_keys

State = dict[str, Tensor]


def stack_padded(tensors: Sequence[Tensor], axis: int, global_rank: int) -> Tensor:
    """``[K, *global_shape]`` with each client's tensor zero-padded along the rank ``axis``."""
    first = tensors[0]
    shape = list(first.shape)
    shape[axis] = global_rank
    out = first.new_zeros((len(tensors), *shape))
    for k, t in enumerate(tensors):
        out[k].narrow(axis, 0, t.shape[axis]).copy_(t)
    return out


def weighted_average(states: Sequence[Mapping[str, Tensor]], weights: Tensor) -> State:
    w = weights.to(torch.float64)
    w = w / w.sum()
    return {
        key: torch.einsum("k,k...->...", w.to(first.dtype), torch.stack([s[key] for s in states]))
        for key, first in states[0].items()
    }


def dimension_wise_average(
    previous: Mapping[str, Tensor], client_loras: Sequence[Mapping[str, Tensor]], ranks: Sequence[int], weights: Tensor
) -> State:
    if not client_loras:
        return dict(previous)
    out = {}
    for key, prev in previous.items():
        axis = rank_axis(key)
        global_rank = prev.shape[axis]
        coef = dimension_weights(ranks, weights, global_rank).to(prev.dtype)  # [K, R]
        stacked = stack_padded([c[key] for c in client_loras], axis, global_rank)  # [K, ...]
        view = (len(client_loras), global_rank, 1) if axis == 0 else (len(client_loras), 1, global_rank)
        averaged = (stacked * coef.view(view)).sum(dim=0)
        covered = (coef.sum(dim=0) > 0).view(view[1:])
        out[key] = torch.where(covered, averaged, prev)
    return out


def zero_padded_average(
    previous: Mapping[str, Tensor], client_loras: Sequence[Mapping[str, Tensor]], weights: Tensor
) -> State:
    if not client_loras:
        return dict(previous)
    w = weights.to(torch.float64)
    w = w / w.sum()
    out = {}
    for key, prev in previous.items():
        axis = rank_axis(key)
        stacked = stack_padded([c[key] for c in client_loras], axis, prev.shape[axis])
        out[key] = torch.einsum("k,k...->...", w.to(stacked), stacked)
    return out


def flexlora_svd(client_loras: Sequence[Mapping[str, Tensor]], weights: Tensor, scale: float = 1.0) -> dict[str, SVD]:
    root = (weights.to(torch.float64) * scale).sqrt()
    out = {}
    for prefix, (a, b) in module_keys(client_loras[0]).items():
        first = client_loras[0][a]
        r = root.to(first.device, _compute_dtype(first))
        b_stack = torch.cat([r[k] * c[b].to(r) for k, c in enumerate(client_loras)], dim=1)
        a_stack = torch.cat([r[k] * c[a].to(r) for k, c in enumerate(client_loras)], dim=0)
        out[prefix] = low_rank_svd(b_stack, a_stack)
    return out
