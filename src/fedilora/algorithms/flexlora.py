"""FlexLoRA (Bai et al. 2024): average the full updates dW, hand each client a truncated SVD at its rank.

dW_g = sum_k p_k s B_k A_k; its SVD is computed through QR of the stacked factors (the product has rank
<= sum r_k), never by decomposing d_out x d_in when that is larger. The streaming form holds the stacked
factors until their width reaches 2 min(d_out, d_in), then an exact re-factorisation of that width.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedilora.algorithms.base import Accumulator, Aggregator
from fedilora.lora_ops import module_keys, truncate
from fedilora.types import ClientUpdate, State

#: (U [d_out, m], S [m], V [d_in, m]) of one module's product, singular values descending
SVD = tuple[Tensor, Tensor, Tensor]


def _compute_dtype(t: Tensor) -> torch.dtype:
    # QR/SVD have no half-precision kernels, and rounding there would dominate the truncation error
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def low_rank_svd(b_stack: Tensor, a_stack: Tensor) -> SVD:
    """Thin SVD U S V^T of B A for B ``[d_out, m]``, A ``[m, d_in]``, without forming B A.

    B = Q_b R_b and A^T = Q_a R_a (reduced QR), so B A = Q_b (R_b R_a^T) Q_a^T; with the SVD of the
    small core R_b R_a^T = U' S V'^T: U = Q_b U', V = Q_a V'. Costs O((d_out + d_in) m^2).
    """
    dtype = _compute_dtype(b_stack)
    q_b, r_b = torch.linalg.qr(b_stack.to(dtype))
    q_a, r_a = torch.linalg.qr(a_stack.to(dtype).T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return q_b @ u, s, q_a @ vh.T


def truncated_factors(u: Tensor, s: Tensor, v: Tensor, rank: int, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """(B_r, A_r) = (U_r sqrt(S_r / s), sqrt(S_r / s) V_r^T), so s B_r A_r = U_r S_r V_r^T.

    The singular values are split evenly between the factors; if fewer than ``rank`` exist, B_r and
    A_r are zero-padded to ``rank``.
    """
    kept = min(rank, s.shape[0])
    root = (s[:kept].clamp_min(0.0) / scale).sqrt()
    b = u.new_zeros(u.shape[0], rank)
    a = v.new_zeros(rank, v.shape[0])
    b[:, :kept] = u[:, :kept] * root
    a[:kept] = root[:, None] * v[:, :kept].T
    return b, a


def dense_truncated_factors(dw: Tensor, rank: int, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Reference for tests and benchmarks: :func:`truncated_factors` of the SVD of a materialised dW."""
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    return truncated_factors(u, s, vh.T, rank, scale)


class FactorStack:
    """The factors of dW = sum_k w_k s B_k A_k, appended one client at a time.

    Per module, Bs = [sqrt(w_1 s) B_1, ...] and As = [sqrt(w_1 s) A_1; ...] (splitting the weight as a
    square root over both factors keeps them equally conditioned for the QR), so Bs As = dW. Once the
    stacked width reaches ``2 min(d_out, d_in)`` the stack is replaced by the exact factorisation
    U sqrt(S), sqrt(S) V^T of its product (width <= min(d_out, d_in)): memory stops growing with K.
    """

    def __init__(self, modules: Mapping[str, tuple[str, str]], scale: float = 1.0) -> None:
        self.modules = dict(modules)
        self.scale = scale
        self.parts: dict[str, tuple[list[Tensor], list[Tensor]]] = {p: ([], []) for p in self.modules}
        self.compressions = 0

    def add(self, lora: Mapping[str, Tensor], weight: float) -> None:
        root = math.sqrt(weight * self.scale)
        for prefix, (a, b) in self.modules.items():
            dtype = _compute_dtype(lora[a])
            bs, as_ = self.parts[prefix]
            bs.append(root * lora[b].to(dtype))
            as_.append(root * lora[a].to(dtype))
            self._bound(prefix)

    def merge(self, other: FactorStack) -> None:
        for prefix, (bs, as_) in self.parts.items():
            bs.extend(other.parts[prefix][0])
            as_.extend(other.parts[prefix][1])
            self._bound(prefix)
        self.compressions += other.compressions

    def width(self, prefix: str) -> int:
        return sum(t.shape[1] for t in self.parts[prefix][0])

    def _bound(self, prefix: str) -> None:
        bs, as_ = self.parts[prefix]
        if self.width(prefix) >= 2 * min(bs[0].shape[0], as_[0].shape[1]):
            u, s, v = low_rank_svd(torch.cat(bs, dim=1), torch.cat(as_, dim=0))
            root = s.clamp_min(0.0).sqrt()
            self.parts[prefix] = ([u * root], [root[:, None] * v.T])
            self.compressions += 1

    def svd(self, divisor: float = 1.0) -> dict[str, SVD]:
        """``{prefix: SVD of dW / divisor}`` through QR of the stacked factors (:func:`low_rank_svd`)."""
        out = {}
        for prefix, (bs, as_) in self.parts.items():
            u, s, v = low_rank_svd(torch.cat(bs, dim=1), torch.cat(as_, dim=0))
            out[prefix] = (u, s / divisor, v)
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for bs, as_ in self.parts.values() for t in (*bs, *as_))


