"""Extension points of the federated trainer, fired through ``fabric.call``.

Subclass and override any hook; the trainer passes its arguments by keyword:

- ``on_fit_start(trainer)``
- ``on_round_start(trainer, round)``
- ``on_client_fit_start(trainer, round, client_id, rank)``
- ``on_client_fit_end(trainer, round, update, received)``: ``update`` (a ``ClientUpdate``) may be
  modified in place before it is uploaded; ``received`` is the adapter the client started from.
- ``on_aggregate_end(trainer, round, global_lora, updates)``: ``updates`` are the healthy updates of the
  round, gathered from every process
- ``on_round_end(trainer, round, metrics)``: ``metrics`` may be extended before it is logged.
- ``on_fit_end(trainer, results)``
"""

from __future__ import annotations


class FederatedCallback:
    """Base class of federated callbacks; every hook is optional."""
