"""The client side of a federated round: local training of one client from what it received.

``fit_client`` needs no trainer: the Fabric engine (``fedilora.trainer``) calls it for each client a
process trains, and a Flower ClientApp calls it for its own partition. Either way it seeds from
``client_seed(seed, round, client)``, so a client's round is the same whichever engine or process runs it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import torch
from lightning.fabric import Fabric
from torch import Tensor

from fedilora.errors import ConfigError
from fedilora.model import LoRACLIPClassifier
from fedilora.server import client_seed
from fedilora.types import ClientUpdate


class LateClient(Exception):
    """A client still training at its round's deadline (``trainer.round_timeout_s``): left out like a fault."""


class Interrupted(BaseException):
    """A stop request seen between two optimizer steps (a BaseException: fault handling must not absorb it)."""


class HookCall(Protocol):
    """Fires one federated callback hook by name, e.g. ``call("on_client_fit_end", round=0, ...)``; the
    engine binds ``trainer=`` (see ``fedilora.callbacks``)."""

    def __call__(self, hook: str, **kwargs: Any) -> None: ...


def no_hooks(hook: str, **kwargs: Any) -> None:
    """A ``HookCall`` for a client without callbacks."""


def fit_client(
    model: LoRACLIPClassifier,
    fabric: Fabric,
    train_loader: Callable[[torch.Generator], Iterable[Mapping[str, Tensor]]],
    num_samples: int,
    *,
    round: int,
    client_id: int,
    rank: int,
    lora: Mapping[str, Tensor],
    extra: Mapping[str, Tensor],
    seed: int,
    local_epochs: int = 1,
    max_local_steps: int | None = None,
    call: HookCall = no_hooks,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, int, Tensor], None] | None = None,
    deadline: float | None = None,
) -> ClientUpdate:
    """Train one client for a round from ``lora``/``extra`` (what it received) and return its update.

    Fires ``on_client_fit_start`` before and ``on_client_fit_end`` (``update``, ``received=lora``; e.g.
    ``ModelEditing`` edits the update there) after training, through ``call``.

    Args:
        model: The client LightningModule with an adapter of ``rank``; its own ``training_step`` and
            ``configure_optimizers`` are used.
        fabric: Device placement, precision (autocast and backward) of this process.
        train_loader: Builds the client's training loader from a generator seeded for this client and
            round (the shuffle order then does not depend on the engine).
        num_samples: The client's training samples (the aggregation weight).
        seed: The run's seed; the client trains under ``client_seed(seed, round, client_id)``.
        local_epochs: Epochs over ``train_loader``.
        max_local_steps: At most this many optimizer steps (None: no limit).
        call: Fires a federated callback hook by name.
        should_stop: Checked after every optimizer step; True raises ``Interrupted``.
        on_step: Called with (step, total steps, the step's detached loss) after every optimizer step
            (progress display; reading the loss's value is left to it, so that a GPU is not synced every step).
        deadline: A ``time.monotonic()`` time: past it, after an optimizer step, ``LateClient`` is raised.

    Raises:
        ConfigError: a data error (a bad file or row) met while training, with its original message
            (also when it was raised in a DataLoader worker). Engines stop the run on it: it is not a
            client fault.
    """
    call("on_client_fit_start", round=round, client_id=client_id, rank=rank)
    model.load_client_state(rank, lora, extra)
    generator_seed = client_seed(seed, round, client_id)
    torch.manual_seed(generator_seed)  # dropout etc.: the same whichever process trains this client
    loader = train_loader(torch.Generator().manual_seed(generator_seed))
    optimizer = _optimizer(model.configure_optimizers())
    model.train()
    total_steps = local_epochs * len(loader)
    if max_local_steps is not None:
        total_steps = min(total_steps, max_local_steps)
    loss_sum, step = torch.zeros((), device=fabric.device), 0
    try:
        while step < total_steps:
            for batch_idx, batch in enumerate(loader):
                batch = fabric.to_device(batch)
                with fabric.autocast():
                    loss = model.training_step(batch, batch_idx)
                fabric.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                step += 1
                if should_stop is not None and should_stop():
                    raise Interrupted
                if on_step is not None:
                    on_step(step, total_steps, loss.detach())
                if deadline is not None and time.monotonic() > deadline:
                    raise LateClient(f"still training at the round's deadline (step {step} of {total_steps})")
                if step >= total_steps:
                    break
    except ConfigError as err:
        message = _worker_message(str(err))
        if message == str(err):
            raise
        raise ConfigError(message) from None  # a DataLoader worker's wrapping: keep the one-line message
    update = ClientUpdate(
        client_id=client_id,
        rank=rank,
        num_samples=num_samples,
        lora=model.lora_state(rank),
        extra=model.extra_state(),
        train_loss=float(loss_sum) / max(step, 1),  # one device sync per client, not per step
    )
    call("on_client_fit_end", round=round, update=update, received=lora)
    return update


def _worker_message(message: str) -> str:
    """The original message of an error re-raised from a DataLoader worker (which wraps it in
    "Caught ConfigError in DataLoader worker process N. Original Traceback ...")."""
    if not message.startswith("Caught ") or "Original Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def _optimizer(configured) -> torch.optim.Optimizer:
    """The optimizer out of whatever ``configure_optimizers`` returned (Lightning's accepted forms)."""
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, dict):
        return configured["optimizer"]
    if isinstance(configured, (list, tuple)) and configured:
        first = configured[0]
        return first[0] if isinstance(first, (list, tuple)) else _optimizer(first)
    raise TypeError(f"configure_optimizers returned {type(configured).__name__}; expected an optimizer")
