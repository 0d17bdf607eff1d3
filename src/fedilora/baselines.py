"""Baseline aggregators for heterogeneous-rank LoRA: HetLoRA, FLoRA and FlexLoRA, and the references.

Same interface as :mod:`fedilora.aggregation` (``broadcast`` and the streaming ``begin`` / ``add`` /
``finish``); the math lives in pure functions over tensors. A module's ``lora_A`` and ``lora_B`` share
the prefix before ``.lora_A.`` / ``.lora_B.``; its update is dW = s B A with one scale s for every rank.

What the streaming form holds, whatever the number of clients K: HetLoRA one global adapter (like
FediLoRA); FLoRA one dense dW per module (what the base merge needs; the stack of rank sum r_k that a
real FLoRA server sends is only counted); FlexLoRA the stacked factors until their width reaches
2 min(d_out, d_in), then an exact re-factorisation of that width: O(min(sum r_k, d) (d_in + d_out)) per
module, which grows with K up to about twice the dense dW and no further, but is not O(global adapter).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from fedilora.aggregation import (
    Accumulator,
    Aggregator,
    ClientUpdate,
    DimensionAccumulator,
    State,
    WeightedSums,
    accumulation_dtype,
    nbytes,
    rank_axis,
    truncate,
)

#: (U [d_out, m], S [m], V [d_in, m]) of one module's product, singular values descending
SVD = tuple[Tensor, Tensor, Tensor]


def module_keys(lora: Mapping[str, Tensor]) -> dict[str, tuple[str, str]]:
    """``{prefix: (A key, B key)}`` for every module, prefix = the A key without ``.lora_A.weight``."""
    out = {}
    for key in lora:
        if rank_axis(key) == 0:
            prefix, _, suffix = key.rpartition("lora_A.")
            out[prefix.removesuffix(".")] = (key, f"{prefix}lora_B.{suffix}")
    return out


def _compute_dtype(t: Tensor) -> torch.dtype:
    # QR/SVD have no half-precision kernels, and rounding there would dominate the truncation error
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


# --------------------------------------------------------------------------------------------- HetLoRA


def product_norm(b: Tensor, a: Tensor) -> Tensor:
    """||B A||_F via ||B A||_F^2 = sum((B^T B) * (A A^T)), without forming the d_out x d_in product."""
    b, a = b.to(torch.float64), a.to(torch.float64)
    return ((b.T @ b) * (a @ a.T)).sum().clamp_min(0.0).sqrt()


def update_norm(lora: Mapping[str, Tensor]) -> Tensor:
    """N_k = sum over modules of ||B_k A_k||_F (float64 scalar): HetLoRA's weight, one update at a time."""
    norms = [product_norm(lora[b], lora[a]) for a, b in module_keys(lora).values()]
    return torch.stack(norms).sum() if norms else torch.zeros((), dtype=torch.float64)


