"""The federated trainer: rounds of broadcast -> local training -> callbacks -> aggregation, on Fabric.

The loop follows Lightning's ``build_your_own_trainer`` example: plain Fabric calls, the client
LightningModule's own ``training_step``/``validation_step``/``configure_optimizers``, and extension
points fired with ``fabric.call`` (see ``fedilora.callbacks``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from jsonargparse import lazy_instance
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from fedilora.aggregation import Aggregator, ClientUpdate, DimensionWise, sample_weights, weighted_average
from fedilora.callbacks import FederatedCallback
from fedilora.data.datamodule import FederatedDataModule
from fedilora.errors import ConfigError
from fedilora.model import LoRACLIPClassifier, State


def client_seed(seed: int, round: int, client: int) -> int:
    """The seed of one client's local training in one round: independent of which process trains it."""
    return ((seed * 1_000_003 + round) * 1_000_033 + client) % (2**62)


def sample_clients(num_clients: int, per_round: int, seed: int, round: int) -> list[int]:
    """The clients of ``round``: a seeded draw without replacement (a function of the round only)."""
    generator = torch.Generator().manual_seed(seed * 7919 + round)
    return sorted(torch.randperm(num_clients, generator=generator)[:per_round].tolist())


class FederatedTrainer:
    """Runs federated rounds of LoRA fine-tuning over the clients of a ``FederatedDataModule``.

    Args:
        rounds: Number of federated rounds.
        clients_per_round: Clients sampled per round: a count (int) or a fraction of all clients (float in (0, 1]).
        ranks: LoRA rank of every client: one value for all, or a list with one rank per client.
        global_lora_rank: Rank R of the global adapter (default: the largest client rank).
        local_epochs: Local epochs over a client's training split per round.
        max_local_steps: If set, at most this many optimizer steps per client and round.
        aggregator: Server strategy, e.g. ``fedilora.aggregation.DimensionWise`` (FediLoRA) or ``FedAvg``.
        callbacks: Federated callbacks, e.g. ``fedilora.editing.ModelEditing`` (FediLoRA's editing).
        eval_every: Evaluate the global and personalized models every this many rounds (and after the last).
        seed: Seed of model initialisation, client sampling and every client's local training.
        accelerator: Fabric accelerator: ``cpu``, ``gpu``, ``auto``.
        devices: Fabric devices (processes).
        strategy: Fabric strategy, e.g. ``auto``, ``ddp``.
        num_nodes: Fabric nodes.
        precision: Fabric precision, e.g. ``32-true``, ``bf16-mixed``.
        root_dir: Directory for logs; each run writes to ``root_dir/name/version_N``.
        name: Run name (the TensorBoard experiment name).
        progress: Show a progress bar (round, client, step).
    """

    def __init__(
        self,
        rounds: int = 10,
        clients_per_round: int | float = 4,
        ranks: int | list[int] = 8,
        global_lora_rank: int | None = None,
        local_epochs: int = 1,
        max_local_steps: int | None = None,
        aggregator: Aggregator = lazy_instance(DimensionWise),
        callbacks: list[FederatedCallback] | None = None,
        eval_every: int = 1,
        seed: int = 0,
        accelerator: str = "cpu",
        devices: int = 1,
        strategy: str = "auto",
        num_nodes: int = 1,
        precision: str = "32-true",
        root_dir: str = "runs",
        name: str = "fedilora",
        progress: bool = True,
    ) -> None:
        for option, value, low in (
            ("rounds", rounds, 1),
            ("local_epochs", local_epochs, 1),
            ("eval_every", eval_every, 1),
        ):
            if value < low:
                raise ConfigError(f"trainer.{option}: must be >= {low}, got {value}")
        if max_local_steps is not None and max_local_steps < 1:
            raise ConfigError(f"trainer.max_local_steps: must be >= 1 or null, got {max_local_steps}")
        rank_list = [ranks] if isinstance(ranks, int) else list(ranks)
        if not rank_list or any(not isinstance(r, int) or r <= 0 for r in rank_list):
            raise ConfigError(f"trainer.ranks: every LoRA rank must be a positive integer, got {ranks}")
        if global_lora_rank is not None and global_lora_rank < max(rank_list):
            raise ConfigError(
                f"trainer.global_lora_rank: {global_lora_rank} is smaller than the largest client rank {max(rank_list)}"
            )
        if isinstance(clients_per_round, float) and not 0.0 < clients_per_round <= 1.0:
            raise ConfigError(f"trainer.clients_per_round: a fraction must be in (0, 1], got {clients_per_round}")
        if isinstance(clients_per_round, int) and clients_per_round < 1:
            raise ConfigError(f"trainer.clients_per_round: must be >= 1, got {clients_per_round}")
        if not isinstance(aggregator, Aggregator):
            raise ConfigError(f"trainer.aggregator: {aggregator!r} is not a fedilora.aggregation.Aggregator")
        self.rounds, self.clients_per_round, self.ranks = rounds, clients_per_round, ranks
        self.global_lora_rank = global_lora_rank
        self.local_epochs, self.max_local_steps = local_epochs, max_local_steps
        self.aggregator = aggregator
        self.callbacks = list(callbacks or [])
        self.eval_every, self.seed, self.progress = eval_every, seed, progress
        self.root_dir, self.name = root_dir, name
        logger = TensorBoardLogger(root_dir=root_dir, name=name)
        self.fabric = Fabric(
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            num_nodes=num_nodes,
            precision=precision,
            loggers=logger,
            callbacks=self.callbacks,
        )
        self.config_yaml: str | None = None  # the CLI sets the resolved config, written next to the logs
        self.history: list[dict[str, float]] = []
        self.global_lora: State = {}
        self.global_extra: State = {}
        self.personal: dict[int, tuple[int, State, State]] = {}
        self._bar = None

    # ------------------------------------------------------------------------------ setup
    def client_ranks(self, num_clients: int) -> list[int]:
        if isinstance(self.ranks, int):
            return [self.ranks] * num_clients
        if len(self.ranks) != num_clients:
            raise ConfigError(
                f"trainer.ranks: {len(self.ranks)} ranks given but data.num_clients is {num_clients}; "
                "give one rank per client or a single rank for all"
            )
        return list(self.ranks)

    def per_round(self, num_clients: int) -> int:
        if isinstance(self.clients_per_round, float):
            return max(1, round(self.clients_per_round * num_clients))
        if self.clients_per_round > num_clients:
            raise ConfigError(
                f"trainer.clients_per_round: {self.clients_per_round} is more than data.num_clients ({num_clients})"
            )
        return self.clients_per_round

    @property
    def log_dir(self) -> Path:
        return Path(self.fabric.logger.log_dir)

    def _check(self, model: LoRACLIPClassifier, datamodule: FederatedDataModule) -> tuple[list[int], int, int]:
        ranks = self.client_ranks(datamodule.num_clients)
        per_round = self.per_round(datamodule.num_clients)
        if self.aggregator.requires_equal_ranks and len(set(ranks)) > 1:
            raise ConfigError(
                f"trainer.aggregator: {type(self.aggregator).__name__} needs every client to have the same rank, "
                f"got trainer.ranks={ranks}"
            )
        if model.num_classes != datamodule.num_classes or model.task != datamodule.task:
            raise ConfigError(
                f"model.num_classes/task ({model.num_classes}, {model.task}) do not match the data "
                f"({datamodule.num_classes}, {datamodule.task})"
            )
        return ranks, per_round, self.global_lora_rank or max(ranks)

    # --------------------------------------------------------------------------------- fit
    def fit(self, model: LoRACLIPClassifier, datamodule: FederatedDataModule) -> dict:
        """Run every round and return the final results (also written to ``results.json``)."""
        fabric = self.fabric
        ranks, per_round, global_rank = self._check(model, datamodule)
        fabric.launch()
        fabric.seed_everything(self.seed)
        datamodule.setup("fit")
        model.configure_model()
        model.add_ranks([*ranks, global_rank])
        model.to(fabric.device)
        self.global_lora = model.lora_state(global_rank)
        self.global_extra = model.extra_state()
        self._write_run_files(datamodule)
        fabric.call("on_fit_start", trainer=self)

        start = time.perf_counter()
        self._bar = tqdm(
            total=self.rounds, desc="round", dynamic_ncols=True, disable=not (self.progress and fabric.is_global_zero)
        )
        for round_ in range(self.rounds):
            metrics = self._run_round(model, datamodule, round_, ranks, per_round)
            if (round_ + 1) % self.eval_every == 0 or round_ + 1 == self.rounds:
                metrics.update(self.evaluate(model, datamodule, global_rank))
            fabric.call("on_round_end", trainer=self, round=round_, metrics=metrics)
            fabric.log_dict(metrics, step=round_)
            self.history.append({"round": round_, **metrics})
            self._bar.update(1)
        self._bar.close()
        results = self._results(datamodule, ranks, time.perf_counter() - start)
        fabric.call("on_fit_end", trainer=self, results=results)
        if fabric.is_global_zero:
            (self.log_dir / "results.json").write_text(json.dumps(results, indent=2))
            fabric.print(format_results(results))
        fabric.logger.finalize("success")
        return results

    def _run_round(
        self, model: LoRACLIPClassifier, datamodule: FederatedDataModule, round_: int, ranks: list[int], per_round: int
    ) -> dict[str, float]:
        fabric = self.fabric
        started = time.perf_counter()
        fabric.call("on_round_start", trainer=self, round=round_)
        sampled = sample_clients(datamodule.num_clients, per_round, self.seed, round_)
        updates, downloaded = [], 0
        for client in sampled:
            received = self.aggregator.broadcast(self.global_lora, ranks[client])
            downloaded += sum(t.numel() * t.element_size() for t in (*received.values(), *self.global_extra.values()))
            fabric.call("on_client_fit_start", trainer=self, round=round_, client_id=client, rank=ranks[client])
            update = self.train_client(model, datamodule, round_, client, ranks[client], received, self.global_extra)
            fabric.call("on_client_fit_end", trainer=self, round=round_, update=update, received=received)
            self.personal[client] = (update.rank, update.lora, update.extra)
            updates.append(update)
        self.global_lora = self.aggregator.aggregate(self.global_lora, updates)
        self.global_extra = weighted_average([u.extra for u in updates], sample_weights(updates))
        fabric.call("on_aggregate_end", trainer=self, round=round_, global_lora=self.global_lora)
        metrics = {f"client/{u.client_id}/train_loss": u.train_loss for u in updates}
        metrics.update(
            {
                "train/loss": sum(u.train_loss for u in updates) / len(updates),
                "comm/bytes_uploaded": float(sum(u.nbytes() for u in updates)),
                "comm/bytes_downloaded": float(downloaded),
                "round/num_clients": float(len(updates)),
                "round/time_s": time.perf_counter() - started,
            }
        )
        return metrics

    def train_client(
        self,
        model: LoRACLIPClassifier,
        datamodule: FederatedDataModule,
        round_: int,
        client: int,
        rank: int,
        lora: Mapping[str, Tensor],
        extra: Mapping[str, Tensor],
    ) -> ClientUpdate:
        """Local training of one client from ``lora``/``extra``; returns its (unedited) update."""
        fabric = self.fabric
        model.load_client_state(rank, lora, extra)
        seed = client_seed(self.seed, round_, client)
        torch.manual_seed(seed)  # dropout etc.: the same whichever process trains this client
        loader = datamodule.client_dataloader(client, "train", torch.Generator().manual_seed(seed))
        optimizer = _optimizer(model.configure_optimizers())
        model.train()
        steps_per_epoch = len(loader)
        total_steps = self.local_epochs * steps_per_epoch
        if self.max_local_steps is not None:
            total_steps = min(total_steps, self.max_local_steps)
        loss_sum, step = torch.zeros((), device=fabric.device), 0
        while step < total_steps:
            for batch_idx, batch in enumerate(loader):
                batch = fabric.to_device(batch)
                with fabric.autocast():
                    loss = model.training_step(batch, batch_idx)
                fabric.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                step += 1
                self._show(round_, client, rank, step, total_steps)
                if step >= total_steps:
                    break
        train_loss = float(loss_sum) / max(step, 1)  # one sync per client, not per step
        if not math.isfinite(train_loss):
            fabric.print(f"warning: client {client} had a non-finite training loss in round {round_}")
        return ClientUpdate(
            client_id=client,
            rank=rank,
            num_samples=datamodule.num_train_samples(client),
            lora=model.lora_state(rank),
            extra=model.extra_state(),
            train_loss=train_loss,
        )

    # ------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate_loader(self, model: LoRACLIPClassifier, loader) -> dict[str, float]:
        model.eval()
        model.val_metrics.reset()
        for batch_idx, batch in enumerate(loader):
            with self.fabric.autocast():
                model.validation_step(self.fabric.to_device(batch), batch_idx)
        values = {k: float(v) for k, v in model.val_metrics.compute().items()}
        model.val_metrics.reset()
        return values

    def evaluate(
        self, model: LoRACLIPClassifier, datamodule: FederatedDataModule, global_rank: int
    ) -> dict[str, float]:
        """Global model on the global test set per modality condition; personalized models on their clients' tests."""
        metrics = {}
        model.load_client_state(global_rank, self.global_lora, self.global_extra)
        for condition in datamodule.conditions():
            for name, value in self.evaluate_loader(model, datamodule.global_test_dataloader(condition)).items():
                metrics[f"global/{condition}/{name}"] = value
        per_client: dict[str, list[float]] = {}
        for client, (rank, lora, extra) in sorted(self.personal.items()):
            loader = datamodule.client_dataloader(client, "test")
            if len(loader) == 0:
                continue
            model.load_client_state(rank, lora, extra)
            for name, value in self.evaluate_loader(model, loader).items():
                metrics[f"personalized/client_{client}/{name}"] = value
                per_client.setdefault(name, []).append(value)
        for name, values in per_client.items():
            metrics[f"personalized/mean/{name}"] = sum(values) / len(values)
            metrics["personalized/num_clients"] = float(len(values))
        return metrics

    # ----------------------------------------------------------------------------- output
    def _show(self, round_: int, client: int, rank: int, step: int, total: int) -> None:
        if self._bar is None or self._bar.disable:
            return
        self._bar.set_postfix_str(
            f"round {round_ + 1}/{self.rounds} client {client} (r={rank}) step {step}/{total}", refresh=False
        )
        now = time.monotonic()
        if now - getattr(self, "_last_refresh", 0.0) > 0.5:
            self._bar.refresh()
            self._last_refresh = now

    def log_histogram(self, tag: str, values: Tensor, step: int) -> None:
        if self.fabric.is_global_zero:
            self.fabric.logger.experiment.add_histogram(tag, values, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        if self.fabric.is_global_zero:
            self.fabric.logger.experiment.add_text(tag, text, step)

    def _write_run_files(self, datamodule: FederatedDataModule) -> None:
        if not self.fabric.is_global_zero:
            return
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            if self.config_yaml is not None:
                (self.log_dir / "config.yaml").write_text(self.config_yaml)
            masks = {k: v.contiguous() for k, v in datamodule.missing_masks().items()}
            save_file(masks, str(self.log_dir / "missing_masks.safetensors"))
        except OSError as err:
            raise ConfigError(
                f"trainer.root_dir: cannot write the run directory {self.log_dir} ({err.strerror})"
            ) from None

    def _results(self, datamodule: FederatedDataModule, ranks: Sequence[int], seconds: float) -> dict:
        final = self.history[-1]
        global_ = {
            condition: {k.split("/")[2]: v for k, v in final.items() if k.startswith(f"global/{condition}/")}
            for condition in datamodule.conditions()
        }
        personalized = {k.split("/")[2]: v for k, v in final.items() if k.startswith("personalized/mean/")}
        return {
            "aggregator": type(self.aggregator).__name__,
            "callbacks": [type(c).__name__ for c in self.callbacks],
            "rounds": self.rounds,
            "num_clients": datamodule.num_clients,
            "ranks": list(ranks),
            "global": global_,
            "personalized": personalized,
            "personalized_clients": int(final.get("personalized/num_clients", 0)),
            "wall_time_s": seconds,
            "log_dir": str(self.log_dir),
        }


def _optimizer(configured) -> torch.optim.Optimizer:
    """The optimizer out of whatever ``configure_optimizers`` returned (Lightning's accepted forms)."""
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, dict):
        return configured["optimizer"]
    if isinstance(configured, (list, tuple)) and configured:
        first = configured[0]
        return first[0] if isinstance(first, (list, tuple)) else _optimizer(first)
    raise TypeError(f"configure_optimizers returned {type(configured).__name__}; expected an optimizer")


_CONDITION_NAMES = {
    "complete": "complete",
    "image_only": "image only",
    "text_only": "text only",
    "missing": "as configured",
}


def format_results(results: dict) -> str:
    """The results table printed at the end of a run (Markdown)."""
    names = list(next(iter(results["global"].values())))
    header = ["evaluation", *names]
    rows = [[f"global, {_CONDITION_NAMES[c]}", *(f"{v[n]:.4f}" for n in names)] for c, v in results["global"].items()]
    if results["personalized"]:
        label = f"personalized, mean of {results['personalized_clients']} clients"
        rows.append([label, *(f"{results['personalized'].get(n, float('nan')):.4f}" for n in names)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    callbacks = ", ".join(results["callbacks"]) or "none"
    return "\n".join(
        [
            "",
            f"{results['aggregator']} (callbacks: {callbacks}), {results['rounds']} rounds, "
            f"{results['num_clients']} clients, "
            f"ranks {results['ranks']}, {results['wall_time_s']:.1f} s",
            line(header),
            "|" + "|".join("-" * (w + 2) for w in widths) + "|",
            *(line(r) for r in rows),
            f"logs: {results['log_dir']}",
        ]
    )
