"""How much of a finished run's global model lives in the rank dimensions that few clients train.

Loads the last checkpoint of a run directory (``runs/<name>/version_N``, written by ``fedilora fit``)
and evaluates its global adapter truncated to each client rank (A[:r], B[:, :r]) with the global head,
per modality condition, and prints the size of each block of rank dimensions per tower
(sum over modules of ||s B[:, i:j] A[i:j]||_F). If the truncated adapter beats the full one, the
dimensions only the high-rank clients train hurt the global model (the head averaged over every client
saw mostly truncated features).

    .venv/bin/python experiments/diagnose_truncation.py runs/fedilora/version_0 [--ranks 4 8 16 32]
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

import torch
import yaml

import fedilora  # noqa: F401  (the torchvision shim first)
from fedilora.aggregation import truncate
from fedilora.cli import FediLoRACLI
from fedilora.lora_ops import module_keys


def block_norms(lora: dict, scale: float, edges: list[int]) -> dict[str, list[float]]:
    """Per tower, sum over modules of ||s B[:, i:j] A[i:j]||_F for consecutive ``edges`` i < j."""
    out: dict[str, list[float]] = {}
    for prefix, (a, b) in module_keys(lora).items():
        tower = "visual" if prefix.startswith("visual.") else "text"
        sizes = out.setdefault(tower, [0.0] * (len(edges) - 1))
        for n, (i, j) in enumerate(itertools.pairwise(edges)):
            sizes[n] += float(torch.linalg.matrix_norm(scale * lora[b][:, i:j].double() @ lora[a][i:j].double()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="run directory with config.yaml and checkpoints/")
    parser.add_argument("--ranks", nargs="+", type=int, help="ranks to evaluate (default: the run's client ranks)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        config = yaml.safe_load((args.run / "config.yaml").read_text())
        config.pop("ckpt_path", None)  # of the `fit` subcommand, not of the classes built here
        (Path(scratch) / "config.yaml").write_text(yaml.safe_dump(config))
        cli = FediLoRACLI(
            args=["--config", str(Path(scratch) / "config.yaml"), "--trainer.root_dir", scratch,
                  "--trainer.progress", "false"],
            run=False,
        )  # fmt: skip
        trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
        ranks, _, global_rank = trainer._check(model, datamodule)
        torch.manual_seed(trainer.seed)
        model.configure_model()
        model.add_ranks([*ranks, global_rank])
        trainer.aggregator.setup(scale=model.lora_scale)
        trainer.global_lora = model.lora_state(global_rank)
        trainer.global_extra = model.extra_state()
        trainer._fingerprint = trainer._make_fingerprint(model, datamodule, ranks, global_rank)
        datamodule.setup("fit")
        trainer._restore(model, str(max((args.run / "checkpoints").glob("round-*.ckpt"))))
        full, extra = trainer.global_lora, trainer.global_extra
        edges = sorted({0, *ranks, global_rank})
        results = {"block_norms": {"edges": edges, **block_norms(full, model.lora_scale, edges)}, "accuracy": {}}
        for rank in args.ranks or edges[1:]:
            state = (rank, truncate(full, rank), extra)
            results["accuracy"][rank] = {
                condition: trainer._evaluate_state(model, state, datamodule.global_test_dataloader(condition))["acc"]
                for condition in datamodule.conditions()
            }
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
