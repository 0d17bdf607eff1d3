"""Server-side aggregation of heterogeneous-rank LoRA adapters, in streaming form.

Adapters are ``dict[str, Tensor]`` keyed by peft's parameter names without the adapter name
(``...c_fc.lora_A.weight``). For a module, ``lora_A`` is ``[r, d_in]`` and ``lora_B`` is
``[d_out, r]``: the rank axis is 0 for A and 1 for B. A and B are told apart by name only, never by
comparing a shape with the rank (``d_in`` may equal the rank).

An aggregator is a small object, independent of transport and of the trainer: ``broadcast`` (global
adapter -> what a client of rank r starts from) and the aggregation as a stream::

    acc = aggregator.begin(global_lora, global_extra)  # one zero sum per tensor, one weight per rank dim
    acc.add(update)                                    # as each update arrives, in any order
    acc.merge(other)                                   # partial sums of another process or subtree
    new_lora = aggregator.finish(acc)                  # sums / weights; uncovered dimensions keep their values
    new_extra = aggregator.finish_extra(acc)           # heads: the sample-weighted average

``aggregate(global_lora, updates)`` is that loop over a list. The server holds the sums (one global
adapter) and the update being added, never K copies. Weights are the raw n_k, divided at the end by
the accumulated per-dimension weight, so nothing needs all updates up front; the sums and weights
(``acc.lora.sums``, ``acc.lora.weight``) are what Flower replies, differential-privacy noise and
masked (secure) sums work on.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
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


@functools.lru_cache(maxsize=1 << 16)
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


def dimension_weights(ranks: Sequence[int], weights: Tensor, global_rank: int) -> Tensor:
    """``[K, R]`` coefficients of dimension-wise aggregation, in closed form.

    Column i holds p_k / sum_{j in C_i} p_j for the clients C_i = {k : r_k > i} that have dimension i
    and 0 for the others; a column no client covers is all zero. :class:`WeightedSums` reaches the same
    coefficients without knowing the other clients: w_k / weight[i], weight[i] = sum_{j in C_i} w_j.
    """
    covers = torch.arange(global_rank)[None, :] < torch.as_tensor(ranks)[:, None]
    mass = weights.to(torch.float64)[:, None] * covers
    total = mass.sum(dim=0, keepdim=True)
    return torch.where(total > 0, mass / total.clamp_min(torch.finfo(torch.float64).tiny), 0.0)


def nbytes(state: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def accumulation_dtype(t: Tensor) -> torch.dtype:
    # half-precision sums over many clients would lose the small contributions
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


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


class Accumulator:
    """One round's aggregation in streaming form, as ``Aggregator.begin`` returns it.

    Holds the heads' sample-weighted sums (``extra``, when the round was begun with the global heads),
    the number of updates and of samples; subclasses hold the LoRA part. ``add`` checks an update
    completely before adding anything, so that a malformed update leaves the accumulator as it was.
    ``merge(other)`` consumes ``other``. The global tensors passed to ``begin`` are read again at the end
    (uncovered dimensions): do not modify them in place before ``finish``.
    """

    def __init__(self, previous: Mapping[str, Tensor], previous_extra: Mapping[str, Tensor] | None = None) -> None:
        self.previous = previous
        self.previous_extra = previous_extra
        self.global_rank = max((v.shape[rank_axis(k)] for k, v in previous.items()), default=0)
        self.extra = None if previous_extra is None else WeightedSums.zeros(previous_extra, ranked=False)
        self.count = 0
        self.num_samples = 0
        self.closed = False

    def add(self, update: ClientUpdate) -> Accumulator:
        self._open()
        source = f"client {update.client_id}"
        if update.num_samples <= 0:
            raise ValueError(f"{source}: the number of samples must be positive, got {update.num_samples}")
        if not 0 < update.rank <= self.global_rank:
            raise ValueError(f"{source}: rank {update.rank} is outside 1..{self.global_rank} (the global rank)")
        check_state(self.previous, update.lora, update.rank, True, source)
        if self.extra is not None:
            check_state(self.extra.sums, update.extra, None, False, source)
        self._add_lora(update, source)
        if self.extra is not None:
            self.extra.add(update.extra, update.num_samples, source=source, check=False)
        self.count += 1
        self.num_samples += update.num_samples
        return self

    def merge(self, other: Accumulator) -> Accumulator:
        self._open()
        other._open()
        if type(other) is not type(self):
            raise TypeError(f"cannot merge a {type(other).__name__} into a {type(self).__name__}")
        if other is self:
            raise ValueError("cannot merge an accumulator into itself")
        if (self.extra is None) != (other.extra is None):
            raise ValueError("cannot merge an accumulator of the heads with one without them")
        self._merge_lora(other)
        if self.extra is not None:
            self.extra.merge(other.extra)
        self.count += other.count
        self.num_samples += other.num_samples
        other.closed = True  # its sums are now counted here
        return self

    def close(self) -> None:
        """Called by ``finish``, which hands the buffers out as its result: no more adds or merges."""
        self._open()
        self.closed = True

    def _open(self) -> None:
        if self.closed:
            raise RuntimeError("this accumulator was finished (finish consumes it): begin a new one")

    def nbytes(self) -> int:
        """Bytes of the buffers this accumulator holds (its sums and weights), whatever the count."""
        return nbytes(self.extra.sums) + self.extra.weight.nbytes if self.extra is not None else 0

    def _add_lora(self, update: ClientUpdate, source: str) -> None:
        raise NotImplementedError

    def _merge_lora(self, other: Accumulator) -> None:
        raise NotImplementedError


class DimensionAccumulator(Accumulator):
    """Per-dimension sums and weights of the LoRA tensors (FediLoRA): ``lora`` is a :class:`WeightedSums`.

    ``contribution`` says how an update counts: weight n_k on its first r_k dimensions. ``total`` is the
    weight of every update added, whatever its rank (what a rule that counts a missing dimension as no
    change divides by).
    """

    def __init__(self, previous: Mapping[str, Tensor], previous_extra: Mapping[str, Tensor] | None = None) -> None:
        super().__init__(previous, previous_extra)
        self.lora = WeightedSums.zeros(previous)
        self.total = 0.0

    def contribution(self, update: ClientUpdate) -> tuple[float, int | None]:
        """(weight, covered rank dimensions) of ``update``'s LoRA tensors; None covers all (zero padding)."""
        return float(update.num_samples), update.rank

    def _add_lora(self, update: ClientUpdate, source: str) -> None:
        weight, covers = self.contribution(update)
        self.lora.add(update.lora, weight, covers, source, check=False)  # checked by add, at the update's rank
        self.total += weight

    def _merge_lora(self, other: Accumulator) -> None:
        self.lora.merge(other.lora)
        self.total += other.total

    def nbytes(self) -> int:
        return super().nbytes() + nbytes(self.lora.sums) + self.lora.weight.nbytes


