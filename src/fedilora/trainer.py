"""The Fabric engine of a federation: ``FederatedTrainer`` drives the shared client and server code.

One Fabric job holds every client: each process trains its share of a round's clients with
``fedilora.client.fit_client``, the updates are gathered, and every process applies the same
``fedilora.server.FederatedServer`` round step. Evaluation is ``fedilora.evaluation``, files and logs
``fedilora.output``. The loop follows Lightning's ``build_your_own_trainer`` example: plain Fabric
calls, the client LightningModule's own ``training_step``/``validation_step``/``configure_optimizers``,
and extension points fired with ``fabric.call`` (see ``fedilora.callbacks``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from jsonargparse import lazy_instance
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger
from torch import Tensor

from fedilora.algorithms.base import Aggregator
from fedilora.algorithms.dimension_wise import DimensionWise
from fedilora.callbacks import FederatedCallback
from fedilora.checkpoint import make_fingerprint, remove_stale_temporaries, stop_at_a_safe_point
from fedilora.client import Interrupted, fit_client
from fedilora.data.datamodule import Condition, FederatedDataModule
from fedilora.errors import ConfigError, RunFailed
from fedilora.evaluation import evaluate_global, evaluate_personalized
from fedilora.fabric_pool import FabricPool
from fedilora.model import LoRACLIPClassifier, State
from fedilora.output import RunOutput, majority_warning, run_results
from fedilora.personal import DEFAULT_MEMORY_MB, personal_store
from fedilora.privacy import DifferentialPrivacy, SecureAggregation
from fedilora.privacy.dp import released_only
from fedilora.privacy.notes import say_what_dp_changes
from fedilora.progress import RoundBar
from fedilora.round import ClientPool, run_round
from fedilora.run_state import restore_run_state, run_state, save_run_state, stop_with_checkpoint
from fedilora.runtime import build, launch
from fedilora.server import (
    POOLED,
    FederatedServer,
    Personal,
    check_federation,
    client_ranks,
    clients_per_round,
    run_problem,
    strategy_name,
)
from fedilora.trainer_options import check_trainer_options
from fedilora.types import ClientUpdate


class FederatedTrainer:
    """Runs federated rounds of LoRA fine-tuning over the clients of a ``FederatedDataModule``.

    Args:
        rounds: Number of federated rounds.
        clients_per_round: Clients sampled per round: a count (int) or a fraction of all clients (float in (0, 1]).
        ranks: LoRA rank of every client: one value for all, or a list with one rank per client.
        global_lora_rank: Rank R of the global adapter (default: the largest client rank).
        local_epochs: Local epochs over a client's training split per round.
        max_local_steps: If set, at most this many optimizer steps per client and round.
        aggregator: Server strategy, e.g. ``fedilora.algorithms.DimensionWise`` (FediLoRA) or ``FedAvg``.
        callbacks: Federated callbacks, e.g. ``fedilora.algorithms.ModelEditing`` (FediLoRA's editing).
        eval_every: Evaluate the global and personalized models every this many rounds (and after the last).
        min_clients_per_round: A round with fewer healthy updates than this is skipped (global model unchanged).
        max_update_norm: Reject a client update whose L2 distance from what it started from exceeds this.
        update_norm_factor: Reject a client update whose norm exceeds this many times the median norm of
            the round's updates (needs at least 3 updates in the round; null: off).
        round_timeout_s: Seconds from a round's start after which a client still training, or not started, is
            left out like a failed one (null: none; a run it cuts is not reproducible; Flower: ``round-timeout``).
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
        privacy: Client-level differential privacy (``fedilora.privacy.DifferentialPrivacy``): clipping,
            noise per rank dimension, epsilon accounting and budget.
        secure_aggregation: Aggregate from pairwise-masked updates only
            (``fedilora.privacy.SecureAggregation``).
        personal_memory_mb: RAM for the clients' personalized states (MiB); past it the least recently
            used are spilled to safetensors files in the run folder (``personal/``) and read back when
            needed, with the same results (``fedilora.personal``). null: no limit, all in RAM.
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
        update_norm_factor: float | None = 10.0,
        round_timeout_s: float | None = None,
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
        privacy: DifferentialPrivacy | None = None,
        secure_aggregation: SecureAggregation | None = None,
        personal_memory_mb: float | None = DEFAULT_MEMORY_MB,
    ) -> None:
        self.init_args = {k: v for k, v in locals().items() if k != "self"}  # fingerprinted in checkpoints
        check_trainer_options(self.init_args)
        self.rounds, self.clients_per_round, self.ranks = rounds, clients_per_round, ranks
        self.global_lora_rank = global_lora_rank
        self.local_epochs, self.max_local_steps = local_epochs, max_local_steps
        self.aggregator = aggregator
        self.privacy, self.secure_aggregation = privacy, secure_aggregation
        self.callbacks = list(callbacks or [])
        self.eval_every, self.seed, self.progress = eval_every, seed, progress
        self.min_clients_per_round, self.max_update_norm = min_clients_per_round, max_update_norm
        self.update_norm_factor, self.round_timeout_s, self._deadline = update_norm_factor, round_timeout_s, None
        self.checkpoint_every, self.keep_last = checkpoint_every, keep_last
        self.personal_memory_mb = personal_memory_mb
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
        self.server: FederatedServer | None = None  # built by fit/export, once the clients are known
        self.output = RunOutput(logger)
        self._bar: RoundBar | None = None

    # ------------------------------------------------------------- the federation's state (the server's)
    @property
    def global_lora(self) -> State:
        return self.server.global_lora if self.server is not None else {}

    @property
    def global_extra(self) -> State:
        return self.server.global_extra if self.server is not None else {}

    @property
    def personal(self) -> Mapping[int, Personal]:
        """Every client's personalized ``(rank, lora, extra)``, by client id (a ``PersonalStore``)."""
        return self.server.personal if self.server is not None else {}

    # ------------------------------------------------------------------------------ setup
    @property
    def log_dir(self) -> Path:
        return Path(self.fabric.logger.log_dir)

    def _check(self, model: LoRACLIPClassifier, datamodule: FederatedDataModule) -> tuple[list[int], int, int]:
        ranks = client_ranks(self.ranks, datamodule.num_clients)
        per_round = clients_per_round(self.clients_per_round, datamodule.num_clients)
        check_federation(
            self.aggregator,
            ranks,
            per_round,
            self.min_clients_per_round,
            model.lora_alpha,
            (model.num_classes, model.task),
            (datamodule.num_classes, datamodule.task),
        )
        return ranks, per_round, self.global_lora_rank or max(ranks)

    def _setup_server(
        self, model: LoRACLIPClassifier, ranks: list[int], per_round: int, global_rank: int, spill: bool = True
    ) -> None:
        """``spill``: the personalized states may be written to the run folder (not when only reading a checkpoint)."""
        self.aggregator.setup(scale=model.lora_scale)
        if self.privacy is not None:
            self.privacy.setup(self.aggregator, len(ranks), per_round, self.rounds)
        if self.secure_aggregation is not None:
            self.secure_aggregation.setup(self.aggregator, 1 if self.aggregator.pooled else per_round)
        self.server = FederatedServer(
            self.aggregator,
            ranks,
            per_round,
            global_rank,
            self.seed,
            model.lora_state(global_rank),
            model.extra_state(),
            min_clients_per_round=self.min_clients_per_round,
            max_update_norm=self.max_update_norm,
            update_norm_factor=self.update_norm_factor,
            privacy=self.privacy,
            secure_aggregation=self.secure_aggregation,
            personal=personal_store(self.fabric, self.log_dir if spill else None, self.personal_memory_mb),
        )

    def launch(self) -> None:
        """``fabric.launch()``: start the other processes of this node, or join those a cluster's launcher
        started (torchrun, SLURM), which must agree with ``trainer.devices`` and ``trainer.num_nodes``."""
        launch(self.fabric)

    # --------------------------------------------------------------------------------- fit
    def fit(self, model: LoRACLIPClassifier, datamodule: FederatedDataModule, ckpt_path: str | None = None) -> dict:
        """Run every round and return the final results (also written to ``results.json``).

        Args:
            ckpt_path: Resume from this checkpoint, or ``last`` for the newest one of ``root_dir/name``.

        Raises:
            RunFailed: after the results are written, when most rounds were skipped (too few healthy
                updates): the run did not train as configured.
        """
        fabric = self.fabric
        ranks, per_round, global_rank = self._check(model, datamodule)
        self.launch()
        remove_stale_temporaries(fabric, self.root_dir, self.name)
        build(fabric, self.seed, model, datamodule, "fit", [*ranks, global_rank])
        fabric.print(datamodule.class_summary(with_train=self.privacy is None))
        self._setup_server(model, ranks, per_round, global_rank)
        self.output = RunOutput(fabric.logger, is_writer=fabric.is_global_zero)
        self._fingerprint = self._make_fingerprint(model, datamodule, ranks, global_rank)
        if self.privacy is not None:
            # one noise for every process: rank 0's secret key (drawn at this start, never saved)
            self.privacy.noise_key = fabric.broadcast(self.privacy.noise_key, src=0)
            say_what_dp_changes(self.privacy, self.update_norm_factor, fabric.print)
        start_round = 0
        if ckpt_path is not None:
            start_round = self._restore(model, ckpt_path)
        self.output.write_run_files(self.config_yaml, datamodule.missing_masks())
        fabric.call("on_fit_start", trainer=self)

        start = time.perf_counter()
        self._bar = RoundBar(self.rounds, start_round, self.progress and fabric.is_global_zero)
        self._snapshot = self._state(model, start_round) if start_round else None
        # Ctrl-C and SIGTERM set a flag that the loop checks between optimizer steps; a second one stops at once
        with stop_at_a_safe_point(self):
            try:
                for round_ in range(start_round, self.rounds):
                    if self.privacy is not None and (spent := self.privacy.budget_problem()) is not None:
                        fabric.print(f"stopping before round {round_}: {spent}")
                        if not any(k.startswith("global/") for k in self.history[-1]):
                            self.history[-1].update(self.evaluate(model, datamodule))  # the model it stops with
                        break
                    metrics = self._run_round(model, datamodule, round_)
                    if (round_ + 1) % self.eval_every == 0 or round_ + 1 == self.rounds:
                        metrics.update(self.evaluate(model, datamodule))
                    fabric.call("on_round_end", trainer=self, round=round_, metrics=metrics)
                    if self.server.released_only:  # under DP: what the accountant covers, or public figures
                        metrics = released_only(metrics)
                    self.output.log_metrics(metrics, round_)
                    self._bar.round_done(round_, metrics)
                    self.history.append({"round": round_, **metrics})
                    self._snapshot = self._state(model, round_ + 1)
                    if round_ + 1 == self.rounds or (
                        self.checkpoint_every and (round_ + 1) % self.checkpoint_every == 0
                    ):
                        self.save_checkpoint(self._snapshot)
                    # older snapshots are gone: files of replaced states that no kept checkpoint names can go
                    kept = (self.log_dir / "checkpoints").glob("round-*.ckpt")
                    self.server.personal.collect(str(p) for p in kept)
                    self._bar.update()
            except (KeyboardInterrupt, Interrupted):
                self._bar.close()
                stop_with_checkpoint(self)
        self._bar.close()
        datamodule.teardown("fit")  # stops the DataLoader workers (as lightning.Trainer does at its end)
        problem = run_problem([bool(h.get("round/skipped")) for h in self.history], self.rounds)
        results = run_results(
            self.history,
            aggregator=strategy_name(self.aggregator),
            callbacks=[strategy_name(c) for c in self.callbacks],
            rounds=self.rounds,
            num_clients=datamodule.num_clients,
            ranks=ranks,
            conditions=datamodule.conditions(),
            seconds=time.perf_counter() - start,
            log_dir=self.log_dir,
            problem=problem,
        )
        if self.privacy is not None:
            results["privacy"] = self.privacy.summary()
        fabric.call("on_fit_end", trainer=self, results=results)
        if self.server.released_only:
            results.pop("edits", None)  # the clients' edit decisions are figures about their data
        self.output.write_results(results)
        if (warning := majority_warning(results, datamodule.majority())) is not None:
            fabric.print(warning)
        if self.history:  # without the CLI's YAML: the fingerprint's config, which leaves out the run length
            config = self.config_yaml or {**self._fingerprint["config"], "trainer.rounds": self.rounds}
            self.output.log_hparams(config, self.history[-1])
        self.output.finalize("failed" if problem else "success")
        if problem is not None:
            raise RunFailed(problem, results)
        return results

    def export(
        self,
        model: LoRACLIPClassifier,
        datamodule: FederatedDataModule,
        ckpt_path: str,
        out: str,
        overwrite: bool = False,
        merged: bool = False,
    ) -> Path:
        """Write the global adapter and every client's personalized adapter of a checkpoint in peft's format.

        Args:
            ckpt_path: The checkpoint to export, or ``last`` for the newest one of ``root_dir/name``.
            out: Output folder: ``global/`` and ``clients/client_<k>/``, each with ``adapter_config.json``,
                ``adapter_model.safetensors``, ``head.safetensors`` and ``fedilora.json``. It must be empty or new.
            overwrite: Replace the files an earlier export wrote to ``out`` (listed in its
                ``fedilora-export.json``); every other file there is kept.
            merged: Also write, in each folder, open_clip's weights with the adapter merged in
                (``open_clip_config.json``, ``open_clip_model.safetensors``): plain open_clip loads them with
                ``open_clip.create_model("local-dir:<folder>")``; ``head.safetensors`` is the classifier head.
        """
        from fedilora.export import check_export_target, export_adapters

        check_export_target(Path(out), overwrite)  # before the minutes a large model takes to build
        ranks, per_round, global_rank = self._check(model, datamodule)
        build(self.fabric, self.seed, model, None, ranks=[*ranks, global_rank], on_device=False, verbose=False)
        self._setup_server(model, ranks, per_round, global_rank, spill=False)
        self._fingerprint = self._make_fingerprint(model, datamodule, ranks, global_rank)
        completed = self._restore(model, ckpt_path)
        root = Path(out)
        written = export_adapters(model, root, (global_rank, self.global_lora, self.global_extra), self.personal,
                                  completed_rounds=completed, backbone_seed=self.seed, overwrite=overwrite,
                                  classes=getattr(datamodule.dataset, "classes", None),
                                  image_size=getattr(datamodule.dataset, "image_size", None),
                                  base_weights_changed=self.server.merges_into_base, merged=merged)  # fmt: skip
        self.fabric.print(f"exported {len(written)} adapters (global + {len(written) - 1} clients) to {root}")
        return root

    def validate(
        self,
        model: LoRACLIPClassifier,
        datamodule: FederatedDataModule,
        ckpt_path: str | None = None,
        adapter: str | None = None,
        conditions: list[Condition] | None = None,
        out: str | None = None,
    ) -> dict:
        """Evaluate a checkpoint or an exported adapter on the data, without training (see ``fedilora.validate``).

        Args:
            ckpt_path: The checkpoint to evaluate, or ``last`` for the newest one of ``root_dir/name``.
            adapter: Instead of a checkpoint: a folder written by ``fedilora export`` (its root, ``global/``
                or ``clients/client_<k>/``).
            conditions: Modality conditions of the global test set: ``complete``, ``image_only``,
                ``text_only``, ``missing`` (the masks of ``data.test_missing_rate``). Default: as ``fit``.
            out: Also write the results as JSON to this file.
        """
        from fedilora.validate import validate

        return validate(model, datamodule, self.fabric, self.aggregator, seed=self.seed, ckpt_path=ckpt_path,
                        adapter=adapter, conditions=conditions, out=out, callbacks=self.callbacks,
                        runs=(self.root_dir, self.name))  # fmt: skip

    # ------------------------------------------------------------------------ checkpoints
    def _make_fingerprint(self, model, datamodule, ranks: list[int], global_rank: int) -> dict:
        """What a checkpoint must agree on with the config resuming from it (see ``fedilora.checkpoint``)."""
        return make_fingerprint(self.init_args, model, datamodule, self.config_yaml, self.global_lora,
                                self.global_extra)  # fmt: skip

    def _state(self, model: LoRACLIPClassifier, completed_rounds: int) -> dict:
        return run_state(self, model, completed_rounds)

    def save_checkpoint(self, state: dict) -> Path:
        """Write ``state`` (a ``_state``) as the checkpoint of its round (see ``fedilora.run_state``)."""
        return save_run_state(self, state)

    def _restore(self, model: LoRACLIPClassifier, ckpt_path: str) -> int:
        return restore_run_state(self, model, ckpt_path)

    # ------------------------------------------------------------------------------ one round
    def _call(self, hook: str, **kwargs: Any) -> None:
        self.fabric.call(hook, trainer=self, **kwargs)

    def _run_round(self, model: LoRACLIPClassifier, datamodule: FederatedDataModule, round_: int) -> dict[str, float]:
        self._deadline = None if self.round_timeout_s is None else time.monotonic() + self.round_timeout_s
        pool = FabricPool(self.fabric, partial(self.train_client, model, datamodule, round_), self._deadline,
                          self.round_timeout_s)  # fmt: skip
        return self._round(model, pool, round_)

    def _round(self, model: LoRACLIPClassifier, pool: ClientPool, round_: int) -> dict[str, float]:
        """``run_round`` with this trainer's hooks, printing, minimum of clients and base weights."""
        return run_round(self.server, pool, round_, self._call, min_clients=self.min_clients_per_round,
                         say=self.fabric.print, merge_into_base=model.merge_into_base)  # fmt: skip

    def train_client(
        self,
        model: LoRACLIPClassifier,
        datamodule: FederatedDataModule,
        round_: int,
        client: int,
        rank: int,
        lora: State,
        extra: State,
    ) -> ClientUpdate:
        """``fit_client`` of one client (or ``POOLED``) with this process's data, Fabric, hooks and progress bar."""
        if client == POOLED:
            loader = lambda generator: datamodule.pooled_dataloader("train", generator)  # noqa: E731
            num_samples = sum(datamodule.num_train_samples(k) for k in range(datamodule.num_clients))
        else:
            loader = lambda generator: datamodule.client_dataloader(client, "train", generator)  # noqa: E731
            num_samples = datamodule.num_train_samples(client)
        return fit_client(
            model,
            self.fabric,
            loader,
            num_samples,
            round=round_,
            client_id=client,
            rank=rank,
            lora=lora,
            extra=extra,
            seed=self.seed,
            local_epochs=self.local_epochs,
            max_local_steps=self.max_local_steps,
            call=self._call,
            should_stop=lambda: self._interrupted,
            on_step=lambda step, total, loss: self._show(round_, client, rank, step, total, loss),
            deadline=self._deadline,
        )

    def evaluate(self, model: LoRACLIPClassifier, datamodule: FederatedDataModule) -> dict[str, float]:
        """The global model on the global test set, per modality condition, and every client's
        personalized model on its own test split (see ``FederatedServer.global_models``)."""
        metrics = evaluate_global(model, self.fabric, datamodule, self.server.global_models())
        if self.server.released_only:  # personalized models and the clients' test splits are theirs
            return metrics
        personal = self.server.personalized_models(datamodule.num_clients)
        metrics.update(evaluate_personalized(model, self.fabric, datamodule, personal))
        return metrics

    # ----------------------------------------------------------------------------- output
    def _show(self, round_: int, client: int, rank: int, step: int, total: int, loss: Tensor) -> None:
        if self._bar is not None:
            self._bar.show(round_, client, rank, step, total, None if self.server.released_only else loss)  # DP

    def log_histogram(self, tag: str, values: Tensor, step: int) -> None:
        """``step``: the ``round`` (from 0) a hook received; TensorBoard shows it as round ``step + 1``."""
        if not self.server.released_only:  # callbacks' figures come from single clients
            self.output.log_histogram(tag, values, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        if not self.server.released_only:
            self.output.log_text(tag, text, step)

