"""FLoRA (Wang et al. 2024): stack the clients' factors, merge the product into the frozen base weights.

A_g = [p_1 A_1; ...; p_K A_K], B_g = [B_1, ..., B_K], so B_g A_g = sum_k p_k B_k A_k exactly. The
streaming form holds one dense dW per module (what the base merge needs); the stack of rank sum r_k that
a real FLoRA server sends is only counted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedilora.algorithms.base import Accumulator, Aggregator
from fedilora.lora_ops import accumulation_dtype, module_keys, nbytes, rank_axis
from fedilora.types import ClientUpdate, State


def stack_loras(client_loras: Sequence[Mapping[str, Tensor]], weights: Tensor) -> State:
    """FLoRA's stacking: A_g = [w_1 A_1; ...; w_K A_K], B_g = [B_1, ..., B_K] (rank sum_k r_k).

    Hence B_g A_g = sum_k w_k B_k A_k exactly (the weights are used as given, not renormalised).
    """
    out = {}
    for key, first in client_loras[0].items():
        if rank_axis(key) == 0:
            w = weights.to(first)
            out[key] = torch.cat([w[k] * c[key] for k, c in enumerate(client_loras)], dim=0)
        else:
            out[key] = torch.cat([c[key] for c in client_loras], dim=1)
    return out


def lora_deltas(lora: Mapping[str, Tensor], scale: float = 1.0) -> State:
    """``{prefix: dW}`` with dW = s B A per module (``[d_out, d_in]``)."""
    return {prefix: scale * (lora[b] @ lora[a]) for prefix, (a, b) in module_keys(lora).items()}


class ProductAccumulator(Accumulator):
    """FLoRA in streaming form: per module sum_k n_k s B_k A_k (``[d_out, d_in]``, one ``addmm_`` per
    update), the product the base merge needs; ``finish`` divides by N = sum_k n_k. The stack itself
    (rank sum_k r_k, grown by appending n_k A_k and B_k, scaled by 1/N at the end) is what a real FLoRA
    server sends to every client; here only its size is counted."""

    def __init__(
        self, previous: Mapping[str, Tensor], previous_extra: Mapping[str, Tensor] | None = None, scale: float = 1.0
    ) -> None:
        super().__init__(previous, previous_extra)
        self.scale = scale
        self.modules = module_keys(previous)
        self.deltas = {
            prefix: previous[a].new_zeros(
                (previous[b].shape[0], previous[a].shape[1]), dtype=accumulation_dtype(previous[a])
            )
            for prefix, (a, b) in self.modules.items()
        }
        self.stacked_nbytes = 0

    def _add_lora(self, update: ClientUpdate, source: str) -> None:
        alpha = self.scale * update.num_samples
        for prefix, (a, b) in self.modules.items():
            delta = self.deltas[prefix]
            delta.addmm_(update.lora[b].to(delta), update.lora[a].to(delta), alpha=alpha)
        self.stacked_nbytes += nbytes(update.lora)

    def _merge_lora(self, other: Accumulator) -> None:
        for prefix, delta in self.deltas.items():
            delta.add_(other.deltas[prefix].to(delta))
        self.stacked_nbytes += other.stacked_nbytes

    def nbytes(self) -> int:
        return super().nbytes() + nbytes(self.deltas)


class FLoRA(Aggregator):
    """Wang et al. 2024: stack the client adapters, merge the product into the frozen base weights.

    ``finish`` (and ``aggregate``) leaves this round's dW = sum_k p_k s B_k A_k per module in
    ``last_delta`` for the trainer to add to the base weights, and returns the re-initialised adapter the
    clients start from: the previous A (a random init) and B = 0, so that B A = 0 right after the merge.
    """

    accumulator = ProductAccumulator
    #: the trainer must add ``last_delta`` to the base weights after every ``aggregate``
    merges_into_base = True
    needs_constant_scale = True
    dp_refusal = (
        "it stacks every client's factors into the global adapter, releasing each update as it is"
    )
    secagg_refusal = "the server stacks each client's own factors, so it must see every update"

    def __init__(self) -> None:
        self.last_delta: State = {}
        self.merged: State = {}
        self.stacked_nbytes = 0

    def download_nbytes(self, sent: Mapping[str, Tensor]) -> int:
        # every client downloads the stacked adapter (rank sum_k r_k) to merge it into its own base copy
        return nbytes(sent) + self.stacked_nbytes

    def begin(
        self, global_lora: Mapping[str, Tensor], global_extra: Mapping[str, Tensor] | None = None
    ) -> ProductAccumulator:
        return ProductAccumulator(global_lora, global_extra, self.scale)

    def finish(self, acc: Accumulator) -> State:
        acc.close()
        if acc.count:
            # p_k = n_k / N: divide once, at the end
            self.last_delta = {prefix: delta.div_(acc.num_samples) for prefix, delta in acc.deltas.items()}
            self.stacked_nbytes = acc.stacked_nbytes
            for prefix, delta in self.last_delta.items():
                self.merged[prefix] = self.merged[prefix] + delta if prefix in self.merged else delta.clone()
        else:
            self.last_delta = {}
        acc.deltas = {}
        return {k: torch.zeros_like(v) if rank_axis(k) == 1 else v.clone() for k, v in acc.previous.items()}

    def merged_modules(self) -> list[str]:
        return list(self.merged)

    def state_dict(self) -> State:
        """The sum of all deltas merged so far, ``{prefix: dW}``, and the size of the last stacked adapter."""
        return {**{k: v.clone() for k, v in self.merged.items()}, "stacked_nbytes": torch.tensor(self.stacked_nbytes)}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.stacked_nbytes = int(state.get("stacked_nbytes", 0))
        self.merged = {k: v.clone() for k, v in state.items() if k != "stacked_nbytes"}
