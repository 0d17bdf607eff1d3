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

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

    from fedilora.types import ClientUpdate


class FederatedCallback:
    """Base class of federated callbacks: every hook is declared here and does nothing; override any.

    The engine passes the arguments by keyword (``trainer`` is None for a client on its own machine).
    """

    #: the hooks, in the order a round fires them (``fedilora.client.fit_client`` fires the client ones)
    HOOKS = (
        "on_fit_start",
        "on_round_start",
        "on_client_fit_start",
        "on_client_fit_end",
        "on_aggregate_end",
        "on_round_end",
        "on_fit_end",
    )

    def on_fit_start(self, trainer: Any) -> None:
        """Before the first round (of this start: after a resume, before the first round left)."""

    def on_round_start(self, trainer: Any, round: int) -> None:
        """Before the round's clients are trained (``round`` counts from 0)."""

    def on_client_fit_start(self, trainer: Any, round: int, client_id: int, rank: int) -> None:
        """Before one client's local training, where the client trains."""

    def on_client_fit_end(self, trainer: Any, round: int, update: ClientUpdate, received: Mapping[str, Tensor]) -> None:
        """After one client's local training, before upload: ``update`` may be modified in place."""

    def on_aggregate_end(
        self, trainer: Any, round: int, global_lora: Mapping[str, Tensor], updates: Sequence[ClientUpdate]
    ) -> None:
        """After the server aggregated the round's healthy ``updates`` into ``global_lora``."""

    def on_round_end(self, trainer: Any, round: int, metrics: dict[str, float]) -> None:
        """After the round (and its evaluation, if any): ``metrics`` may be extended before it is logged."""

    def on_fit_end(self, trainer: Any, results: dict) -> None:
        """After the last round, with the run's final results."""


def hook_caller(callbacks: Sequence[object], trainer: object = None) -> Callable[..., None]:
    """``call(hook, **kwargs)`` that fires ``hook`` on every callback having it, with ``trainer`` bound
    (what ``fabric.call`` does, for an engine without Fabric's callback list)."""

    def call(hook: str, **kwargs: Any) -> None:
        for callback in callbacks:
            method = getattr(callback, hook, None)
            if callable(method):
                method(trainer=trainer, **kwargs)

    return call
