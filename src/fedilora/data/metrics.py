"""A torchmetrics metric that torchmetrics lacks: the "samples" average of multi-label F1.

scikit-learn's ``f1_score(average="samples")`` (reported on MM-IMDb next to micro and macro F1) is
the F1 of each sample over its labels, averaged over samples. torchmetrics' ``MultilabelF1Score``
averages over labels only (``micro`` / ``macro`` / ``weighted`` / ``None``), but its binary F1 with
``multidim_average="samplewise"`` computes exactly the per-sample F1 of an ``[N, C]`` input; this
class averages that over every sample seen.
"""

from __future__ import annotations

from torch import Tensor
from torchmetrics.classification import BinaryF1Score


class MultilabelSamplesF1Score(BinaryF1Score):
    """Multi-label F1 averaged over samples (scikit-learn's ``average="samples"``, zero_division=0).

    ``preds``: ``[N, C]`` probabilities (thresholded at ``threshold``) or 0/1; ``target``: ``[N, C]`` multi-hot.
    A sample with no true and no predicted label scores ``zero_division``.
    """

    def __init__(self, threshold: float = 0.5, zero_division: float = 0, **kwargs) -> None:
        super().__init__(threshold=threshold, multidim_average="samplewise", zero_division=zero_division, **kwargs)

    def compute(self) -> Tensor:
        return super().compute().mean()
