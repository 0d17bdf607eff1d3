"""Centralized training, the upper reference: all clients' data pooled into one model."""

from __future__ import annotations

from fedilora.algorithms.base import Accumulator, Aggregator, DimensionAccumulator
from fedilora.types import ClientUpdate, State


class PooledAccumulator(DimensionAccumulator):
    """Centralized: the one pooled update, weight 1, so that the sums are that update exactly."""

    def contribution(self, update: ClientUpdate) -> tuple[float, int | None]:
        if self.count:
            raise ValueError(f"client {update.client_id}: Centralized trains one pooled model, a second update came")
        return 1.0, update.rank


class Centralized(Aggregator):
    """All clients' training data pooled into one model of the global rank, the upper reference.

    Each round trains that model for the configured local epochs on the union of the clients' training
    splits (with their missing-modality masks); there is nothing to communicate.
    """

    accumulator = PooledAccumulator
    pooled = True
    communicates = False
    dp_refusal = (
        "it pools the raw data: there is no client update to privatise"
    )
    secagg_refusal = "it pools the raw data instead of aggregating updates"

    def finish(self, acc: Accumulator) -> State:
        acc.close()
        if acc.count != 1:
            raise ValueError(f"Centralized trains one pooled model: expected one update, got {acc.count}")
        return acc.lora.average(acc.previous)
