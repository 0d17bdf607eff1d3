"""Streaming weighted sums: what every rule that averages per rank dimension accumulates.

``WeightedSums`` holds, per tensor, sum_k w_k T_k (each T_k added into its own first r_k rank
dimensions, no padded copy) and per rank dimension the total weight; ``average`` divides the two. The
sums and weights are what Flower replies, differential-privacy noise and masked (secure) sums work on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedilora.lora_ops import accumulation_dtype, rank_axis
from fedilora.types import ClientUpdate, State


def sample_weights(updates: Sequence[ClientUpdate]) -> Tensor:
    """p_k = n_k / sum_j n_j over the updates of this round."""
    counts = torch.tensor([u.num_samples for u in updates], dtype=torch.float64)
    if (counts <= 0).any():
        raise ValueError("every update must report a positive number of samples")
    return counts / counts.sum()


def check_state(
    like: Mapping[str, Tensor], state: Mapping[str, Tensor], rank: int | None, ranked: bool, source: str
) -> None:
    """Raise one ``ValueError`` naming ``source`` and the tensor unless ``state`` fits ``like``.

    Same keys; with ``ranked``, every tensor has ``like``'s shape except along its rank axis, where it
    has ``rank`` entries (any number up to ``like``'s when ``rank`` is None); otherwise equal shapes.
    Checked before anything is added, so that a malformed update leaves an accumulator untouched.
    """
    if state.keys() != like.keys():
        missing, unexpected = sorted(like.keys() - state.keys()), sorted(state.keys() - like.keys())
        raise ValueError(f"{source}: tensors do not match the global ones (missing {missing}, unexpected {unexpected})")
    for key, ref in like.items():
        shape, full = state[key].shape, ref.shape
        if ranked and len(shape) == 2 and len(full) == 2:  # runs once per tensor per update: kept lean
            axis = rank_axis(key)
            got = shape[axis]
            if (got != rank if rank is not None else got <= 0) or got > full[axis]:
                want = f"rank {rank}" if rank is not None else f"at most rank {full[axis]}"
                raise ValueError(f"{source}: {key} has {got} rank dimensions, expected {want} (global: {list(full)})")
            if shape[1 - axis] == full[1 - axis]:
                continue
            expected = (got, full[1]) if axis == 0 else (full[0], got)
        elif shape == full:
            continue
        else:
            expected = tuple(full)
        raise ValueError(f"{source}: {key} has shape {tuple(shape)}, expected {expected}")


@dataclass
class WeightedSums:
    """Streaming form of a dimension-wise weighted average: the only buffers are the sums.

    ``sums[key]`` has the global tensor's shape and holds sum_k w_k T_k, each T_k added into its own
    first r_k rank dimensions only (``A[:r_k]``, ``B[:, :r_k]``: no padded copy); ``weight[i]``
    (float64, ``[R]``) is the total weight of the contributions that count for rank dimension i.
    :meth:`average` divides the two. With ``ranked=False`` (heads: one shape on every client) a tensor
    is a single dimension and ``weight`` has one entry. Sums of two instances add (:meth:`merge`).
    """

    sums: State
    weight: Tensor
    ranked: bool = True
    #: the dtypes :meth:`average` returns (the sums of half-precision tensors are float32)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    #: set by :meth:`average`, which hands the sums out as its result
    averaged: bool = False
    _views: dict[tuple[str, int], Tensor] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def zeros(cls, like: Mapping[str, Tensor], ranked: bool = True) -> WeightedSums:
        sums = {k: torch.zeros(v.shape, dtype=accumulation_dtype(v), device=v.device) for k, v in like.items()}
        size = max((v.shape[rank_axis(k)] for k, v in like.items()), default=0) if ranked else 1
        return cls(sums, torch.zeros(size, dtype=torch.float64), ranked, {k: v.dtype for k, v in like.items()})

    def add(
        self,
        state: Mapping[str, Tensor],
        weight: float,
        covers: int | None = None,
        source: str = "",
        check: bool = True,
    ) -> None:
        """sums += weight * state, each tensor into its first rank dimensions; weight[:covers] += weight.

        ``covers``: the rank dimensions the contribution counts for. The update's rank (dimension-wise
        averaging; every tensor must have exactly that rank) or None: every dimension, those the update
        lacks counting as zeros (zero padding). Ignored with ``ranked=False``. ``check=False``: the caller
        has already checked ``state`` with :func:`check_state`.
        """
        self._usable()
        weight = float(weight)
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{source}: weight {weight} must be finite and >= 0")
        covers = covers if self.ranked else None
        if covers is not None and not 0 < covers <= self.weight.numel():
            raise ValueError(f"{source}: rank {covers} outside 1..{self.weight.numel()} (the global rank)")
        if check:
            check_state(self.sums, state, covers, self.ranked, source)
        if weight > 0:
            targets, sources = [], []
            for key, total in self.sums.items():
                tensor = state[key]
                if tensor.device != total.device:
                    tensor = tensor.to(total.device)
                targets.append(self._leading(key, tensor.shape[rank_axis(key)]) if self.ranked else total)
                sources.append(tensor)
            # in place into the views, nothing allocated; one call for all tensors (the Python loop of
            # one add_ per tensor cost as much as the additions at ViT-B-32 size)
            torch._foreach_add_(targets, sources, alpha=weight)
        self.weight[:covers] += weight

    def _leading(self, key: str, rank: int) -> Tensor:
        """The view of ``sums[key]``'s first ``rank`` rank dimensions (cached: a client rank recurs)."""
        view = self._views.get((key, rank))
        if view is None:
            total = self.sums[key]
            axis = rank_axis(key)
            view = self._views[key, rank] = total if rank == total.shape[axis] else total.narrow(axis, 0, rank)
        return view

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_views": {}}  # views would pickle as copies of their storage

    def merge(self, other: WeightedSums) -> None:
        """Add ``other``'s sums and weights (partial sums of another process, or a subtree)."""
        self._usable()
        other._usable()
        if other.ranked != self.ranked or other.weight.shape != self.weight.shape:
            raise ValueError("cannot merge weighted sums of different layouts")
        check_state(self.sums, other.sums, None, False, "merged sums")
        for key, total in self.sums.items():
            total.add_(other.sums[key].to(total.device))
        self.weight += other.weight

    def clear(self) -> None:
        self._usable()
        for total in self.sums.values():
            total.zero_()
        self.weight.zero_()

    def average(self, previous: Mapping[str, Tensor] | None = None) -> State:
        """sums / weight on every dimension of positive weight, ``previous`` on the others.

        Works in place: the returned tensors are the sums (when no dtype cast is needed), so this
        consumes the instance. ``previous`` may be None only if every dimension has positive weight.
        """
        self._usable()
        positive = self.weight > 0
        covered = int(positive.sum())
        prefix = bool(positive[:covered].all())  # contributions cover leading dimensions, so always, unless noised
        out = {}
        for key, total in self.sums.items():
            axis = rank_axis(key) if self.ranked else None
            size = total.shape[axis] if axis is not None else 1
            weight = self.weight[:size].to(total.device, total.dtype)
            weight = weight[0] if axis is None else weight.view((size, 1) if axis == 0 else (1, size))
            if covered < size and previous is None:
                raise ValueError(f"{key}: dimensions without weight and no previous values to keep")
            if prefix:
                count = min(covered, size)
                if axis is None:
                    if count:
                        total.div_(weight)
                    else:
                        total.copy_(previous[key])
                else:
                    total.narrow(axis, 0, count).div_(weight.narrow(axis, 0, count))
                    if count < size:
                        total.narrow(axis, count, size - count).copy_(previous[key].narrow(axis, count, size - count))
            else:
                mask = weight > 0
                total = torch.where(mask, total / torch.where(mask, weight, 1.0), previous[key].to(total))
            out[key] = total.to(self.dtypes.get(key, total.dtype))
        self.sums, self._views, self.averaged = {}, {}, True  # the result now owns the buffers
        return out

    def _usable(self) -> None:
        if self.averaged:
            raise RuntimeError("these sums were already averaged (finish consumes an accumulator): begin a new one")


def weighted_average(states: Sequence[Mapping[str, Tensor]], weights: Tensor) -> State:
    """sum_k w_k state_k / sum_k w_k per key (same shapes everywhere); used for heads and for FedAvg."""
    sums = WeightedSums.zeros(states[0], ranked=False)
    for k, state in enumerate(states):
        sums.add(state, float(weights[k]), source=f"state {k}")
    return sums.average()
