"""Local training, the lower reference: no federation."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor

from fedilora.algorithms.base import Accumulator, Aggregator, DimensionAccumulator
from fedilora.types import ClientUpdate, State


class Local(Aggregator):
    """No federation, the lower reference: every client keeps training its own adapter and head from
    round to round; nothing is uploaded, averaged or broadcast."""

    accumulator = DimensionAccumulator
    communicates = False
    dp_refusal = (
        "nothing is shared, so there is nothing to privatise"
    )
    secagg_refusal = "nothing is aggregated"

    def finish(self, acc: Accumulator) -> State:
        acc.close()
        return dict(acc.previous)

    def aggregate(self, global_lora: Mapping[str, Tensor], updates: Iterable[ClientUpdate]) -> State:
        return dict(global_lora)
