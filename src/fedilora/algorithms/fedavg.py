"""FedAvg (McMahan et al. 2017): the plain sample-weighted average of A and B; every client has one rank."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor

from fedilora.algorithms.base import Accumulator, Aggregator, DimensionAccumulator, average_sums
from fedilora.errors import ConfigError
from fedilora.types import ClientUpdate, State


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


class FedAvg(Aggregator):
    """Plain weighted average of A and B; every client must have the same rank.

    With equal ranks r = R the dimension-wise sums are exactly FedAvg; if the global rank exceeds the
    clients' rank, the dimensions beyond it keep their previous values.
    """

    accumulator = EqualRankAccumulator
    requires_equal_ranks = True
    dp_refusal = None
    secagg_refusal = None

    def aggregate(self, global_lora: Mapping[str, Tensor], updates: Iterable[ClientUpdate]) -> State:
        updates = list(updates)
        equal_ranks({u.rank for u in updates})
        return super().aggregate(global_lora, updates)

    def finish(self, acc: Accumulator) -> State:
        return average_sums(acc)
