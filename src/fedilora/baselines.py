"""Baseline aggregators for heterogeneous-rank LoRA: HetLoRA, FLoRA and FlexLoRA.

Same interface as :mod:`fedilora.aggregation` (``broadcast`` / ``aggregate``); the math lives in pure
functions over tensors. A module's ``lora_A`` and ``lora_B`` share the prefix before ``.lora_A.`` /
``.lora_B.``; its update is dW = s B A with one scale s for every rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedilora.aggregation import (
    Aggregator,
    ClientUpdate,
    State,
    nbytes,
    rank_axis,
    sample_weights,
    stack_padded,
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


def hetlora_weights(client_loras: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """w_k = N_k / sum_j N_j with N_k = sum_modules ||B_k A_k||_F (float64, ``[K]``).

    If every client's update is zero the norms carry no information and the weights are uniform.
    """
    norms = torch.stack(
        [
            torch.stack([product_norm(lora[b], lora[a]) for a, b in module_keys(lora).values()]).sum()
            for lora in client_loras
        ]
    )
    total = norms.sum()
    return norms / total if total > 0 else torch.full_like(norms, 1.0 / len(norms))


def zero_padded_average(
    previous: Mapping[str, Tensor], client_loras: Sequence[Mapping[str, Tensor]], weights: Tensor
) -> State:
    """HetLoRA's aggregation: sum_k w_k pad_R(T_k) per tensor, with w normalised to sum 1.

    Each client's A / B is zero-padded along its rank axis to the global rank R (taken from
    ``previous``), so a dimension only some clients have is diluted by the zeros of the others and a
    dimension no sampled client has becomes zero: that is the baseline's documented behaviour.
    """
    if not client_loras:
        return dict(previous)
    w = weights.to(torch.float64)
    w = w / w.sum()
    out = {}
    for key, prev in previous.items():
        axis = rank_axis(key)
        stacked = stack_padded([c[key] for c in client_loras], axis, prev.shape[axis])
        out[key] = torch.einsum("k,k...->...", w.to(stacked), stacked)
    return out


class HetLoRA(Aggregator):
    """Cho et al. 2024: zero-padded average weighted by update norms; truncation on broadcast.

    Only the sparsity-weighted aggregation; the paper's local rank self-pruning is not part of it.
    """

    def aggregate(self, global_lora: Mapping[str, Tensor], updates: Sequence[ClientUpdate]) -> State:
        if not updates:
            return dict(global_lora)
        loras = [u.lora for u in updates]
        return zero_padded_average(global_lora, loras, hetlora_weights(loras))


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


class FLoRA(Aggregator):
    """Wang et al. 2024: stack the client adapters, merge the product into the frozen base weights.

    ``aggregate`` leaves this round's dW per module in ``last_delta`` for the trainer to add to the base
    weights, and returns the re-initialised adapter the clients start from: the previous A (a random
    init) and B = 0, so that B A = 0 right after the merge.
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

    def aggregate(self, global_lora: Mapping[str, Tensor], updates: Sequence[ClientUpdate]) -> State:
        if updates:
            stacked = stack_loras([u.lora for u in updates], sample_weights(updates))
            self.stacked_nbytes = nbytes(stacked)
            self.last_delta = lora_deltas(stacked, self.scale)
            for prefix, delta in self.last_delta.items():
                self.merged[prefix] = self.merged[prefix] + delta if prefix in self.merged else delta.clone()
        else:
            self.last_delta = {}
        return {k: torch.zeros_like(v) if rank_axis(k) == 1 else v.clone() for k, v in global_lora.items()}

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


def flexlora_svd(client_loras: Sequence[Mapping[str, Tensor]], weights: Tensor, scale: float = 1.0) -> dict[str, SVD]:
    """``{prefix: SVD of dW_g}`` with dW_g = sum_k w_k s B_k A_k = Bs As.

    Bs = [sqrt(w_1 s) B_1, ..., sqrt(w_K s) B_K] and As = [sqrt(w_1 s) A_1; ...]: splitting the
    weight as a square root over both factors keeps them equally conditioned for the QR.
    """
    root = (weights.to(torch.float64) * scale).sqrt()
    out = {}
    for prefix, (a, b) in module_keys(client_loras[0]).items():
        first = client_loras[0][a]
        r = root.to(first.device, _compute_dtype(first))
        b_stack = torch.cat([r[k] * c[b].to(r) for k, c in enumerate(client_loras)], dim=1)
        a_stack = torch.cat([r[k] * c[a].to(r) for k, c in enumerate(client_loras)], dim=0)
        out[prefix] = low_rank_svd(b_stack, a_stack)
    return out


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

    def aggregate(self, global_lora: Mapping[str, Tensor], updates: Sequence[ClientUpdate]) -> State:
        if not updates:
            return dict(global_lora)
        self.svd = flexlora_svd([u.lora for u in updates], sample_weights(updates), self.scale)
        return self._factors(global_lora, None)


# ------------------------------------------------------------------------------ references: local, centralized


class Local(Aggregator):
    """No federation, the lower reference: every client keeps training its own adapter and head from
    round to round; nothing is uploaded, averaged or broadcast."""

    communicates = False

    def aggregate(self, global_lora: Mapping[str, Tensor], updates: Sequence[ClientUpdate]) -> State:
        return dict(global_lora)


class Centralized(Aggregator):
    """All clients' training data pooled into one model of the global rank, the upper reference.

    Each round trains that model for the configured local epochs on the union of the clients' training
    splits (with their missing-modality masks); there is nothing to communicate.
    """

    pooled = True
    communicates = False

    def aggregate(self, global_lora: Mapping[str, Tensor], updates: Sequence[ClientUpdate]) -> State:
        (update,) = updates
        return dict(update.lora)
