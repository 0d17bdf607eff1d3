"""The federated methods, one module per method, each an :class:`~fedilora.algorithms.base.Aggregator`.

- ``base``: the declared base (capabilities, the streaming round ``begin``/``add``/``merge``/``finish``)
- ``sums``: the per-dimension weighted sums most methods accumulate
- ``dimension_wise``, ``dimension_wise_delta``: FediLoRA's aggregation rules
- ``editing``: FediLoRA's layer-wise model editing (a client-side callback)
- ``fedavg``, ``hetlora``, ``flora``, ``flexlora``: the baselines; ``local``, ``centralized``: the references

Adding a method is one new module here plus a config: :func:`methods` finds every ``Aggregator``
subclass of this package by its class name (what ``trainer.aggregator: <Name>`` selects).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedilora.algorithms.base import Aggregator

#: where this package's own names live (imported on first use: importing the package costs nothing)
_HOMES = {
    "Aggregator": "base",
    "Accumulator": "base",
    "DimensionAccumulator": "base",
    "WeightedSums": "sums",
    "DimensionWise": "dimension_wise",
    "DimensionWiseDelta": "dimension_wise_delta",
    "FedAvg": "fedavg",
    "HetLoRA": "hetlora",
    "FLoRA": "flora",
    "FlexLoRA": "flexlora",
    "Local": "local",
    "Centralized": "centralized",
    "ModelEditing": "editing",
}
__all__ = [*_HOMES, "find", "methods", "refusal"]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def methods() -> dict[str, type[Aggregator]]:
    """Every method of this package by class name, each module imported (a new file is found here)."""
    from fedilora.algorithms.base import Aggregator

    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    found: dict[str, type[Aggregator]] = {}
    queue = list(Aggregator.__subclasses__())
    while queue:
        cls = queue.pop(0)
        queue.extend(cls.__subclasses__())
        if cls.__module__.startswith(f"{__name__}.") and not cls.__name__.startswith("LazyInstance_"):
            found.setdefault(cls.__name__, cls)
    return found


def find(name: str) -> type[Aggregator]:
    """The method named ``name`` (its class name, e.g. ``DimensionWise``)."""
    from fedilora.errors import ConfigError

    found = methods()
    if name not in found:
        raise ConfigError(f"trainer.aggregator: unknown method {name!r}; known: {', '.join(sorted(found))}")
    return found[name]


def refusal(aggregator: Aggregator | type[Aggregator] | str, capability: str) -> tuple[str, str | None]:
    """``(name, why not)`` of a method for a declared capability (``dp_refusal``, ``secagg_refusal``);
    ``why not`` is None where the method supports it. A name is looked up with :func:`find`."""
    from fedilora.algorithms.base import method_name

    method = find(aggregator) if isinstance(aggregator, str) else aggregator
    return method_name(method), getattr(method, capability)
