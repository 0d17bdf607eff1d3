"""The aggregation API in one import: the base ``Aggregator``, the streaming sums, FediLoRA's rule and FedAvg.

The code lives in :mod:`fedilora.algorithms` (one module per method) and :mod:`fedilora.lora_ops`;
this module re-exports it so that ``fedilora.aggregation.Aggregator`` (the base to subclass) and the
``class_path`` names of existing configs (``fedilora.aggregation.DimensionWise``, ``.FedAvg``) keep working.
"""

from fedilora.algorithms.base import Accumulator, Aggregator, DimensionAccumulator, average_sums
from fedilora.algorithms.dimension_wise import DimensionWise, dimension_weights, dimension_wise_average
from fedilora.algorithms.fedavg import EqualRankAccumulator, FedAvg, equal_ranks
from fedilora.algorithms.sums import WeightedSums, check_state, sample_weights, weighted_average
from fedilora.lora_ops import accumulation_dtype, nbytes, rank_axis, truncate
from fedilora.types import ClientUpdate, State

__all__ = [
    "Accumulator",
    "Aggregator",
    "ClientUpdate",
    "DimensionAccumulator",
    "DimensionWise",
    "EqualRankAccumulator",
    "FedAvg",
    "State",
    "WeightedSums",
    "accumulation_dtype",
    "average_sums",
    "check_state",
    "dimension_weights",
    "dimension_wise_average",
    "equal_ranks",
    "nbytes",
    "rank_axis",
    "sample_weights",
    "truncate",
    "weighted_average",
]
