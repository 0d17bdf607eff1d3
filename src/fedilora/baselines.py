"""Moved: one module per baseline in :mod:`fedilora.algorithms` (``fedilora.baselines.FLoRA`` etc. still work)."""

from fedilora._moved import alias

__getattr__ = alias(
    __name__,
    ["fedilora.lora_ops", "fedilora.types", "fedilora.algorithms.base", "fedilora.algorithms.sums"]
    + [f"fedilora.algorithms.{m}" for m in ("hetlora", "flora", "flexlora", "local", "centralized")],
)