def flexlora_svd(client_loras: Sequence[Mapping[str, Tensor]], weights: Tensor, scale: float = 1.0) -> dict[str, SVD]:
    """``{prefix: SVD of dW_g}`` with dW_g = sum_k w_k s B_k A_k = Bs As (weights used as given)."""
    stack = FactorStack(module_keys(client_loras[0]), scale)
    for k, lora in enumerate(client_loras):
        stack.add(lora, float(weights[k]))
    return stack.svd()


class FactorAccumulator(Accumulator):
    """FlexLoRA in streaming form: the stacked factors of sum_k n_k s B_k A_k (:class:`FactorStack`);
    ``finish`` divides the singular values by N = sum_k n_k, which makes the weights p_k."""

    def __init__(
        self, previous: Mapping[str, Tensor], previous_extra: Mapping[str, Tensor] | None = None, scale: float = 1.0
    ) -> None:
        super().__init__(previous, previous_extra)
        self.stack = FactorStack(module_keys(previous), scale)

    def _add_lora(self, update: ClientUpdate, source: str) -> None:
        self.stack.add(update.lora, update.num_samples)

    def _merge_lora(self, other: Accumulator) -> None:
        self.stack.merge(other.stack)

    def nbytes(self) -> int:
        return super().nbytes() + self.stack.nbytes()


class FlexLoRA(Aggregator):
    """Bai et al. 2024: average the full updates dW, hand each client a truncated SVD at its rank."""

    accumulator = FactorAccumulator
    needs_constant_scale = True
    dp_refusal = (
        "its SVD re-factorisation needs every client's factors and is not a sum of clipped updates"
    )
    secagg_refusal = "the server re-factorises the stacked factors of every client, so it must see every update"

    def __init__(self) -> None:
        self.svd: dict[str, SVD] = {}

    def _factors(self, global_lora: Mapping[str, Tensor], rank: int | None) -> State:
        """Truncated factors of every module at ``rank`` (None: the module's rank in ``global_lora``)."""
        out = {}
        for prefix, (a, b) in module_keys(global_lora).items():
            r = global_lora[a].shape[0] if rank is None else rank
            b_r, a_r = truncated_factors(*self.svd[prefix], r, self.scale)
            out[a], out[b] = a_r.to(global_lora[a]), b_r.to(global_lora[b])
        return out

    def broadcast(self, global_lora: Mapping[str, Tensor], rank: int) -> State:
        return self._factors(global_lora, rank) if self.svd else truncate(global_lora, rank)

    def state_dict(self) -> State:
        return {f"{prefix}.{part}": t for prefix, usv in self.svd.items() for part, t in zip("USV", usv, strict=True)}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        prefixes = {key.rsplit(".", 1)[0] for key in state}
        self.svd = {p: (state[f"{p}.U"], state[f"{p}.S"], state[f"{p}.V"]) for p in sorted(prefixes)}

    def begin(
        self, global_lora: Mapping[str, Tensor], global_extra: Mapping[str, Tensor] | None = None
    ) -> FactorAccumulator:
        return FactorAccumulator(global_lora, global_extra, self.scale)

    def finish(self, acc: Accumulator) -> State:
        acc.close()
        if not acc.count:
            return dict(acc.previous)
        self.svd = acc.stack.svd(divisor=acc.num_samples)
        return self._factors(acc.previous, None)
