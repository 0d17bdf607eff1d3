"""HLoRA-style aggregation (NVIDIA FLARE example ``examples/advanced/medgemma``, 2026): a fixed global rank bank.

The server averages the clients' products dW = sum_k p_k s B_k A_k and projects it onto the global rank R
by a truncated SVD, computed through QR of the stacked factors (:func:`~fedilora.algorithms.flexlora.low_rank_svd`,
never the d_out x d_in matrix): the global adapter (the bank) is B_g = U_R, A_g = S_R V_R^T / s, so
s B_g A_g = U_R S_R V_R^T is the best rank-R approximation of dW. A client of rank r receives the bank
truncated to r, U_r S_r V_r^T, the best rank-r approximation.

How this differs from FlexLoRA in fedilora: the products, their SVD and every truncation are the same;
the factors are not. The reference puts the singular values into A and keeps B orthonormal
(``HLoRAMaxRankAggregator`` there), where FlexLoRA splits them as sqrt(S) between the factors. LoRA's
training is not invariant to that rescaling (the gradient of B scales with A and the reverse), so the two
start each round from the same model but train it differently; with a sqrt split this method would be
FlexLoRA exactly, which is why the reference's split is kept.
"""

from __future__ import annotations

from torch import Tensor

from fedilora.algorithms.base import Accumulator, Aggregator
from fedilora.algorithms.flexlora import FactorAccumulator
from fedilora.lora_ops import module_keys
from fedilora.types import State


def bank_factors(u: Tensor, s: Tensor, v: Tensor, rank: int, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """(B, A) = (U_r, S_r V_r^T / s): B orthonormal, so s B A = U_r S_r V_r^T; zero-padded to ``rank``
    where fewer than ``rank`` singular values exist."""
    kept = min(rank, s.shape[0])
    b = u.new_zeros(u.shape[0], rank)
    a = v.new_zeros(rank, v.shape[0])
    b[:, :kept] = u[:, :kept]
    a[:kept] = (s[:kept].clamp_min(0.0) / scale)[:, None] * v[:, :kept].T
    return b, a


class HLoRA(Aggregator):
    """Average the products, keep their best rank-R approximation as the bank (B = U_R, A = S_R V_R^T / s);
    clients truncate the bank to their rank."""

    accumulator = FactorAccumulator
    needs_constant_scale = True
    dp_refusal = "its SVD of the averaged products needs every client's factors and is not a sum of clipped updates"
    secagg_refusal = "the server factorises the stacked factors of every client, so it must see every update"

    def begin(self, global_lora: State, global_extra: State | None = None) -> FactorAccumulator:
        return FactorAccumulator(global_lora, global_extra, self.scale)

    def finish(self, acc: Accumulator) -> State:
        acc.close()
        if not acc.count:
            return dict(acc.previous)
        svd = acc.stack.svd(divisor=acc.num_samples)
        out = {}
        for prefix, (a, b) in module_keys(acc.previous).items():
            bank_b, bank_a = bank_factors(*svd[prefix], acc.previous[a].shape[0], self.scale)
            out[a], out[b] = bank_a.to(acc.previous[a]), bank_b.to(acc.previous[b])
        return out
