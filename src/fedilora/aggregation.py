"""Server-side aggregation of heterogeneous-rank LoRA adapters.

Adapters are ``dict[str, Tensor]`` keyed by peft's parameter names without the adapter name
(``...c_fc.lora_A.weight``). For a module, ``lora_A`` is ``[r, d_in]`` and ``lora_B`` is
``[d_out, r]``: the rank axis is 0 for A and 1 for B. A and B are told apart by name only, never by
comparing a shape with the rank (``d_in`` may equal the rank).

An aggregator is a small object with two methods, independent of transport and of the trainer:
``broadcast`` (global adapter -> what a client of rank r starts from) and ``aggregate`` (previous
global adapter + client updates -> new global adapter).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fedilora.errors import ConfigError

State = dict[str, Tensor]


@dataclass
class ClientUpdate:
    """What a client uploads after local training in one round."""

    client_id: int
    rank: int
    num_samples: int
    lora: State
    extra: State
    train_loss: float = float("nan")
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # what callbacks attach, e.g. the edit report

    def nbytes(self) -> int:
        return nbytes(self.lora) + nbytes(self.extra)


def rank_axis(key: str) -> int:
    """The rank axis of a LoRA tensor, by its peft name: 0 for ``lora_A``, 1 for ``lora_B``."""
    if ".lora_A." in key or key.startswith("lora_A."):
        return 0
    if ".lora_B." in key or key.startswith("lora_B."):
        return 1
    raise KeyError(f"{key!r} is neither a lora_A nor a lora_B tensor")


def truncate(lora: Mapping[str, Tensor], rank: int) -> State:
    """The first ``rank`` rank dimensions: ``A[:r, :]`` and ``B[:, :r]`` (the broadcast to rank r)."""
    return {k: (v[:rank] if rank_axis(k) == 0 else v[:, :rank]).clone() for k, v in lora.items()}


def sample_weights(updates: Sequence[ClientUpdate]) -> Tensor:
    """p_k = n_k / sum_j n_j over the updates of this round."""
    counts = torch.tensor([u.num_samples for u in updates], dtype=torch.float64)
    if (counts <= 0).any():
        raise ValueError("every update must report a positive number of samples")
    return counts / counts.sum()


def weighted_average(states: Sequence[Mapping[str, Tensor]], weights: Tensor) -> State:
    """sum_k w_k state_k per key (same shapes everywhere); used for heads and for FedAvg."""
    w = weights.to(torch.float64)
    w = w / w.sum()
    return {
        key: torch.einsum("k,k...->...", w.to(first.dtype), torch.stack([s[key] for s in states]))
        for key, first in states[0].items()
    }


def dimension_weights(ranks: Sequence[int], weights: Tensor, global_rank: int) -> Tensor:
    """``[K, R]`` coefficients of dimension-wise aggregation.

    Column i holds p_k / sum_{j in C_i} p_j for the clients C_i = {k : r_k > i} that have dimension i
    and 0 for the others; a column no client covers is all zero.
    """
    covers = torch.arange(global_rank)[None, :] < torch.as_tensor(ranks)[:, None]
    mass = weights.to(torch.float64)[:, None] * covers
    total = mass.sum(dim=0, keepdim=True)
    return torch.where(total > 0, mass / total.clamp_min(torch.finfo(torch.float64).tiny), 0.0)


def stack_padded(tensors: Sequence[Tensor], axis: int, global_rank: int) -> Tensor:
    """``[K, *global_shape]`` with each client's tensor zero-padded along the rank ``axis``."""
    first = tensors[0]
    shape = list(first.shape)
    shape[axis] = global_rank
    out = first.new_zeros((len(tensors), *shape))
    for k, t in enumerate(tensors):
        out[k].narrow(axis, 0, t.shape[axis]).copy_(t)
    return out


def dimension_wise_average(
    previous: Mapping[str, Tensor], client_loras: Sequence[Mapping[str, Tensor]], ranks: Sequence[int], weights: Tensor
) -> State:
    """FediLoRA's aggregation: every rank dimension is the weighted mean over the clients that have it.

    A_g[i, :] = sum_{k in C_i} p_k A_k[i, :] / sum_{k in C_i} p_k (likewise B_g[:, i]). Dimensions no
    sampled client has keep their ``previous`` values instead of being zeroed.
    """
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


def nbytes(state: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


class Aggregator:
    """Base strategy: truncation on broadcast; subclasses define ``aggregate``.

    Class attributes tell the trainer how the strategy runs: ``requires_equal_ranks``;
    ``communicates`` (False: clients keep training their own adapter, nothing is averaged);
    ``pooled`` (True: one model trains on the union of all clients' training data);
    ``needs_constant_scale`` (the strategy forms products s * B @ A with one scale for all ranks).
    """

    requires_equal_ranks = False
    communicates = True
    pooled = False
    needs_constant_scale = False
    #: the LoRA scale s = lora_alpha / r of the model; set by the trainer through ``setup``
    scale = 1.0

    def setup(self, scale: float) -> Aggregator:
        self.scale = scale
        return self

    def broadcast(self, global_lora: Mapping[str, Tensor], rank: int) -> State:
        return truncate(global_lora, rank)

    def download_nbytes(self, sent: Mapping[str, Tensor]) -> int:
        """Bytes a client downloads to start a round from ``sent``."""
        return nbytes(sent)

    def aggregate(self, global_lora: Mapping[str, Tensor], updates: Sequence[ClientUpdate]) -> State:
        raise NotImplementedError


class DimensionWise(Aggregator):
    """FediLoRA: dimension-wise reweighted averaging, no dilution by zero padding."""

    def aggregate(self, global_lora: Mapping[str, Tensor], updates: Sequence[ClientUpdate]) -> State:
        return dimension_wise_average(
            global_lora, [u.lora for u in updates], [u.rank for u in updates], sample_weights(updates)
        )


class FedAvg(Aggregator):
    """Plain weighted average of A and B; every client must have the same rank."""

    requires_equal_ranks = True

    def aggregate(self, global_lora: Mapping[str, Tensor], updates: Sequence[ClientUpdate]) -> State:
        ranks = {u.rank for u in updates}
        if len(ranks) > 1:
            raise ConfigError(f"trainer.aggregator: FedAvg needs equal ranks, got {sorted(ranks)}; use DimensionWise")
        return weighted_average([u.lora for u in updates], sample_weights(updates))
