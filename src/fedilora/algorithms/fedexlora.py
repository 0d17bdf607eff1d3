"""FedEx-LoRA (Singhal et al., ACL 2025): FedAvg of the factors, the exact residual folded into the base.

Averaging A and B separately gives s B_g A_g with B_g = sum_k p_k B_k and A_g = sum_k p_k A_k, which is
not the average of the clients' updates sum_k p_k s B_k A_k. FedEx-LoRA keeps the averaged factors for
the clients to go on training and adds the residual

    dW_res = sum_k p_k s B_k A_k - s B_g A_g

to the frozen base weight of every module, every round, so that the global model is exactly the
weighted average of the clients' models: W + dW_res + s B_g A_g = W + sum_k p_k s B_k A_k.

Heterogeneous ranks (the paper has one rank): every client's factors are zero-padded to the global
rank R before averaging, A_g[i] = sum_{k : r_k > i} p_k A_k[i] with p over every sampled client (likewise
B_g). Because the residual makes the global model exact whatever the factors, the choice only decides
which part of the average the clients go on training (the factors) and which part is frozen (the
residual); zero padding is the paper's "average A, average B" applied to the padded adapters, and keeps
this baseline distinct from FediLoRA's renormalised rule. A rank-r client starts from the first r
dimensions of the global adapter, as in every truncating method, so its model lacks s B_g[:, r:] A_g[r:]
(the residual does not recover what a client never received); a dimension that no sampled client has
therefore becomes zero, since none of the averaged models held it.

The streaming form holds FedAvg's zero-padded sums (one global adapter) and one dense sum_k n_k s B_k A_k
per module (what the base merge needs, like FLoRA's).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from fedilora.algorithms.base import Accumulator, DimensionAccumulator
from fedilora.algorithms.flora import FLoRA, ProductAccumulator
from fedilora.lora_ops import module_keys, nbytes
from fedilora.types import ClientUpdate, State


class ResidualAccumulator(DimensionAccumulator):
    """FedEx-LoRA's sums: the zero-padded factor sums (weight n_k on every rank dimension) and, per
    module, sum_k n_k s B_k A_k (a :class:`~fedilora.algorithms.flora.ProductAccumulator`)."""

    def __init__(
        self, previous: Mapping[str, Tensor], previous_extra: Mapping[str, Tensor] | None = None, scale: float = 1.0
    ) -> None:
        super().__init__(previous, previous_extra)
        self.products = ProductAccumulator(previous, None, scale)

    def contribution(self, update: ClientUpdate) -> tuple[float, int | None]:
        return float(update.num_samples), None  # zero padding: the update counts on every dimension

    def _add_lora(self, update: ClientUpdate, source: str) -> None:
        super()._add_lora(update, source)
        self.products.add(update)

    def _merge_lora(self, other: Accumulator) -> None:
        super()._merge_lora(other)
        self.products.merge(other.products)

    def nbytes(self) -> int:
        return super().nbytes() + self.products.nbytes()


class FedExLoRA(FLoRA):
    """FedAvg of the zero-padded factors; the residual sum_k p_k s B_k A_k - s B_g A_g merged into the base.

    Like FLoRA, ``finish`` leaves the round's base delta (here the residual) in ``last_delta`` and adds it
    to ``merged``; unlike FLoRA, the clients go on from the averaged factors instead of a fresh adapter.
    A client downloads the averaged factors and the residual, sent as the factors it is made of
    ([p_1 B_1, ..., p_K B_K, -s B_g] and [A_1; ...; A_K; A_g], rank sum_k r_k + R) or dense, whichever is
    smaller (``stacked_nbytes``).
    """

    accumulator = ResidualAccumulator
    dp_refusal = (
        "its residual sum_k p_k B_k A_k - B_g A_g is a product of each client's own factors, not a sum of "
        "clipped per-dimension updates"
    )
    secagg_refusal = (
        "its residual needs the dense products B_k A_k of every client, which the masked per-dimension "
        "sums do not carry"
    )

    def begin(
        self, global_lora: Mapping[str, Tensor], global_extra: Mapping[str, Tensor] | None = None
    ) -> ResidualAccumulator:
        return ResidualAccumulator(global_lora, global_extra, self.scale)

    def finish(self, acc: Accumulator) -> State:
        acc.close()
        if not acc.count:
            self.last_delta = {}
            return dict(acc.previous)
        factors = acc.lora.average(acc.previous)  # every dimension has weight N: sums / N, zeros where none
        residual = {}
        for prefix, (a, b) in module_keys(factors).items():
            total = acc.products.deltas[prefix].div_(acc.num_samples)  # sum_k p_k s B_k A_k
            residual[prefix] = total.addmm_(factors[b].to(total), factors[a].to(total), alpha=-self.scale)
        acc.products.deltas = {}
        self.last_delta = residual
        self.stacked_nbytes = min(acc.products.stacked_nbytes + nbytes(factors), nbytes(residual))
        for prefix, delta in residual.items():
            self.merged[prefix] = self.merged[prefix] + delta if prefix in self.merged else delta.clone()
        return factors
