"""FediLoRA's layer-wise model editing.

After local training in round t >= 1, the client compares each LoRA matrix L_l with the global one it
received at the start of the round, G_l, by s_l = cos(vec(L_l), vec(G_l)). The ``num_edits`` least
similar matrices with s_l < threshold are pulled back towards the global model:
L_l <- lam * L_l + (1 - lam) * G_l. The edited adapter is both the upload and the client's
personalized model.

The paper's rule compares s_l with an absolute threshold. Its level depends on the scale: with few
local steps every s_l stays near 1 and the rule never fires (0 edits in 40 rounds on a real set). The
scale-free ``outlier`` criterion instead edits the matrices whose similarity is an outlier among the
client's own matrices (robust z-score against the median and the median absolute deviation), and its
``median`` blend pulls such a matrix's deviation from the global back to the client's median one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fedilora.callbacks import FederatedCallback
from fedilora.errors import ConfigError

EditKeys = Literal["lora_A", "lora_B", "all"]
Blend = Literal["similarity", "half", "replace", "median"]
Criterion = Literal["threshold", "outlier"]

#: 1.4826 * MAD estimates the standard deviation of normal data
_MAD_TO_STD = 1.4826


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


def blend_weight(similarity: float, blend: Blend, median_similarity: float = 1.0) -> float:
    """lam, the weight kept on the local matrix.

    ``median``: lam = (1 - median s) / (1 - s_l), which scales the matrix's deviation from the global,
    L - G, down to the client's median deviation (cos distance), whatever the level of the similarities.
    """
    if blend == "similarity":
        return min(max(similarity, 0.0), 1.0)
    if blend == "median":
        return min(max((1.0 - median_similarity) / max(1.0 - similarity, 1e-12), 0.0), 1.0)
    return 0.5 if blend == "half" else 0.0


def outlier_scores(similarities: Mapping[str, float]) -> dict[str, float]:
    """Robust z-scores z_l = (s_l - median s) / (1.4826 MAD(s)) of a client's matrices (0 if MAD is 0).

    Only ranks matter, not the level of the similarities: a matrix that moved away from the global far
    more than the client's other matrices gets a large negative score however close to 1 they all are.
    """
    values = torch.tensor(list(similarities.values()), dtype=torch.float64)
    median = values.median()
    spread = _MAD_TO_STD * (values - median).abs().median()
    if spread <= 0:
        return dict.fromkeys(similarities, 0.0)
    return {k: float((v - median) / spread) for k, v in zip(similarities, values, strict=True)}


def edit_layers(
    local: Mapping[str, Tensor],
    received: Mapping[str, Tensor],
    keys: EditKeys = "lora_A",
    num_edits: int = 1,
    threshold: float = 0.95,
    blend: Blend = "similarity",
    criterion: Criterion = "threshold",
    z_threshold: float = 3.0,
) -> tuple[dict[str, Tensor], EditReport]:
    """Blend the ``num_edits`` least similar selected matrices towards ``received``.

    ``criterion``: ``threshold`` (the paper) edits those with s_l < ``threshold``; ``outlier`` edits
    those whose robust z-score (:func:`outlier_scores`) is below ``-z_threshold``.
    """
    similarities = layer_similarities(local, received, keys)
    worst = sorted(similarities, key=similarities.__getitem__)[:num_edits]
    scores = outlier_scores(similarities) if criterion == "outlier" and similarities else {}
    median = float(torch.tensor(list(similarities.values()), dtype=torch.float64).median()) if similarities else 1.0
    edited = {}
    out = dict(local)
    for key in worst:
        fires = similarities[key] < threshold if criterion == "threshold" else scores[key] < -z_threshold
        if fires:
            lam = blend_weight(similarities[key], blend, median)
            out[key] = lam * local[key] + (1.0 - lam) * received[key]
            edited[key] = lam
    return out, EditReport(similarities, edited)


class ModelEditing(FederatedCallback):
    """Layer-wise model editing as a federated callback (fires in ``on_client_fit_end``).

    Counts what it does: per round ``edit/num_edited`` and ``edit/clients_edited`` in the metrics; at the
    end ``results["edits"]`` (total, rounds with edits, rounds where editing could run) and a warning
    line when a run made no edit at all.

    Args:
        keys: Which LoRA matrices are candidates: ``lora_A`` (default, as in the paper), ``lora_B``, ``all``.
        num_edits: How many of the least similar matrices may be edited per client and round.
        threshold: ``criterion: threshold``: only matrices with cosine similarity below this are edited.
        blend: Weight lam kept on the local matrix: ``similarity`` (lam = clamp(s, 0, 1)), ``half``
            (0.5), ``replace`` (0, take the global matrix) or ``median`` (shrink the matrix's deviation
            from the global to the client's median deviation; scale-free).
        criterion: ``threshold`` (the paper: absolute threshold on the similarity) or ``outlier``
            (scale-free: similarity more than ``z_threshold`` robust standard deviations below the
            median of the client's matrices).
        z_threshold: ``criterion: outlier``: how many robust standard deviations (1.4826 MAD) below the
            median a matrix's similarity must be.
    """

    def __init__(
        self,
        keys: EditKeys = "lora_A",
        num_edits: int = 1,
        threshold: float = 0.95,
        blend: Blend = "similarity",
        criterion: Criterion = "threshold",
        z_threshold: float = 3.0,
    ):
        if keys not in ("lora_A", "lora_B", "all"):
            raise ConfigError(f"ModelEditing.keys: unknown {keys!r}; allowed: lora_A, lora_B, all")
        if blend not in ("similarity", "half", "replace", "median"):
            raise ConfigError(f"ModelEditing.blend: unknown {blend!r}; allowed: similarity, half, replace, median")
        if criterion not in ("threshold", "outlier"):
            raise ConfigError(f"ModelEditing.criterion: unknown {criterion!r}; allowed: threshold, outlier")
        if num_edits < 0:
            raise ConfigError(f"ModelEditing.num_edits: must be >= 0, got {num_edits}")
        if not -1.0 <= threshold <= 1.0:
            raise ConfigError(f"ModelEditing.threshold: a cosine similarity in [-1, 1], got {threshold}")
        if not z_threshold >= 0:
            raise ConfigError(f"ModelEditing.z_threshold: must be >= 0, got {z_threshold}")
        self.keys, self.num_edits, self.threshold, self.blend = keys, num_edits, threshold, blend
        self.criterion, self.z_threshold = criterion, z_threshold
        self._reports: list[tuple[int, EditReport]] = []

    def on_client_fit_end(self, trainer, round: int, update, received: Mapping[str, Tensor]) -> None:
        if round < 1:  # round 0 starts from the initialisation: there is no global model to repair towards
            return
        update.lora, report = edit_layers(
            update.lora, received, self.keys, self.num_edits, self.threshold, self.blend, self.criterion,
            self.z_threshold,
        )  # fmt: skip
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
                "edit/clients_edited": float(sum(bool(r.edited) for _, r in self._reports)),
                "edit/similarity_min": float(sims.min()),
                "edit/similarity_mean": float(sims.mean()),
            }
        )
        trainer.log_histogram("edit/similarity", sims, round)
        edited = [f"client {c}: {k} (lam={lam:.3f})" for c, r in self._reports for k, lam in r.edited.items()]
        trainer.log_text("edit/edited_matrices", "\n\n".join(edited) or "none", round)

    def on_fit_end(self, trainer, results: dict) -> None:
        # counted from the round history, which a resumed run restores from its checkpoint
        results["edits"] = edits = edit_counts(trainer.history)
        edits["criterion"] = self.criterion
        if edits["total"] == 0:
            rule = (
                f"every similarity stayed >= threshold {self.threshold}"
                if self.criterion == "threshold"
                else f"no similarity was {self.z_threshold} robust standard deviations below the median"
            )
            lowest = edits["similarity_min"]
            trainer.fabric.print(
                f"warning: ModelEditing is on but made 0 edits in {edits['rounds_eligible']} round(s): {rule}"
                + (f" (lowest similarity {lowest:.4f})" if lowest is not None else "")
            )


def edit_counts(history: Sequence[Mapping[str, float]]) -> dict:
    """Edit statistics of a run from its per-round metrics: ``total`` edited matrices, ``rounds_with_edits``,
    ``rounds_eligible`` (rounds where clients could edit: round >= 1), ``clients_edited`` (client-rounds
    with an edit), ``per_round`` edits and the lowest and mean similarity seen."""
    rounds = [h for h in history if "edit/num_edited" in h]
    per_round = [int(h["edit/num_edited"]) for h in rounds]
    return {
        "total": sum(per_round),
        "rounds_with_edits": sum(n > 0 for n in per_round),
        "rounds_eligible": len(rounds),
        "clients_edited": int(sum(h.get("edit/clients_edited", 0.0) for h in rounds)),
        "per_round": per_round,
        "similarity_min": min((h["edit/similarity_min"] for h in rounds), default=None),
        "similarity_mean": sum(h["edit/similarity_mean"] for h in rounds) / len(rounds) if rounds else None,
    }
