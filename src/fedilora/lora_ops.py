"""Tensor operations on LoRA adapters, told apart by peft's parameter names.

For a module, ``lora_A`` is ``[r, d_in]`` and ``lora_B`` is ``[d_out, r]``: the rank axis is 0 for A and
1 for B. A and B are told apart by name only, never by comparing a shape with the rank (``d_in`` may
equal the rank).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedilora.types import State

#: what peft puts in front of a wrapped model's parameter names (and ``get_peft_model_state_dict``'s keys)
PEFT_PREFIX = "base_model.model."


@functools.lru_cache(maxsize=1 << 16)
def rank_axis(key: str) -> int:
    """The rank axis of a LoRA tensor, by its peft name: 0 for ``lora_A``, 1 for ``lora_B``."""
    if ".lora_A." in key or key.startswith("lora_A."):
        return 0
    if ".lora_B." in key or key.startswith("lora_B."):
        return 1
    raise KeyError(f"{key!r} is neither a lora_A nor a lora_B tensor")


def truncate(lora: Mapping[str, Tensor], rank: int) -> State:
    """The first ``rank`` rank dimensions: ``A[:r, :]`` and ``B[:, :r]`` (the broadcast to rank r)."""
    return {k: (v[:rank] if rank_axis(k) == 0 else v[:, :rank]).clone() for k, v in lora.items()}


def pad_rank(lora: Mapping[str, Tensor], rank: int) -> State:
    """``lora`` zero-padded along every tensor's rank axis to ``rank`` (the inverse of :func:`truncate`)."""
    out = {}
    for key, value in lora.items():
        axis = rank_axis(key)
        shape = list(value.shape)
        if shape[axis] > rank:
            raise ValueError(f"{key}: rank {shape[axis]} is above the global rank {rank}")
        shape[axis] = rank
        padded = value.new_zeros(shape)
        padded.narrow(axis, 0, value.shape[axis]).copy_(value)
        out[key] = padded
    return out


def covers(ranks: Sequence[int], global_rank: int) -> Tensor:
    """``[K, R]`` bool: whether client k (of rank ``ranks[k]``) has rank dimension i."""
    return torch.arange(global_rank)[None, :] < torch.as_tensor(ranks)[:, None]


def module_keys(lora: Mapping[str, Tensor]) -> dict[str, tuple[str, str]]:
    """``{prefix: (A key, B key)}`` for every module, prefix = the A key without ``.lora_A.weight``."""
    out = {}
    for key in lora:
        if rank_axis(key) == 0:
            prefix, _, suffix = key.rpartition("lora_A.")
            out[prefix.removesuffix(".")] = (key, f"{prefix}lora_B.{suffix}")
    return out


def nbytes(state: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def accumulation_dtype(t: Tensor) -> torch.dtype:
    # half-precision sums over many clients would lose the small contributions
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def to_device(state: Mapping[str, Tensor], device: torch.device | str) -> State:
    """Every tensor of ``state`` on ``device`` (no copy where one is there already)."""
    return {k: v.to(device) for k, v in state.items()}


def to_cpu(state: Mapping[str, Tensor]) -> State:
    """Every tensor of ``state`` on the CPU, detached (what is sent, gathered or kept between rounds)."""
    return {k: v.detach().cpu() for k, v in state.items()}
