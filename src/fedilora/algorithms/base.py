"""The base of every federated method: what a method can do, declared, and its round as a stream.

A method (``Aggregator``) is a small object, independent of transport and of the trainer: ``broadcast``
(global adapter -> what a client of rank r starts from) and the aggregation as a stream::

    acc = aggregator.begin(global_lora, global_extra)  # one zero sum per tensor, one weight per rank dim
    acc.add(update)                                    # as each update arrives, in any order
    acc.merge(other)                                   # partial sums of another process or subtree
    new_lora = aggregator.finish(acc)                  # sums / weights; uncovered dimensions keep their values
    new_extra = aggregator.finish_extra(acc)           # heads: the sample-weighted average

``aggregate(global_lora, updates)`` is that loop over a list. What a method can do is declared on its
class (``accumulator``, ``merges_into_base``, ``communicates``, ``pooled``, ``requires_equal_ranks``,
``needs_constant_scale``, ``dp_refusal``, ``secagg_refusal``): the engines read these, never probe.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import ClassVar

from torch import Tensor

from fedilora.algorithms.sums import WeightedSums, check_state
from fedilora.lora_ops import nbytes, rank_axis, truncate
from fedilora.types import ClientUpdate, State

#: the refusal of a method that does not declare a private form (``dp_refusal`` / ``secagg_refusal``)
UNDECLARED = "it does not declare that its round is a sum of per-dimension contributions"


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


class Aggregator:
    """Base strategy: truncation on broadcast; subclasses define the streaming ``begin`` / ``finish``
    (or only ``aggregate``, for a strategy that needs all updates at once).

    Declared capabilities (class attributes), read by the engines, the privacy layer and the checks:

    - ``accumulator``: the :class:`Accumulator` ``begin`` returns (None: no streaming form).
    - ``requires_equal_ranks``: every client must have the same rank.
    - ``communicates`` (False: clients keep training their own adapter, nothing is averaged).
    - ``pooled`` (True: one model trains on the union of all clients' training data).
    - ``needs_constant_scale`` (the strategy forms products s * B @ A with one scale for all ranks).
    - ``merges_into_base``: ``finish`` leaves a dW per module in ``last_delta`` that every model copy
      adds to its frozen base weights (``merged_modules`` names the modules changed so far).
    - ``dp_refusal`` / ``secagg_refusal``: why the method cannot release a client-level differentially
      private aggregate / run on pairwise-masked sums; None where it can (its round is a sum of
      per-dimension contributions, :class:`DimensionAccumulator`, that ``finish`` turns into the result).

    A method with state across rounds overrides ``state_dict`` / ``load_state_dict`` (checkpoints).
    """

    accumulator: ClassVar[type[Accumulator] | None] = None
    requires_equal_ranks: ClassVar[bool] = False
    communicates: ClassVar[bool] = True
    pooled: ClassVar[bool] = False
    needs_constant_scale: ClassVar[bool] = False
    merges_into_base: ClassVar[bool] = False
    dp_refusal: ClassVar[str | None] = UNDECLARED
    secagg_refusal: ClassVar[str | None] = UNDECLARED
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
        if self.accumulator is None:
            raise NotImplementedError(f"{type(self).__name__} has no streaming form; call aggregate")
        return self.accumulator(global_lora, global_extra)

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

    def merged_modules(self) -> list[str]:
        """Modules whose base weights this method changed so far (``merges_into_base``); a checkpoint keeps them."""
        return []

    def state_dict(self) -> State:
        """What the method carries from round to round (a checkpoint stores it); nothing by default."""
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore ``state_dict``'s result."""


def average_sums(acc: Accumulator) -> State:
    """The end of a round of per-dimension sums: sums / weights, uncovered dimensions keep their values."""
    acc.close()
    return acc.lora.average(acc.previous)


def method_name(aggregator: object) -> str:
    """The class name, without jsonargparse's ``LazyInstance_`` prefix of lazily built defaults."""
    cls = aggregator if isinstance(aggregator, type) else type(aggregator)
    return cls.__name__.removeprefix("LazyInstance_")
