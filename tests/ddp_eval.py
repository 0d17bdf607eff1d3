"""Evaluate fixed random models (the global one and every client's) on ``devices`` CPU processes per node
and write, per process, the figures it ends with and what it evaluated itself, for each task.

Fabric's ``ddp`` launcher starts the other processes by re-running this script, so the tests run it in
a subprocess: ``python tests/ddp_eval.py DEVICES OUT_DIR [NUM_NODES]`` (with ``NUM_NODES`` > 1, once
per node with ``NODE_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set). With ``BREAK=global`` or
``BREAK=personal`` in the environment, process 1 meets a data error in that evaluation; every process
writes the error it stops with to ``error_rank<r>.txt``.
"""

import json
import os
import sys
from pathlib import Path

import torch

from fedilora.data import FederatedDataModule, SyntheticBenchmark
from fedilora.data.errors import DataError
from fedilora.data.source import MultimodalData
from fedilora.errors import ConfigError
from fedilora.evaluation import evaluate_global, evaluate_personalized
from fedilora.model import LoRACLIPClassifier

NUM_TEST, EVAL_BATCH, NUM_CLIENTS = 150, 32, 5  # 5 test batches, the last one partial


class Relabelled(SyntheticBenchmark):
    """The synthetic benchmark with its class ids recoded for another task: ``binary`` (odd classes) or
    ``multilabel`` (the 4 bits of the class id), so that every metric kind is evaluated."""

    def __init__(self, task: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.task = task
        self.num_classes = {"multiclass": self.num_classes, "binary": 1, "multilabel": 4}[task]

    def load(self) -> tuple[MultimodalData, MultimodalData]:
        return tuple(self._relabel(data) for data in super().load())

    def _relabel(self, data: MultimodalData) -> MultimodalData:
        if self.task == "multiclass":
            return data
        y = data.labels
        labels = y % 2 if self.task == "binary" else (y[:, None] >> torch.arange(4)) & 1
        return MultimodalData(data.images, data.texts, labels)


def _noisy(state: dict, generator: torch.Generator) -> dict:
    return {k: v + 0.3 * torch.randn(v.shape, generator=generator) for k, v in state.items()}


def evaluate(fabric, task: str) -> dict:
    datamodule = FederatedDataModule(
        dataset=Relabelled(task, num_train=300, num_test=NUM_TEST),
        num_clients=NUM_CLIENTS,
        eval_batch_size=EVAL_BATCH,
        test_missing_rate=0.5,
    )
    datamodule.setup("fit")
    torch.manual_seed(0)
    model = LoRACLIPClassifier(num_classes=datamodule.num_classes, task=task)
    model.add_ranks([2, 4])
    generator = torch.Generator().manual_seed(1)
    global_state = (4, _noisy(model.lora_state(4), generator), _noisy(model.extra_state(), generator))
    personal = {c: (2, _noisy(model.lora_state(2), generator), _noisy(model.extra_state(), generator))
                for c in range(NUM_CLIENTS)}  # fmt: skip

    seen = {"global_samples": 0, "clients": []}
    step = model.validation_step

    def counting_step(batch, batch_idx):
        seen["global_samples"] += len(batch["label"])
        return step(batch, batch_idx)

    def broken_step(batch, batch_idx):
        raise DataError(f"broken.png, line {batch_idx + 1}: not an image (process {fabric.global_rank})")

    breaks = os.environ.get("BREAK") if fabric.global_rank == 1 else None
    model.validation_step = broken_step if breaks == "global" else counting_step
    metrics = evaluate_global(model, fabric, datamodule, [global_state])
    model.validation_step = broken_step if breaks == "personal" else step
    loader = datamodule.client_dataloader
    datamodule.client_dataloader = lambda client, split: seen["clients"].append(client) or loader(client, split)
    metrics.update(evaluate_personalized(model, fabric, datamodule, personal))
    return {"metrics": metrics, "conditions": list(datamodule.conditions()), **seen}


def main(devices: int, out: Path, num_nodes: int = 1) -> None:
    from lightning.fabric import Fabric  # after fedilora: its torchvision shim must come first

    os.environ["OMP_NUM_THREADS"] = "1"  # else Fabric's ddp launcher sets cpu_count // devices (see ddp_run.py)
    torch.set_num_threads(1)
    fabric = Fabric(accelerator="cpu", devices=devices, num_nodes=num_nodes,
                    strategy="ddp" if devices * num_nodes > 1 else "auto")  # fmt: skip
    fabric.launch()
    out.mkdir(parents=True, exist_ok=True)
    try:
        results = {task: evaluate(fabric, task) for task in ("multiclass", "binary", "multilabel")}
    except ConfigError as err:
        (out / f"error_rank{fabric.global_rank}.txt").write_text(f"{type(err).__name__}: {err}")
        sys.exit(2)
    results["world_size"] = fabric.world_size
    (out / f"rank{fabric.global_rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 1)
