"""Client-level differential privacy for heterogeneous-rank LoRA.

A client's update u_k is its LoRA delta from the adapter it received, zero-padded along the rank axis
to the global rank R, together with its head delta. It is clipped to L2 norm C on the client. The
server adds the clipped updates, unweighted, into one sum per tensor, S, and counts per rank
dimension how many sampled clients have it, n_i (every client covers the head). One client moves S by
at most C in L2, so releasing S + N(0, sigma^2 C^2 I) is the Gaussian mechanism with noise multiplier
sigma for all coordinates at once; the accountant composes it over rounds.

The new global value of rank dimension i is previous_i + (S_i + noise_i) / n_i, so the noise left on
the average there has std sigma * C / n_i: it is calibrated to how many clients cover the dimension.
Noising the average with one std sigma * C / K, as if every coordinate averaged all K clients, gives
the dimensions that only a few high-rank clients train far less noise than the guarantee needs.
Uniform weights replace p_k = n_k / sum n_j because sample counts are private and unbounded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedilora.aggregation import State, rank_axis


def pad_to_rank(lora: Mapping[str, Tensor], global_rank: int) -> State:
    """Zero-pad every ``lora_A`` along rows and every ``lora_B`` along columns to ``global_rank``."""
    out = {}
    for key, value in lora.items():
        axis = rank_axis(key)
        shape = list(value.shape)
        shape[axis] = global_rank
        padded = value.new_zeros(shape)
        padded.narrow(axis, 0, value.shape[axis]).copy_(value)
        out[key] = padded
    return out


def delta(new: Mapping[str, Tensor], received: Mapping[str, Tensor]) -> State:
    return {k: v - received[k].to(v.device, v.dtype) for k, v in new.items()}


def l2_norm(states: Sequence[Mapping[str, Tensor]]) -> float:
    """The L2 norm of all tensors of ``states`` taken as one vector (accumulated in float64)."""
    squared = sum((float(t.double().square().sum()) for s in states for t in s.values()), 0.0)
    return math.sqrt(squared)


def clip(states: Sequence[Mapping[str, Tensor]], clip_norm: float) -> tuple[list[State], float]:
    """``states`` scaled by min(1, C / ||states||) as one vector; returns them and the norm before clipping."""
    norm = l2_norm(states)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return [{k: v * factor for k, v in s.items()} for s in states], norm


def add_noise(sums: Mapping[str, Tensor], std: float, generator: torch.Generator) -> State:
    """``sums`` + N(0, std^2) on every coordinate, drawn on the CPU from ``generator`` (reproducible)."""
    return {
        k: v + (torch.randn(v.shape, generator=generator, dtype=torch.float64) * std).to(v.device, v.dtype)
        for k, v in sums.items()
    }


def coverage(ranks: Sequence[int], global_rank: int) -> Tensor:
    """n_i: how many of the clients with ``ranks`` have rank dimension i (``[R]``, float64)."""
    return (torch.arange(global_rank)[None, :] < torch.as_tensor(ranks)[:, None]).sum(0).to(torch.float64)


def average_noise_std(counts: Tensor, noise_multiplier: float, clip_norm: float) -> Tensor:
    """The std of the noise left on each dimension's average: sigma * C / n_i (inf where n_i = 0)."""
    return noise_multiplier * clip_norm / counts


def apply_average(
    previous: Mapping[str, Tensor], sums: Mapping[str, Tensor], counts: Tensor, keys_with_rank: bool = True
) -> State:
    """previous + sums / n per rank dimension (``counts`` = n_i); dimensions no client covers keep ``previous``."""
    out = {}
    for key, prev in previous.items():
        if keys_with_rank:
            axis = rank_axis(key)
            n = counts.to(prev.device, torch.float64)
            view = [1] * prev.dim()
            view[axis] = -1
            n = n.view(view)
            step = torch.where(n > 0, sums[key].double() / n.clamp_min(1.0), 0.0)
        else:
            step = sums[key].double() / float(counts)
        out[key] = (prev.double() + step).to(prev.dtype)
    return out


def adapted_clip_norm(
    clip_norm: float, unclipped_fraction: float, target_quantile: float, learning_rate: float
) -> float:
    """Adaptive clipping (Andrew et al. 2021): C <- C * exp(-eta * (b - gamma)), b the noisy fraction of
    clients whose update norm was <= C, gamma the target quantile. The clip norm follows that quantile."""
    return clip_norm * math.exp(-learning_rate * (unclipped_fraction - target_quantile))


def sum_noise_multiplier(total: float, count_noise_multiplier: float) -> float:
    """The noise multiplier left for the update sums when the clipped-count query also spends budget:
    sigma_delta = (sigma^-2 - (2 sigma_b)^-2)^(-1/2) (Andrew et al. 2021, Theorem 1)."""
    rest = total**-2 - (2.0 * count_noise_multiplier) ** -2
    if rest <= 0:
        raise ValueError(
            f"count_noise_multiplier {count_noise_multiplier} is too small for noise multiplier {total}: "
            f"it must exceed {total / 2:.4g}"
        )
    return rest**-0.5
