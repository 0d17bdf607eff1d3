"""Run a small federated fit on ``devices`` CPU processes and save what rank 0 ends with (two clients'
updates are sabotaged: the rejections must be the same whatever process trains them).

Fabric's ``ddp`` launcher starts the other processes by re-running this script, so the equality test
runs it in a subprocess: ``python tests/ddp_run.py DEVICES OUT_DIR [NUM_NODES]`` (with ``NUM_NODES`` > 1,
once per node with ``NODE_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set).
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedilora.editing import ModelEditing
from fedilora.model import LoRACLIPClassifier
from fedilora.privacy import DifferentialPrivacy
from fedilora.trainer import FederatedTrainer
from helpers import Sabotage, tiny_datamodule


def main(devices: int, out: Path, num_nodes: int = 1) -> None:
    # One thread per process, whatever the launcher: the thread count decides how float32 reductions are
    # split, hence their rounding. Fabric's ddp launcher sets cpu_count // devices threads unless
    # OMP_NUM_THREADS is set, so a 2-node run (1 device per node) would train with 2 threads per process on
    # a 2-core machine and the single-process run with 1 (6e-6 apart after 2 rounds of Adam).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    trainer = FederatedTrainer(
        rounds=2,
        clients_per_round=3,
        ranks=[4, 2, 2, 1],
        max_local_steps=3,
        # faults on process 1's share: a NaN head in round 0 (plan [0, 1, 3]), a huge update in round 1
        # (plan [1, 2, 3]) that only the round's median, taken after the gather, can reject
        callbacks=[
            ModelEditing(),
            Sabotage("nan_head", victims=[1], round_=0),
            Sabotage("huge", victims=[2], round_=1),
        ],
        accelerator="cpu",
        devices=devices,
        num_nodes=num_nodes,
        strategy="ddp" if devices * num_nodes > 1 else "auto",
        root_dir=str(out / "runs"),
        progress=False,
        # DP=1: secure noise, which every process must draw alike (rank 0's key)
        privacy=DifferentialPrivacy(clip_norm=0.5, noise_multiplier=1.0) if os.environ.get("DP") else None,
    )
    model = LoRACLIPClassifier(num_classes=12)
    evaluated, step = [0], model.validation_step  # samples this process evaluates: the processes share them

    def counting_step(batch, batch_idx):
        evaluated[0] += len(batch["label"])
        return step(batch, batch_idx)

    model.validation_step = counting_step
    # 120 test samples in 4 batches: enough for every process to get a shard of the global test set
    trainer.fit(model, tiny_datamodule(num_clients=4, eval_batch_size=32))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"evaluated_rank{trainer.fabric.global_rank}.txt").write_text(str(evaluated[0]))
    if trainer.fabric.is_global_zero:
        tensors = {f"global.{k}": v for k, v in {**trainer.global_lora, **trainer.global_extra}.items()}
        for client, (_, lora, extra) in trainer.personal.items():
            tensors.update({f"client{client}.{k}": v for k, v in {**lora, **extra}.items()})
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(out / "state.safetensors"))
        history = [{k: v for k, v in h.items() if k != "round/time_s"} for h in trainer.history]
        (out / "history.json").write_text(json.dumps(history))
        (out / "world_size.txt").write_text(str(trainer.fabric.world_size))
    (out / f"threads_rank{trainer.fabric.global_rank}.txt").write_text(str(torch.get_num_threads()))
    hasher = hashlib.sha256()
    for key, value in sorted({**trainer.global_lora, **trainer.global_extra}.items()):
        hasher.update(key.encode() + value.detach().cpu().contiguous().numpy().tobytes())
    (out / f"global_rank{trainer.fabric.global_rank}.sha256").write_text(hasher.hexdigest())


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 1)
