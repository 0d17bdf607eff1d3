"""The server's fault filter on client updates: per update (non-finite values, too large a change) and
per round (norms far above the round's median). ``FederatedServer`` applies them; see ``fedilora.server``."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedilora.types import ClientUpdate

#: the robust norm rule needs this many finite updates in a round for its median to mean something
MIN_UPDATES_FOR_MEDIAN = 3


def update_norm(update: ClientUpdate, lora: Mapping[str, Tensor], extra: Mapping[str, Tensor]) -> float:
    """L2 distance of the update (LoRA and head together) from what the client received (float64)."""
    squared = torch.zeros((), dtype=torch.float64)
    for new, old in ((update.lora, lora), (update.extra, extra)):
        for key, value in new.items():
            squared += (value.double() - old[key].double().to(value.device)).square().sum().cpu()
    return float(squared.sqrt())


def check_update(
    update: ClientUpdate,
    lora: Mapping[str, Tensor],
    extra: Mapping[str, Tensor],
    max_update_norm: float | None = None,
) -> str | None:
    """Why ``update`` must not be aggregated (non-finite values, or too large a change), or None.

    ``lora``/``extra`` are what the client received. Sets ``update.metrics["update_norm"]``, which the
    round's outlier rule (``outliers``) reads.
    """
    for state in (update.lora, update.extra):
        for key, value in state.items():
            if not torch.isfinite(value).all():
                return f"non-finite values in {key}"
    norm = update_norm(update, lora, extra)
    update.metrics["update_norm"] = norm
    if max_update_norm is not None and norm > max_update_norm:
        return f"update norm {norm:.4g} exceeds trainer.max_update_norm={max_update_norm}"
    return None


def outliers(norms: Sequence[float], factor: float | None) -> tuple[list[int], float]:
    """Positions of the norms above ``factor`` x their median, and the largest norm / median ratio.

    Needs ``MIN_UPDATES_FOR_MEDIAN`` norms and a positive median; otherwise nothing is an outlier and
    the ratio is NaN. ``factor`` None computes the ratio but rejects nothing.
    """
    if len(norms) < MIN_UPDATES_FOR_MEDIAN:
        return [], math.nan
    median = statistics.median(norms)
    if not median > 0:
        return [], math.nan
    far = [i for i, n in enumerate(norms) if factor is not None and n > factor * median]
    return far, max(norms) / median
