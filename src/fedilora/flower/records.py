"""fedilora's states and updates as Flower records (pure conversions, no transport).

Tensors travel as ``ArrayRecord`` (NumPy arrays: float32 round-trips bit for bit); scalars and texts as
``ConfigRecord``/``MetricRecord``. What callbacks attach to an update (``ClientUpdate.info``, e.g. the
edit report of ``ModelEditing``) travels as JSON; a dataclass is rebuilt only if it is defined in a
``fedilora`` module (nothing else is imported from what a peer sent).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

if TYPE_CHECKING:  # torch is imported where tensors are made: the ClientApp shim needs none of it
    from torch import Tensor

    from fedilora.aggregation import ClientUpdate, State


def to_arrays(state: Mapping[str, Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def from_arrays(record: ArrayRecord) -> State:
    import torch

    # copies: the arrays of a received record are read-only views of its buffer
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}", "fields": dataclasses.asdict(value)}
    return value


def _revive(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"__dataclass__", "fields"}:
        module, _, name = value["__dataclass__"].partition(":")
        if module == "fedilora" or module.startswith("fedilora."):
            cls = getattr(importlib.import_module(module), name, None)
            if dataclasses.is_dataclass(cls):
                return cls(**value["fields"])
    return value


def info_to_json(info: Mapping[str, Any]) -> str:
    return json.dumps({k: _jsonable(v) for k, v in info.items()})


def info_from_json(text: str) -> dict[str, Any]:
    return {k: _revive(v) for k, v in json.loads(text).items()}


def reply_to_records(reply: Mapping[str, Mapping[str, Any]]) -> RecordDict:
    """A client's reply (``fedilora.flower.client_work``: plain dicts per record kind) as Flower records."""
    records: dict[str, ArrayRecord | ConfigRecord | MetricRecord] = {}
    for name, arrays in reply.get("arrays", {}).items():
        records[name] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    for name, values in reply.get("config", {}).items():
        records[name] = ConfigRecord(dict(values))
    for name, values in reply.get("metrics", {}).items():
        records[name] = MetricRecord(dict(values))
    return RecordDict(records)


def record_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def update_from_record(content: RecordDict) -> ClientUpdate:
    update = report_from_record(content)
    update.lora = from_arrays(content.array_records["lora"])
    update.extra = from_arrays(content.array_records["extra"])
    return update


def report_from_record(content: RecordDict) -> ClientUpdate:
    """A client's report without tensors (secure aggregation: its update stays on its node)."""
    from fedilora.aggregation import ClientUpdate

    fields = content.config_records["update"]
    return ClientUpdate(
        client_id=int(fields["client-id"]),
        rank=int(fields["rank"]),
        num_samples=int(fields["num-samples"]),
        lora={},
        extra={},
        train_loss=float(fields["train-loss"]),
        metrics={k: float(v) for k, v in content.metric_records["metrics"].items()},
        info=info_from_json(str(fields["info"])),
    )
