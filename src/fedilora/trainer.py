"""The federated trainer: rounds of broadcast -> local training -> callbacks -> aggregation, on Fabric.

The loop follows Lightning's ``build_your_own_trainer`` example: plain Fabric calls, the client
LightningModule's own ``training_step``/``validation_step``/``configure_optimizers``, and extension
points fired with ``fabric.call`` (see ``fedilora.callbacks``).
"""

from __future__ import annotations

import json
import math
import random
import signal
import threading
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

from fedilora.aggregation import Aggregator, ClientUpdate, DimensionWise, nbytes, sample_weights, weighted_average
from fedilora.callbacks import FederatedCallback
from fedilora.checkpoint import (
    checkpoint_path,
    find_last,
    fingerprint_mismatch,
    load_checkpoint,
    prune,
    save_checkpoint,
)
from fedilora.data.datamodule import FederatedDataModule
from fedilora.errors import ConfigError
from fedilora.model import LoRACLIPClassifier, State


class _Interrupted(BaseException):
    """Ctrl-C seen between two optimizer steps (a BaseException: client fault handling must not catch it)."""


POOLED = -1  # the client id of ``Centralized``'s single model trained on the union of all clients


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
        min_clients_per_round: A round with fewer healthy updates than this is skipped (global model unchanged).
        max_update_norm: Reject a client update whose L2 distance from what it started from exceeds this.
        checkpoint_every: Write a checkpoint every this many rounds (and after the last; null: only then).
        keep_last: How many checkpoints of the run to keep.
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
        min_clients_per_round: int = 1,
        max_update_norm: float | None = None,
        checkpoint_every: int | None = 5,
        keep_last: int = 2,
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
        if min_clients_per_round < 1:
            raise ConfigError(f"trainer.min_clients_per_round: must be >= 1, got {min_clients_per_round}")
        if max_update_norm is not None and not max_update_norm > 0:
            raise ConfigError(f"trainer.max_update_norm: must be > 0 or null, got {max_update_norm}")
        if checkpoint_every is not None and checkpoint_every < 1:
            raise ConfigError(f"trainer.checkpoint_every: must be >= 1 or null, got {checkpoint_every}")
        if keep_last < 1:
            raise ConfigError(f"trainer.keep_last: must be >= 1, got {keep_last}")
        if not isinstance(aggregator, Aggregator):
            raise ConfigError(f"trainer.aggregator: {aggregator!r} is not a fedilora.aggregation.Aggregator")
        self.rounds, self.clients_per_round, self.ranks = rounds, clients_per_round, ranks
        self.global_lora_rank = global_lora_rank
        self.local_epochs, self.max_local_steps = local_epochs, max_local_steps
        self.aggregator = aggregator
        self.callbacks = list(callbacks or [])
        self.eval_every, self.seed, self.progress = eval_every, seed, progress
        self.min_clients_per_round, self.max_update_norm = min_clients_per_round, max_update_norm
        self.checkpoint_every, self.keep_last = checkpoint_every, keep_last
        self._interrupted = False
        self.root_dir, self.name = root_dir, name
        logger = TensorBoardLogger(root_dir=root_dir, name=name)
        try:
            self.fabric = Fabric(
                accelerator=accelerator,
                devices=devices,
                strategy=strategy,
                num_nodes=num_nodes,
                precision=precision,
                loggers=logger,
                callbacks=self.callbacks,
            )
        except (ValueError, TypeError, RuntimeError, ImportError) as err:  # Fabric's own checks, one line each
            raise ConfigError(
                f"trainer.accelerator/devices/strategy/num_nodes/precision ({accelerator!r}, {devices!r}, "
                f"{strategy!r}, {num_nodes!r}, {precision!r}): {str(err).splitlines()[0]}"
            ) from None
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
                f"trainer.aggregator: {_strategy_name(self.aggregator)} needs every client to have the same rank, "
                f"got trainer.ranks={ranks}"
            )
        if self.aggregator.needs_constant_scale and model.lora_alpha is not None:
            raise ConfigError(
                f"trainer.aggregator: {_strategy_name(self.aggregator)} multiplies B @ A with one LoRA scale for all "
                "ranks; set model.lora_alpha: null (constant scale)"
            )
        if model.num_classes != datamodule.num_classes or model.task != datamodule.task:
            raise ConfigError(
                f"model.num_classes/task ({model.num_classes}, {model.task}) do not match the data "
                f"({datamodule.num_classes}, {datamodule.task})"
            )
        if self.min_clients_per_round > (1 if self.aggregator.pooled else per_round):
            raise ConfigError(
                f"trainer.min_clients_per_round: {self.min_clients_per_round} is more than the {per_round} clients "
                "sampled per round: every round would be skipped"
            )
        return ranks, per_round, self.global_lora_rank or max(ranks)

    # --------------------------------------------------------------------------------- fit
    def fit(self, model: LoRACLIPClassifier, datamodule: FederatedDataModule, ckpt_path: str | None = None) -> dict:
        """Run every round and return the final results (also written to ``results.json``).

        Args:
            ckpt_path: Resume from this checkpoint, or ``last`` for the newest one of ``root_dir/name``.
        """
        fabric = self.fabric
        ranks, per_round, global_rank = self._check(model, datamodule)
        fabric.launch()
        fabric.seed_everything(self.seed)
        datamodule.setup("fit")
        model.configure_model()
        model.add_ranks([*ranks, global_rank])
        model.to(fabric.device)
        self.aggregator.setup(scale=model.lora_scale)
        self.global_lora = model.lora_state(global_rank)
        self.global_extra = model.extra_state()
        self._fingerprint = self._make_fingerprint(model, datamodule, ranks, global_rank)
        start_round = 0
        if ckpt_path is not None:
            start_round = self._restore(model, ckpt_path)
        self._write_run_files(datamodule)
        fabric.call("on_fit_start", trainer=self)

        start = time.perf_counter()
        self._bar = tqdm(
            total=self.rounds,
            initial=start_round,
            desc="round",
            dynamic_ncols=True,
            disable=not (self.progress and fabric.is_global_zero),
        )
        self._snapshot = self._state(model, start_round) if start_round else None
        with self._sigint_stops_at_a_safe_point():
            try:
                for round_ in range(start_round, self.rounds):
                    metrics = self._run_round(model, datamodule, round_, ranks, per_round, global_rank)
                    if (round_ + 1) % self.eval_every == 0 or round_ + 1 == self.rounds:
                        metrics.update(self.evaluate(model, datamodule, global_rank))
                    fabric.call("on_round_end", trainer=self, round=round_, metrics=metrics)
                    fabric.log_dict(metrics, step=round_)
                    self.history.append({"round": round_, **metrics})
                    self._snapshot = self._state(model, round_ + 1)
                    if round_ + 1 == self.rounds or (
                        self.checkpoint_every and (round_ + 1) % self.checkpoint_every == 0
                    ):
                        self.save_checkpoint(self._snapshot)
                    self._bar.update(1)
            except (KeyboardInterrupt, _Interrupted):
                self._bar.close()
                self._stop_with_checkpoint()
        self._bar.close()
        results = self._results(datamodule, ranks, time.perf_counter() - start)
        fabric.call("on_fit_end", trainer=self, results=results)
        if fabric.is_global_zero:
            (self.log_dir / "results.json").write_text(json.dumps(results, indent=2))
            fabric.print(format_results(results))
        fabric.logger.finalize("success")
        return results

    def export(self, model: LoRACLIPClassifier, datamodule: FederatedDataModule, ckpt_path: str, out: str) -> Path:
        """Write the global adapter and every client's personalized adapter of a checkpoint in peft's format.

        Args:
            ckpt_path: The checkpoint to export, or ``last`` for the newest one of ``root_dir/name``.
            out: Output folder: ``global/`` and ``clients/client_<k>/``, each with ``adapter_config.json``,
                ``adapter_model.safetensors``, ``head.safetensors`` and ``fedilora.json``.
        """
        from fedilora.export import write_adapter

        ranks, _, global_rank = self._check(model, datamodule)
        torch.manual_seed(self.seed)
        model.configure_model()
        model.add_ranks([*ranks, global_rank])
        self.aggregator.setup(scale=model.lora_scale)
        self.global_lora = model.lora_state(global_rank)
        self.global_extra = model.extra_state()
        self._fingerprint = self._make_fingerprint(model, datamodule, ranks, global_rank)
        completed = self._restore(model, ckpt_path)
        root = Path(out)
        try:
            written = [write_adapter(model, global_rank, self.global_lora, self.global_extra, root / "global",
                                     {"client": None, "completed_rounds": completed})]  # fmt: skip
            for client, (rank, lora, extra) in sorted(self.personal.items()):
                info = {"client": client, "completed_rounds": completed}
                written.append(write_adapter(model, rank, lora, extra, root / "clients" / f"client_{client}", info))
        except OSError as err:
            raise ConfigError(f"--out: cannot write {root} ({err.strerror})") from None
        self.fabric.print(f"exported {len(written)} adapters (global + {len(written) - 1} clients) to {root}")
        return root

    # ------------------------------------------------------------------------ checkpoints
    def _make_fingerprint(self, model, datamodule, ranks: list[int], global_rank: int) -> dict:
        """What a checkpoint must agree on with the config resuming from it."""
        return {
            "ranks": ranks,
            "global_lora_rank": global_rank,
            "num_clients": datamodule.num_clients,
            "model_name": model.model_name,
            "aggregator": _strategy_name(self.aggregator),
            "lora": {k: list(v.shape) for k, v in self.global_lora.items()},
            "extra": {k: list(v.shape) for k, v in self.global_extra.items()},
        }

    def _state(self, model: LoRACLIPClassifier, completed_rounds: int) -> dict:
        """Everything needed to continue after ``completed_rounds`` rounds (references, not copies:
        the round loop replaces these tensors rather than changing them in place)."""
        aggregator = self.aggregator
        merged = getattr(aggregator, "merged", {}) if getattr(aggregator, "merges_into_base", False) else {}
        return {
            "completed_rounds": completed_rounds,
            "global_lora": self.global_lora,
            "global_extra": self.global_extra,
            "personal": {str(c): {"rank": r, "lora": lo, "extra": ex} for c, (r, lo, ex) in self.personal.items()},
            "aggregator": aggregator.state_dict() if hasattr(aggregator, "state_dict") else {},
            "base_weights": {m: model.base_weight(m).detach().clone() for m in merged},
            "history": list(self.history),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "fingerprint": self._fingerprint,
            "config": self.config_yaml or "",
        }

    def save_checkpoint(self, state: dict) -> Path:
        path = checkpoint_path(self.log_dir, state["completed_rounds"])
        try:
            save_checkpoint(self.fabric, path, state)
        except OSError as err:
            raise ConfigError(f"trainer.root_dir: cannot write checkpoint {path} ({err.strerror})") from None
        if self.fabric.is_global_zero:
            prune(path.parent, self.keep_last)
        return path

    def _restore(self, model: LoRACLIPClassifier, ckpt_path: str) -> int:
        path = find_last(self.root_dir, self.name) if ckpt_path == "last" else Path(ckpt_path)
        state = load_checkpoint(self.fabric, path)
        problem = fingerprint_mismatch(state["fingerprint"], self._fingerprint)
        if problem is not None:
            raise ConfigError(f"--ckpt_path: {path} was written by a different configuration ({problem})")
        device = self.fabric.device
        self.global_lora = {k: v.to(device) for k, v in state["global_lora"].items()}
        self.global_extra = {k: v.to(device) for k, v in state["global_extra"].items()}
        self.personal = {
            int(c): (p["rank"], {k: v.to(device) for k, v in p["lora"].items()}, {k: v.to(device) for k, v in
                     p["extra"].items()})
            for c, p in state["personal"].items()
        }  # fmt: skip
        if hasattr(self.aggregator, "load_state_dict"):
            self.aggregator.load_state_dict(state["aggregator"])
        model.load_base_weights(state["base_weights"])
        self.history = list(state["history"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.fabric.print(f"resumed from {path} after {state['completed_rounds']} round(s)")
        return state["completed_rounds"]

    def _stop_with_checkpoint(self) -> None:
        """Ctrl-C: keep the last completed round and say how to go on."""
        if self._snapshot is None:
            self.fabric.print("interrupted before the first round completed; nothing to save")
            raise KeyboardInterrupt
        path = self.save_checkpoint(self._snapshot)
        self.fabric.print(
            f"interrupted: saved round {self._snapshot['completed_rounds']} to {path}\n"
            f"resume with the same command plus --ckpt_path {path} (or --ckpt_path last)"
        )
        raise KeyboardInterrupt

    def _sigint_stops_at_a_safe_point(self):
        """Ctrl-C sets a flag that the loop checks between optimizer steps; a second Ctrl-C stops at once."""
        trainer = self

        class _Handler:
            def __enter__(self):
                self.previous = None
                if threading.current_thread() is threading.main_thread():
                    self.previous = signal.signal(signal.SIGINT, self.handle)
                return self

            def handle(self, signum, frame):
                if trainer._interrupted:
                    raise KeyboardInterrupt
                trainer._interrupted = True

            def __exit__(self, *exc):
                if self.previous is not None:
                    signal.signal(signal.SIGINT, self.previous)
                trainer._interrupted = False

        return _Handler()

    def round_plan(self, round_: int, ranks: Sequence[int], per_round: int, global_rank: int) -> list[tuple[int, int]]:
        """``(client, rank)`` pairs trained in ``round_`` (``POOLED`` stands for the union of all clients)."""
        if self.aggregator.pooled:
            return [(POOLED, global_rank)]
        return [(c, ranks[c]) for c in sample_clients(len(ranks), per_round, self.seed, round_)]

    def _start_state(self, client: int, rank: int) -> tuple[State, State]:
        if not self.aggregator.communicates and client in self.personal:
            _, lora, extra = self.personal[client]  # `local`: a client continues from its own model
            return lora, extra
        return self.aggregator.broadcast(self.global_lora, rank), self.global_extra

    def _run_round(
        self,
        model: LoRACLIPClassifier,
        datamodule: FederatedDataModule,
        round_: int,
        ranks: list[int],
        per_round: int,
        global_rank: int,
    ) -> dict[str, float]:
        fabric, aggregator = self.fabric, self.aggregator
        started = time.perf_counter()
        fabric.call("on_round_start", trainer=self, round=round_)
        plan = self.round_plan(round_, ranks, per_round, global_rank)
        mine = plan[fabric.global_rank :: fabric.world_size]  # each process trains its share of the clients
        updates, failures, downloaded = [], [], 0
        for client, rank in mine:
            lora, extra = self._start_state(client, rank)
            downloaded += aggregator.download_nbytes(lora) + nbytes(extra)
            fabric.call("on_client_fit_start", trainer=self, round=round_, client_id=client, rank=rank)
            try:
                update = self.train_client(model, datamodule, round_, client, rank, lora, extra)
                fabric.call("on_client_fit_end", trainer=self, round=round_, update=update, received=lora)
                problem = self._reject_reason(update, lora, extra)
            except Exception as err:  # a client's failure must not end the federation
                update, problem = None, f"{type(err).__name__}: {err}"
            if problem is None:
                updates.append(update)
            else:
                failures.append((client, problem))
        if fabric.world_size > 1:
            updates, failures, downloaded = self._gather(updates, failures, downloaded, plan)
        for client, problem in failures:
            fabric.print(f"warning: round {round_}: client {client} left out of the aggregation ({problem})")
        for update in updates:
            if update.client_id != POOLED:  # personalized states wait on the CPU, not in device memory
                self.personal[update.client_id] = (update.rank, _cpu(update.lora), _cpu(update.extra))
        skipped = len(updates) < self.min_clients_per_round
        if skipped:
            fabric.print(
                f"warning: round {round_} skipped: {len(updates)} healthy update(s), fewer than "
                f"trainer.min_clients_per_round={self.min_clients_per_round}; the global model is unchanged"
            )
        elif aggregator.communicates or aggregator.pooled:
            self.global_lora = aggregator.aggregate(self.global_lora, updates)
            self.global_extra = weighted_average([u.extra for u in updates], sample_weights(updates))
            if getattr(aggregator, "merges_into_base", False):
                model.merge_into_base(aggregator.last_delta)
        fabric.call("on_aggregate_end", trainer=self, round=round_, global_lora=self.global_lora, updates=updates)
        communicates = aggregator.communicates
        metrics = {f"client/{u.client_id}/train_loss": u.train_loss for u in updates}
        metrics.update(
            {
                "train/loss": sum(u.train_loss for u in updates) / len(updates) if updates else math.nan,
                "comm/bytes_uploaded": float(sum(u.nbytes() for u in updates)) if communicates else 0.0,
                "comm/bytes_downloaded": float(downloaded) if communicates else 0.0,
                "round/num_clients": float(len(updates)),
                "round/rejected_updates": float(len(failures)),
                "round/skipped": float(skipped),
                "round/time_s": time.perf_counter() - started,
            }
        )
        return metrics

    def _reject_reason(
        self, update: ClientUpdate, lora: Mapping[str, Tensor], extra: Mapping[str, Tensor]
    ) -> str | None:
        """Why ``update`` must not be aggregated (non-finite values, or too large a change), or None."""
        squared = torch.zeros((), dtype=torch.float64)
        for new, old in ((update.lora, lora), (update.extra, extra)):
            for key, value in new.items():
                if not torch.isfinite(value).all():
                    return f"non-finite values in {key}"
                squared += (value.double() - old[key].double().to(value.device)).square().sum().cpu()
        norm = float(squared.sqrt())
        update.metrics["update_norm"] = norm
        if self.max_update_norm is not None and norm > self.max_update_norm:
            return f"update norm {norm:.4g} exceeds trainer.max_update_norm={self.max_update_norm}"
        return None

    def _gather(
        self, updates: list[ClientUpdate], failures: list[tuple[int, str]], downloaded: int, plan: list[tuple[int, int]]
    ) -> tuple[list[ClientUpdate], list[tuple[int, str]], int]:
        """Every process receives every update, in plan order, so all compute the same aggregate."""
        import torch.distributed as dist

        local = ([_to_cpu(u) for u in updates], failures, downloaded)
        gathered: list = [None] * self.fabric.world_size
        dist.all_gather_object(gathered, local)
        order = {client: i for i, (client, _) in enumerate(plan)}
        all_updates = sorted((u for part, _, _ in gathered for u in part), key=lambda u: order[u.client_id])
        all_failures = sorted((f for _, part, _ in gathered for f in part), key=lambda f: order[f[0]])
        device = self.fabric.device
        for update in all_updates:
            update.lora = {k: v.to(device) for k, v in update.lora.items()}
            update.extra = {k: v.to(device) for k, v in update.extra.items()}
        return all_updates, all_failures, sum(count for _, _, count in gathered)

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
        generator = torch.Generator().manual_seed(seed)
        if client == POOLED:
            loader = datamodule.pooled_dataloader("train", generator)
            num_samples = sum(datamodule.num_train_samples(k) for k in range(datamodule.num_clients))
        else:
            loader = datamodule.client_dataloader(client, "train", generator)
            num_samples = datamodule.num_train_samples(client)
        optimizer = _optimizer(model.configure_optimizers())
        model.train()
        total_steps = self.local_epochs * len(loader)
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
                if self._interrupted:
                    raise _Interrupted
                self._show(round_, client, rank, step, total_steps)
                if step >= total_steps:
                    break
        return ClientUpdate(
            client_id=client,
            rank=rank,
            num_samples=num_samples,
            lora=model.lora_state(rank),
            extra=model.extra_state(),
            train_loss=float(loss_sum) / max(step, 1),  # one device sync per client, not per step
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
        """The global model on the global test set, per modality condition, and every client's
        personalized model on its own test split.

        ``local`` has no global model: its global figures are the mean over the clients' own models.
        ``centralized`` has no personalized models: the pooled model is evaluated on every client's test.
        """
        metrics: dict[str, float] = {}
        shared = (global_rank, self.global_lora, self.global_extra)
        communicates = self.aggregator.communicates or self.aggregator.pooled
        global_models = [shared] if communicates else list(self.personal.values())
        for condition in datamodule.conditions():
            loader = datamodule.global_test_dataloader(condition)
            runs = [self._evaluate_state(model, state, loader) for state in global_models]
            for name in runs[0] if runs else ():
                metrics[f"global/{condition}/{name}"] = sum(r[name] for r in runs) / len(runs)
        personal = dict.fromkeys(range(datamodule.num_clients), shared) if self.aggregator.pooled else self.personal
        per_client: dict[str, list[float]] = {}
        for client, state in sorted(personal.items()):
            loader = datamodule.client_dataloader(client, "test")
            if len(loader) == 0:
                continue
            for name, value in self._evaluate_state(model, state, loader).items():
                metrics[f"personalized/client_{client}/{name}"] = value
                per_client.setdefault(name, []).append(value)
        for name, values in per_client.items():
            metrics[f"personalized/mean/{name}"] = sum(values) / len(values)
            metrics["personalized/num_clients"] = float(len(values))
        return metrics

    def _evaluate_state(self, model: LoRACLIPClassifier, state: tuple[int, State, State], loader) -> dict[str, float]:
        model.load_client_state(*state)
        return self.evaluate_loader(model, loader)

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
            "aggregator": _strategy_name(self.aggregator),
            "callbacks": [_strategy_name(c) for c in self.callbacks],
            "rounds": self.rounds,
            "num_clients": datamodule.num_clients,
            "ranks": list(ranks),
            "global": global_,
            "personalized": personalized,
            "personalized_clients": int(final.get("personalized/num_clients", 0)),
            "wall_time_s": seconds,
            "log_dir": str(self.log_dir),
        }


def _strategy_name(obj: object) -> str:
    """The class name, without jsonargparse's ``LazyInstance_`` prefix of lazily built defaults."""
    return type(obj).__name__.removeprefix("LazyInstance_")


def _cpu(state: Mapping[str, Tensor]) -> State:
    return {k: v.cpu() for k, v in state.items()}


def _to_cpu(update: ClientUpdate) -> ClientUpdate:
    update.lora, update.extra = _cpu(update.lora), _cpu(update.extra)
    return update


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
            *([_edits_line(results["edits"])] if "edits" in results else []),
            f"logs: {results['log_dir']}",
        ]
    )


def _edits_line(edits: dict) -> str:
    line = f"edits: {edits['total']} in {edits['rounds_with_edits']} of {edits['rounds_eligible']} rounds"
    return line + (" (warning: model editing never ran)" if edits["total"] == 0 else "")
