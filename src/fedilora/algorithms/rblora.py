"""RB-LoRA (Findings of EACL 2026, code ``seonha01/rb-lora``): FediLoRA's rule, then an SVD re-basis.

Aggregation: every rank dimension is averaged over the clients that have it, with the weights renormalised
over them (the paper's column weights n_k / sum of n over the clients holding the column: FediLoRA's
:class:`~fedilora.algorithms.dimension_wise.DimensionWise`; the released code's registry maps RB-LoRA to
the zero-padded average instead and leaves its column weights unused: the paper's rule is implemented
here). A dimension no sampled client has keeps its previous value (the reference zeroes it, as FediLoRA's
reference code does).

Distribution: a client of rank r receives the best rank-r approximation of the global update, U_r S_r V_r^T
of s B_g A_g, with the singular values in B as in the reference (B = U_r S_r / s, A = V_r^T). Here the
global adapter itself is stored re-based, B_g = U_R S_R / s and A_g = V_R^T at the global rank R (the same
product: s B_g A_g has rank <= R), so that the broadcast is the plain truncation of it and the next round's
per-dimension averages, and the previous values that uncovered dimensions keep, are in the basis the
clients started from. The SVD goes through QR of the factors (:func:`~fedilora.algorithms.flexlora.low_rank_svd`).

Distinct from the other methods in this code path: the global product is FediLoRA's (DimensionWise), the
product of the averaged factors, not the average of the products (FlexLoRA, HLoRA); what a client of rank
r < R starts from is the SVD truncation, not the first r dimensions (FediLoRA).

Secure aggregation works (the server re-bases what the masked per-dimension sums give); differential
privacy does not (a noised step cannot be re-based apart from the global adapter it is added to).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from fedilora.algorithms.base import Accumulator, Aggregator, DimensionAccumulator, average_sums
from fedilora.algorithms.flexlora import low_rank_svd
from fedilora.lora_ops import module_keys
from fedilora.types import State


def svd_rebase(lora: Mapping[str, Tensor]) -> State:
    """Every module's factors replaced by (B, A) = (U S, V^T) of the SVD U S V^T of B A: same product,
    same rank, orthonormal rows of A, dimensions in decreasing order of their singular value."""
    out = {}
    for a, b in module_keys(lora).values():
        u, s, v = low_rank_svd(lora[b], lora[a])
        out[b], out[a] = (u * s).to(lora[b]), v.T.contiguous().to(lora[a])
    return out


class RBLoRA(Aggregator):
    """FediLoRA's dimension-wise average, re-based by SVD so that a client of rank r receives the best
    rank-r approximation of the global update."""

    accumulator = DimensionAccumulator
    needs_constant_scale = True
    dp_refusal = (
        "its SVD re-basis is not linear: a noised step cannot be re-based apart from the global adapter"
    )
    secagg_refusal = None

    def finish(self, acc: Accumulator) -> State:
        if not acc.count:  # nothing new: the previous adapter, already re-based
            acc.close()
            return dict(acc.previous)
        return svd_rebase(average_sums(acc))
