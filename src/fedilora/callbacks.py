"""Extension points of a federation, fired by the engine (``fabric.call`` in ``FederatedTrainer``).

Subclass and override any hook; the engine passes its arguments by keyword. Server-side hooks:

- ``on_fit_start(trainer)``
- ``on_round_start(trainer, round)``
- ``on_aggregate_end(trainer, round, global_lora, updates)``: ``updates`` are the healthy updates of the
  round, gathered from every process
- ``on_round_end(trainer, round, metrics)``: ``metrics`` may be extended before it is logged.
- ``on_fit_end(trainer, results)``

Client-side hooks, fired by ``fedilora.client.fit_client`` where the client trains:

- ``on_client_fit_start(trainer, round, client_id, rank)``
- ``on_client_fit_end(trainer, round, update, received)``: ``update`` (a ``ClientUpdate``) may be
  modified in place before it is uploaded; ``received`` is the adapter the client started from.

``trainer`` is the engine. On the server side it offers at least ``log_histogram(tag, values, step)``
and ``log_text(tag, text, step)`` (``FederatedTrainer`` is the whole Fabric engine). A client that runs
on its own machine has no trainer and passes ``trainer=None``: client-side hooks must work from their
other arguments alone (``ModelEditing`` does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


class FederatedCallback:
    """Base class of federated callbacks; every hook is optional."""


def hook_caller(callbacks: Sequence[object], trainer: object = None) -> Callable[..., None]:
    """``call(hook, **kwargs)`` that fires ``hook`` on every callback having it, with ``trainer`` bound
    (what ``fabric.call`` does, for an engine without Fabric's callback list)."""

    def call(hook: str, **kwargs: Any) -> None:
        for callback in callbacks:
            method = getattr(callback, hook, None)
            if callable(method):
                method(trainer=trainer, **kwargs)

    return call