def hetlora_weights(client_loras: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """w_k = N_k / sum_j N_j with N_k = sum_modules ||B_k A_k||_F (float64, ``[K]``).

    If every client's update is zero the norms carry no information and the weights are uniform.
    """
    norms = torch.stack([update_norm(lora) for lora in client_loras])
    total = norms.sum()
    return norms / total if total > 0 else torch.full_like(norms, 1.0 / len(norms))


def zero_padded_average(
    previous: Mapping[str, Tensor], client_loras: Sequence[Mapping[str, Tensor]], weights: Tensor
) -> State:
    """HetLoRA's aggregation: sum_k w_k pad_R(T_k) / sum_k w_k per tensor.

    Each client's A / B counts as zero-padded along its rank axis to the global rank R (taken from
    ``previous``), so a dimension only some clients have is diluted by the zeros of the others and a
    dimension no sampled client has becomes zero: that is the baseline's documented behaviour. As a
    stream: w_k T_k is added into the first r_k dimensions, w_k into the weight of all R dimensions.
    """
    sums = WeightedSums.zeros(previous)
    for k, lora in enumerate(client_loras):
        sums.add(lora, float(weights[k]), covers=None, source=f"client {k}")
    return sums.average(previous)


class NormAccumulator(DimensionAccumulator):
    """HetLoRA's sums: weight N_k = sum_modules ||B_k A_k||_F, counted on every dimension (zero padding).

    While every update so far has B_k A_k = 0 the norms carry no information and the weights are
    uniform, as in :func:`hetlora_weights`: the sums then count updates, and the first update with a
    non-zero product restarts them (one buffer either way).
    """

    uniform = True

    def contribution(self, update: ClientUpdate) -> tuple[float, int | None]:
        norm = float(update_norm(update.lora))
        if not math.isfinite(norm):
            raise ValueError(f"client {update.client_id}: the norm of B A is {norm}")
        if norm > 0 and self.uniform:
            self.lora.clear()
            self.uniform = False
        return (1.0 if self.uniform else norm), None

    def _merge_lora(self, other: Accumulator) -> None:
        if self.uniform != other.uniform:  # the uniform side only counted zero updates: drop it
            (self.lora if self.uniform else other.lora).clear()
            self.uniform = False
        super()._merge_lora(other)


class HetLoRA(Aggregator):
    """Cho et al. 2024: zero-padded average weighted by update norms; truncation on broadcast.

    Only the sparsity-weighted aggregation; the paper's local rank self-pruning is not part of it.
    """

    def begin(
        self, global_lora: Mapping[str, Tensor], global_extra: Mapping[str, Tensor] | None = None
    ) -> NormAccumulator:
        return NormAccumulator(global_lora, global_extra)

    def finish(self, acc: Accumulator) -> State:
        acc.close()
        return acc.lora.average(acc.previous)


# ----------------------------------------------------------------------------------------------- FLoRA


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

    #: the trainer must add ``last_delta`` to the base weights after every ``aggregate``
    merges_into_base = True
    needs_constant_scale = True

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

    def state_dict(self) -> State:
        """The sum of all deltas merged so far, ``{prefix: dW}``, and the size of the last stacked adapter."""
        return {**{k: v.clone() for k, v in self.merged.items()}, "stacked_nbytes": torch.tensor(self.stacked_nbytes)}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.stacked_nbytes = int(state.get("stacked_nbytes", 0))
        self.merged = {k: v.clone() for k, v in state.items() if k != "stacked_nbytes"}


# -------------------------------------------------------------------------------------------- FlexLoRA


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

    needs_constant_scale = True

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


# ------------------------------------------------------------------------------ references: local, centralized


class Local(Aggregator):
    """No federation, the lower reference: every client keeps training its own adapter and head from
    round to round; nothing is uploaded, averaged or broadcast."""

    communicates = False

    def begin(
        self, global_lora: Mapping[str, Tensor], global_extra: Mapping[str, Tensor] | None = None
    ) -> DimensionAccumulator:
        return DimensionAccumulator(global_lora, global_extra)

    def finish(self, acc: Accumulator) -> State:
        acc.close()
        return dict(acc.previous)

    def aggregate(self, global_lora: Mapping[str, Tensor], updates: Iterable[ClientUpdate]) -> State:
        return dict(global_lora)


class PooledAccumulator(DimensionAccumulator):
    """Centralized: the one pooled update, weight 1, so that the sums are that update exactly."""

    def contribution(self, update: ClientUpdate) -> tuple[float, int | None]:
        if self.count:
            raise ValueError(f"client {update.client_id}: Centralized trains one pooled model, a second update came")
        return 1.0, update.rank


class Centralized(Aggregator):
    """All clients' training data pooled into one model of the global rank, the upper reference.

    Each round trains that model for the configured local epochs on the union of the clients' training
    splits (with their missing-modality masks); there is nothing to communicate.
    """

    pooled = True
    communicates = False

    def begin(
        self, global_lora: Mapping[str, Tensor], global_extra: Mapping[str, Tensor] | None = None
    ) -> PooledAccumulator:
        return PooledAccumulator(global_lora, global_extra)

    def finish(self, acc: Accumulator) -> State:
        acc.close()
        if acc.count != 1:
            raise ValueError(f"Centralized trains one pooled model: expected one update, got {acc.count}")
        return acc.lora.average(acc.previous)
