"""FediLoRA's layer-wise model editing.

After local training in round t >= 1, the client compares each LoRA matrix L_l with the global one it
received at the start of the round, G_l, by s_l = cos(vec(L_l), vec(G_l)). The ``num_edits`` least
similar matrices with s_l < threshold are pulled back towards the global model:
L_l <- lam * L_l + (1 - lam) * G_l. The edited adapter is both the upload and the client's
personalized model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fedilora.callbacks import FederatedCallback
from fedilora.errors import ConfigError

EditKeys = Literal["lora_A", "lora_B", "all"]
Blend = Literal["similarity", "half", "replace"]


@dataclass
class EditReport:
    similarities: dict[str, float]
    edited: dict[str, float]  # matrix name -> lam used


def selects(key: str, keys: EditKeys) -> bool:
    return keys == "all" or f".{keys}." in key or key.startswith(f"{keys}.")


def layer_similarities(local: Mapping[str, Tensor], received: Mapping[str, Tensor], keys: EditKeys) -> dict[str, float]:
    """s_l = cos(vec(L_l), vec(G_l)) for every matrix selected by ``keys`` (0 where one is zero)."""
    names = [k for k in local if selects(k, keys)]
    return {
        k: float(F.cosine_similarity(local[k].flatten().double(), received[k].flatten().double(), dim=0, eps=1e-30))
        for k in names
    }


def blend_weight(similarity: float, blend: Blend) -> float:
    """lam, the weight kept on the local matrix."""
    if blend == "similarity":
        return min(max(similarity, 0.0), 1.0)
    return 0.5 if blend == "half" else 0.0


def edit_layers(
    local: Mapping[str, Tensor],
    received: Mapping[str, Tensor],
    keys: EditKeys = "lora_A",
    num_edits: int = 1,
    threshold: float = 0.95,
    blend: Blend = "similarity",
) -> tuple[dict[str, Tensor], EditReport]:
    """Blend the ``num_edits`` least similar selected matrices with s_l < ``threshold`` towards ``received``."""
    similarities = layer_similarities(local, received, keys)
    worst = sorted(similarities, key=similarities.__getitem__)[:num_edits]
    edited = {}
    out = dict(local)
    for key in worst:
        if similarities[key] < threshold:
            lam = blend_weight(similarities[key], blend)
            out[key] = lam * local[key] + (1.0 - lam) * received[key]
            edited[key] = lam
    return out, EditReport(similarities, edited)


class ModelEditing(FederatedCallback):
    """Layer-wise model editing as a federated callback (fires in ``on_client_fit_end``).

    Args:
        keys: Which LoRA matrices are candidates: ``lora_A`` (default, as in the paper), ``lora_B``, ``all``.
        num_edits: How many of the least similar matrices may be edited per client and round.
        threshold: Only matrices with cosine similarity below this are edited.
        blend: Weight lam kept on the local matrix: ``similarity`` (lam = clamp(s, 0, 1)), ``half``
            (0.5) or ``replace`` (0, take the global matrix).
    """

    def __init__(
        self, keys: EditKeys = "lora_A", num_edits: int = 1, threshold: float = 0.95, blend: Blend = "similarity"
    ):
        if keys not in ("lora_A", "lora_B", "all"):
            raise ConfigError(f"ModelEditing.keys: unknown {keys!r}; allowed: lora_A, lora_B, all")
        if blend not in ("similarity", "half", "replace"):
            raise ConfigError(f"ModelEditing.blend: unknown {blend!r}; allowed: similarity, half, replace")
        if num_edits < 0:
            raise ConfigError(f"ModelEditing.num_edits: must be >= 0, got {num_edits}")
        if not -1.0 <= threshold <= 1.0:
            raise ConfigError(f"ModelEditing.threshold: a cosine similarity in [-1, 1], got {threshold}")
        self.keys, self.num_edits, self.threshold, self.blend = keys, num_edits, threshold, blend
        self._reports: list[tuple[int, EditReport]] = []

    def on_client_fit_end(self, trainer, round: int, update, received: Mapping[str, Tensor]) -> None:
        if round < 1:  # round 0 starts from the initialisation: there is no global model to repair towards
            return
        update.lora, report = edit_layers(update.lora, received, self.keys, self.num_edits, self.threshold, self.blend)
        # kept on the update so that the statistics travel with it to every process
        update.metrics["edits"] = float(len(report.edited))
        update.info["edit_report"] = report

    def on_aggregate_end(self, trainer, round: int, global_lora, updates) -> None:
        self._reports = [(u.client_id, u.info["edit_report"]) for u in updates if "edit_report" in u.info]

    def on_round_end(self, trainer, round: int, metrics: dict[str, float]) -> None:
        if not self._reports:
            return
        sims = torch.tensor([s for _, r in self._reports for s in r.similarities.values()])
        metrics.update(
            {
                "edit/num_edited": float(sum(len(r.edited) for _, r in self._reports)),
                "edit/similarity_min": float(sims.min()),
                "edit/similarity_mean": float(sims.mean()),
            }
        )
        trainer.log_histogram("edit/similarity", sims, round)
        edited = [f"client {c}: {k} (lam={lam:.3f})" for c, r in self._reports for k, lam in r.edited.items()]
        trainer.log_text("edit/edited_matrices", "\n\n".join(edited) or "none", round)
