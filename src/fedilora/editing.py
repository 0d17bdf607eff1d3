"""Moved: :mod:`fedilora.algorithms.editing` (``fedilora.editing.ModelEditing`` still works)."""

from fedilora._moved import alias

__getattr__ = alias(__name__, ["fedilora.algorithms.editing"])
