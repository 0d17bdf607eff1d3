"""Old module paths kept as aliases: ``fedilora.coverage``, ``fedilora.baselines`` and ``fedilora.editing``."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Iterable
from typing import Any


def alias(old: str, homes: Iterable[str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``old``: a name found in one of the ``homes`` modules is returned
    with a ``DeprecationWarning`` naming its new path (hidden by default: configs that spell the old
    ``class_path`` run quietly)."""
    homes = list(homes)

    def __getattr__(name: str) -> Any:
        if not name.startswith("__"):
            for home in homes:
                module = importlib.import_module(home)
                if hasattr(module, name):
                    warnings.warn(
                        f"{old}.{name} moved to {home}.{name}; the old path will be removed",
                        DeprecationWarning,
                        stacklevel=2,
                    )
                    return getattr(module, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r}")

    return __getattr__
