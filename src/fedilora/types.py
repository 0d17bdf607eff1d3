"""The types every part of fedilora shares: a state of named tensors, a client's upload, the task."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

#: named tensors: a LoRA adapter keyed by peft's parameter names without the adapter name
#: (``...c_fc.lora_A.weight``), or the non-LoRA trainable tensors (head, missing-modality embeddings)
State = dict[str, Tensor]
#: what the labels are: one class, several classes, or one yes/no
Task = Literal["multiclass", "multilabel", "binary"]
#: ``(rank, lora, extra)`` of one client's personalized model
Personal = tuple[int, State, State]


@dataclass
class ClientUpdate:
    """What a client uploads after local training in one round."""

    client_id: int
    rank: int
    num_samples: int
    lora: State
    extra: State
    train_loss: float = float("nan")
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # what callbacks attach, e.g. the edit report

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for state in (self.lora, self.extra) for t in state.values())
