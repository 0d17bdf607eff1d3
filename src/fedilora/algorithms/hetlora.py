"""HetLoRA (Cho et al. 2024): zero-pad every update to the global rank, weight it by ||B_k A_k||_F.

The weight N_k = sum over modules of ||B_k A_k||_F is one update's own, so the streaming form needs no
other update; a dimension only some clients have is diluted by the zeros of the others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedilora.algorithms.base import Accumulator, Aggregator, DimensionAccumulator, average_sums
from fedilora.algorithms.sums import WeightedSums
from fedilora.lora_ops import module_keys
from fedilora.types import ClientUpdate, State


def product_norm(b: Tensor, a: Tensor) -> Tensor:
    """||B A||_F via ||B A||_F^2 = sum((B^T B) * (A A^T)), without forming the d_out x d_in product."""
    b, a = b.to(torch.float64), a.to(torch.float64)
    return ((b.T @ b) * (a @ a.T)).sum().clamp_min(0.0).sqrt()


def update_norm(lora: Mapping[str, Tensor]) -> Tensor:
    """N_k = sum over modules of ||B_k A_k||_F (float64 scalar): HetLoRA's weight, one update at a time."""
    norms = [product_norm(lora[b], lora[a]) for a, b in module_keys(lora).values()]
    return torch.stack(norms).sum() if norms else torch.zeros((), dtype=torch.float64)


def hetlora_weights(client_loras: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """w_k = N_k / sum_j N_j with N_k = sum_modules ||B_k A_k||_F (float64, ``[K]``).

    If every client's update is zero the norms carry no information and the weights are uniform.
    """
    norms = torch.stack([update_norm(lora) for lora in client_loras])
    total = norms.sum()
    return norms / total if total > 0 else torch.full_like(norms, 1.0 / len(norms))


def zero_padded_average(
    previous: Mapping[str, Tensor], client_loras: Sequence[Mapping[str, Tensor]], weights: Tensor
) -> State:
    """HetLoRA's aggregation: sum_k w_k pad_R(T_k) / sum_k w_k per tensor.

    Each client's A / B counts as zero-padded along its rank axis to the global rank R (taken from
    ``previous``), so a dimension only some clients have is diluted by the zeros of the others and a
    dimension no sampled client has becomes zero: that is the baseline's documented behaviour. As a
    stream: w_k T_k is added into the first r_k dimensions, w_k into the weight of all R dimensions.
    """
    sums = WeightedSums.zeros(previous)
    for k, lora in enumerate(client_loras):
        sums.add(lora, float(weights[k]), covers=None, source=f"client {k}")
    return sums.average(previous)


class NormAccumulator(DimensionAccumulator):
    """HetLoRA's sums: weight N_k = sum_modules ||B_k A_k||_F, counted on every dimension (zero padding).

    While every update so far has B_k A_k = 0 the norms carry no information and the weights are
    uniform, as in :func:`hetlora_weights`: the sums then count updates, and the first update with a
    non-zero product restarts them (one buffer either way).
    """

    uniform = True

    def contribution(self, update: ClientUpdate) -> tuple[float, int | None]:
        norm = float(update_norm(update.lora))
        if not math.isfinite(norm):
            raise ValueError(f"client {update.client_id}: the norm of B A is {norm}")
        if norm > 0 and self.uniform:
            self.lora.clear()
            self.uniform = False
        return (1.0 if self.uniform else norm), None

    def _merge_lora(self, other: Accumulator) -> None:
        if self.uniform != other.uniform:  # the uniform side only counted zero updates: drop it
            (self.lora if self.uniform else other.lora).clear()
            self.uniform = False
        super()._merge_lora(other)


class HetLoRA(Aggregator):
    """Cho et al. 2024: zero-padded average weighted by update norms; truncation on broadcast.

    Only the sparsity-weighted aggregation; the paper's local rank self-pruning is not part of it.
    """

    accumulator = NormAccumulator
    dp_refusal = (
        "it weights each update by its own ||B_k A_k||, a weight one client controls, so the "
        "sensitivity of the aggregate is unbounded"
    )
    secagg_refusal = "its fallback to uniform weights when every B A is zero needs to see each update"

    def finish(self, acc: Accumulator) -> State:
        return average_sums(acc)
