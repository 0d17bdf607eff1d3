"""Moved: :mod:`fedilora.algorithms.dimension_wise_delta` (``fedilora.coverage.DimensionWiseDelta`` still works)."""

from fedilora._moved import alias

__getattr__ = alias(__name__, ["fedilora.algorithms.dimension_wise_delta"])
