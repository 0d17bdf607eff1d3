"""The round progress bar of a run: rounds done, the client and step under way with its step's training
loss, and the last round's mean training loss."""

from __future__ import annotations

import time
from collections.abc import Mapping

from torch import Tensor
from tqdm.auto import tqdm


class RoundBar:
    """A tqdm bar over ``rounds`` rounds, shown on one process only (``enabled``)."""

    def __init__(self, rounds: int, initial: int, enabled: bool) -> None:
        self.rounds = rounds
        self._bar = tqdm(total=rounds, initial=initial, desc="round", dynamic_ncols=True, disable=not enabled)
        self._loss = ""
        self._last_refresh = 0.0

    def show(self, round_: int, client: int, rank: int, step: int, total: int, loss: Tensor | None = None) -> None:
        if self._bar.disable:
            return
        now = time.monotonic()
        if now - self._last_refresh <= 0.5:  # a redraw (and a loss read) per optimizer step would slow runs down
            return
        current = f" loss {float(loss):.4g}" if loss is not None else ""  # None under DP: one client's figure
        self._bar.set_postfix_str(
            f"round {round_ + 1}/{self.rounds} client {client} (r={rank}) step {step}/{total}{current}{self._loss}",
            refresh=False,
        )
        self._bar.refresh()
        self._last_refresh = now

    def round_done(self, round_: int, metrics: Mapping[str, float]) -> None:
        if "train/loss" in metrics:  # in the bar: the round's mean training loss over its clients
            self._loss = f" | train loss {metrics['train/loss']:.4g} (round {round_ + 1})"
            self._bar.set_postfix_str(self._loss[3:], refresh=False)

    def update(self) -> None:
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