def equal_ranks(ranks: set[int]) -> None:
    """FedAvg's precondition, as the config error it is."""
    if len(ranks) > 1:
        raise ConfigError(f"trainer.aggregator: FedAvg needs equal ranks, got {sorted(ranks)}; use DimensionWise")


class EqualRankAccumulator(DimensionAccumulator):
    """FedAvg: the dimension-wise sums, refusing an update whose rank differs from the others'."""

    rank: int | None = None

    def add(self, update: ClientUpdate) -> Accumulator:
        self._same_rank(update.rank)  # before the shapes: a rank mix is a config error, not a malformed update
        return super().add(update)

    def _same_rank(self, rank: int | None) -> None:
        equal_ranks({r for r in (self.rank, rank) if r is not None})
        self.rank = self.rank if rank is None else rank

    def _merge_lora(self, other: Accumulator) -> None:
        self._same_rank(other.rank)
        super()._merge_lora(other)


class Aggregator:
    """Base strategy: truncation on broadcast; subclasses define the streaming ``begin`` / ``finish``
    (or only ``aggregate``, for a strategy that needs all updates at once).

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

    def begin(self, global_lora: Mapping[str, Tensor], global_extra: Mapping[str, Tensor] | None = None) -> Accumulator:
        """An empty accumulator for one round; with ``global_extra`` it also averages the heads."""
        raise NotImplementedError(f"{type(self).__name__} has no streaming form; call aggregate")

    def finish(self, acc: Accumulator) -> State:
        """The new global adapter from a round's accumulator (which it consumes)."""
        raise NotImplementedError(f"{type(self).__name__} has no streaming form; call aggregate")

    def finish_extra(self, acc: Accumulator) -> State:
        """The new heads: sum_k n_k extra_k / sum_k n_k (the previous heads if no update was added)."""
        if acc.extra is None:
            raise ValueError("the round was begun without global_extra, so the heads were not accumulated")
        return acc.extra.average(acc.previous_extra)

    def aggregate(self, global_lora: Mapping[str, Tensor], updates: Iterable[ClientUpdate]) -> State:
        """previous global adapter + this round's updates -> new global adapter (the stream over a list)."""
        acc = self.begin(global_lora)
        for update in updates:
            acc.add(update)
        return self.finish(acc)


class DimensionWise(Aggregator):
    """FediLoRA: dimension-wise reweighted averaging, no dilution by zero padding."""

    def begin(
        self, global_lora: Mapping[str, Tensor], global_extra: Mapping[str, Tensor] | None = None
    ) -> DimensionAccumulator:
        return DimensionAccumulator(global_lora, global_extra)

    def finish(self, acc: Accumulator) -> State:
        acc.close()
        return acc.lora.average(acc.previous)


class FedAvg(Aggregator):
    """Plain weighted average of A and B; every client must have the same rank.

    With equal ranks r = R the dimension-wise sums are exactly FedAvg; if the global rank exceeds the
    clients' rank, the dimensions beyond it keep their previous values.
    """

    requires_equal_ranks = True

    def begin(
        self, global_lora: Mapping[str, Tensor], global_extra: Mapping[str, Tensor] | None = None
    ) -> EqualRankAccumulator:
        return EqualRankAccumulator(global_lora, global_extra)

    def aggregate(self, global_lora: Mapping[str, Tensor], updates: Iterable[ClientUpdate]) -> State:
        updates = list(updates)
        equal_ranks({u.rank for u in updates})
        return super().aggregate(global_lora, updates)

    def finish(self, acc: Accumulator) -> State:
        acc.close()
        return acc.lora.average(acc.previous)
