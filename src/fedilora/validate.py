"""``fedilora validate``: evaluate a trained federation without training.

The models come from a checkpoint (``--ckpt_path``, ``last`` included) or from the folders that
``fedilora export`` writes (``--adapter``); the data is any data group, partitioned as in ``fit``.
The evaluation is ``fit``'s (``fedilora.evaluation``): the global model on the global test set under
each chosen modality condition, and every client's personalized model on its own test split, printed
as the same table as ``fedilora fit``. Functions over a model, data, a Fabric and the run's method: no
trainer is needed (``FederatedTrainer.validate`` calls :func:`validate`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from fedilora.algorithms.base import method_name
from fedilora.backbone import adapter_name
from fedilora.checkpoint import check_finite, find_last, load_checkpoint
from fedilora.data.datamodule import CONDITIONS, Condition, FederatedDataModule
from fedilora.errors import ConfigError
from fedilora.evaluation import evaluate_global, evaluate_personalized
from fedilora.lora_ops import PEFT_PREFIX as _PEFT_PREFIX
from fedilora.lora_ops import rank_axis, to_device
from fedilora.model import LoRACLIPClassifier, State
from fedilora.personal import PersonalStore
from fedilora.runtime import build, launch

if TYPE_CHECKING:
    from lightning.fabric import Fabric

    from fedilora.algorithms.base import Aggregator

ALL_CONDITIONS: tuple[Condition, ...] = (*CONDITIONS, "missing")


@dataclass
class Models:
    """What is evaluated: the global state and the clients' personalized states, ``(rank, lora, extra)``."""

    source: str
    global_rank: int
    global_state: tuple[State, State] | None
    personal: dict[int, tuple[int, State, State]]
    completed_rounds: int
    client_ranks: list[int]
    aggregator: str | None = None  # the run's strategy and model, where the source records them (checkpoints)
    model_name: str | None = None
    base_weights: dict[str, Tensor] = field(default_factory=dict)
    head_out: int | None = None  # output width of the trained head (classes, or 1 for binary)
    metas: list[tuple[Path, dict]] = field(default_factory=list)  # each exported folder's fedilora.json

    @property
    def ranks(self) -> list[int]:
        return sorted({self.global_rank, *(rank for rank, _, _ in self.personal.values())})


# ------------------------------------------------------------------------------------- sources
def from_checkpoint(fabric: Fabric, ckpt_path: str, runs: tuple[str, str] = ("runs", "fedilora")) -> Models:
    """A checkpoint, or with ``last`` the newest of ``runs`` (``(root_dir, name)``)."""
    path = find_last(*runs) if ckpt_path == "last" else Path(ckpt_path)
    state = load_checkpoint(fabric, path)
    config = state["fingerprint"]["config"]  # the run's resolved config, flat: {"trainer.seed": 0, ...}
    store = PersonalStore()
    store.load(state["personal"], path.parent)  # a spilled state's file is checked, then read here
    personal = dict(store.items())
    for client, (_, lora, extra) in personal.items():  # states spilled to files (load_checkpoint checked the rest)
        spilled = state["personal"][str(client)].get("file")
        if spilled is not None:
            check_finite({**lora, **extra}, f"--ckpt_path: {path.parent / spilled}", f"personal[{client}]")
    global_rank = max(v.shape[0] for k, v in state["global_lora"].items() if rank_axis(k) == 0)
    ranks = config.get("trainer.ranks", global_rank)
    aggregator = config.get("trainer.aggregator.class_path", config.get("trainer.aggregator"))
    models = Models(
        source=str(path),
        global_rank=global_rank,
        global_state=(state["global_lora"], state["global_extra"]),
        personal=personal,
        completed_rounds=state["completed_rounds"],
        client_ranks=list(ranks) if isinstance(ranks, list) else [ranks] * int(config.get("data.num_clients", 1)),
        aggregator=str(aggregator).rsplit(".", 1)[-1] if aggregator else None,
        model_name=config.get("model.model_name"),
        base_weights=state["base_weights"],
        head_out=_head_out(state["global_extra"]),
    )
    return models


def from_adapter(adapter: str) -> Models:
    """An exported adapter folder (``global/`` or ``clients/client_<k>/``), or the export root holding both."""
    root = Path(adapter).expanduser()
    if (root / "global" / "adapter_config.json").is_file():
        folders = [root / "global", *sorted((root / "clients").glob("client_*"))]
    elif (root / "adapter_config.json").is_file():
        folders = [root]
    else:
        raise ConfigError(
            f"--adapter: {root} is not an exported adapter (no adapter_config.json, no global/adapter_config.json); "
            "give a folder written by `fedilora export`"
        )
    global_state, personal, metas = None, {}, []
    for folder in folders:
        meta, rank, lora, extra = _read_adapter(folder)
        metas.append((folder, meta))
        if meta.get("client") is None:
            global_state, global_rank = (lora, extra), rank
        else:
            personal[int(meta["client"])] = (rank, lora, extra)
    if global_state is None:  # a single client's adapter: it is also the model on the global test set
        (global_rank, *only), = personal.values()  # fmt: skip
        global_state = tuple(only)  # type: ignore[assignment]
    return Models(
        source=str(root),
        global_rank=global_rank,
        global_state=global_state,  # type: ignore[arg-type]
        personal=personal,
        completed_rounds=int(metas[0][1].get("completed_rounds") or 0),
        client_ranks=[personal[c][0] for c in sorted(personal)] or [global_rank],
        head_out=_head_out(global_state[1]),  # type: ignore[index]
        metas=metas,
    )


def _read_adapter(folder: Path) -> tuple[dict, int, State, State]:
    """One exported folder, its files checked against their digests and its tensors for NaN and infinity."""
    from fedilora.export import read_tensors, verify_export

    meta = verify_export(folder, "--adapter")
    lora = read_tensors(folder / "adapter_model.safetensors", "--adapter")
    extra = read_tensors(folder / "head.safetensors", "--adapter")
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        rank = int(config["r"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        problem = f"{type(err).__name__}: {err}"
        raise ConfigError(f"--adapter: {folder / 'adapter_config.json'} cannot be read ({problem})") from None
    meta["lora_alpha"] = config.get("lora_alpha")
    return meta, rank, {k.removeprefix(_PEFT_PREFIX): v for k, v in lora.items()}, extra


def _head_out(extra: Mapping[str, Tensor]) -> int | None:
    """Output width of the head's last linear layer (``head.<i>.weight`` with the largest i)."""
    layers = [(int(k.split(".")[1]), v) for k, v in extra.items() if k.startswith("head.") and k.endswith(".weight")]
    return int(max(layers, key=lambda item: item[0])[1].shape[0]) if layers else None


# ------------------------------------------------------------------------------------- checks
def _check(aggregator: Aggregator, model: LoRACLIPClassifier, datamodule: FederatedDataModule, models: Models):
    where = f"--ckpt_path {models.source}" if models.aggregator else f"--adapter {models.source}"
    if model.num_classes != datamodule.num_classes or model.task != datamodule.task:
        raise ConfigError(
            f"model.num_classes/task ({model.num_classes}, {model.task}) do not match the data "
            f"({datamodule.num_classes}, {datamodule.task})"
        )
    expected = 1 if model.task == "binary" else model.num_classes
    if models.head_out is not None and models.head_out != expected:
        trained = "2 classes (binary)" if models.head_out == 1 else f"{models.head_out} outputs"
        raise ConfigError(
            f"{where}: the model was trained for {trained}; the data has {datamodule.num_classes} classes "
            f"({datamodule.task}): validate on data with the classes the model was trained on"
        )
    if models.model_name is not None and models.model_name != model.model_name:
        raise ConfigError(
            f"{where}: trained with model.model_name {models.model_name!r}, this config has {model.model_name!r}"
        )
    strategy = method_name(aggregator)
    if models.aggregator is not None and models.aggregator != strategy:
        raise ConfigError(
            f"{where}: written by a {models.aggregator} run, this config's trainer.aggregator is {strategy}; "
            "use the run's config (its config.yaml)"
        )
    for folder, meta in models.metas:
        for option in ("model_name", "pretrained", "num_classes", "task", "missing_strategy", "head_hidden",
                       "lora_scale"):  # fmt: skip
            if option in meta and meta[option] != getattr(model, option):
                if option in ("num_classes", "task"):
                    raise ConfigError(
                        f"--adapter {folder}: the model was trained for {meta['num_classes']} classes "
                        f"({meta['task']}); the data has {datamodule.num_classes} classes ({datamodule.task}): "
                        "validate on data with the classes the model was trained on"
                    )
                raise ConfigError(
                    f"--adapter {folder}: exported with model.{option} {meta[option]!r}, this config has "
                    f"{getattr(model, option)!r}"
                )
    if models.aggregator is None and aggregator.merges_into_base:
        raise ConfigError(
            f"--adapter {models.source}: {strategy} merges its adapter into the frozen base weights every round and "
            "an export does not hold them; validate the run's checkpoint (--ckpt_path) instead"
        )


def _load_into(model: LoRACLIPClassifier, models: Models, where: str) -> None:
    """Check that every state fits the model, which has an adapter per rank (one clear error if not)."""
    model.load_base_weights(models.base_weights)
    states = ([(models.global_rank, *models.global_state)] if models.global_state else []) + list(
        models.personal.values()
    )
    for rank, lora, extra in states:
        own_lora, own_extra = model.lora_state(rank), model.extra_state()
        for kind, own, theirs in (("LoRA", own_lora, lora), ("head", own_extra, extra)):
            if own.keys() != theirs.keys() or any(own[k].shape != theirs[k].shape for k in own):
                differ = sorted(own.keys() ^ theirs.keys()) or [k for k in own if own[k].shape != theirs[k].shape]
                raise ConfigError(
                    f"{where}: its rank-{rank} {kind} tensors do not fit this model (e.g. {differ[0]}); the model "
                    "group (model_name, lora_targets, lora_towers, missing_strategy, head_hidden) must be the run's"
                )
    for folder, meta in models.metas:
        alpha = model.backbone.peft_config[adapter_name(meta["rank"])].lora_alpha
        if meta.get("lora_alpha") is not None and float(meta["lora_alpha"]) != float(alpha):
            raise ConfigError(
                f"--adapter {folder}: exported with lora_alpha {meta['lora_alpha']}, this config gives {alpha} at "
                f"rank {meta['rank']} (model.lora_scale / model.lora_alpha must be the run's)"
            )


# ----------------------------------------------------------------------------------- evaluate
class _Conditions:
    """The datamodule, reporting only the chosen modality conditions to the trainer's evaluation."""

    def __init__(self, datamodule: FederatedDataModule, conditions: Sequence[Condition]) -> None:
        self._datamodule, self._conditions = datamodule, tuple(conditions)

    def conditions(self) -> tuple[Condition, ...]:
        return self._conditions

    def __getattr__(self, name: str) -> Any:
        return getattr(self._datamodule, name)


def validate(
    model: LoRACLIPClassifier,
    datamodule: FederatedDataModule,
    fabric: Fabric,
    aggregator: Aggregator,
    seed: int = 0,
    ckpt_path: str | None = None,
    adapter: str | None = None,
    conditions: Sequence[Condition] | None = None,
    out: str | None = None,
    callbacks: Sequence[object] = (),
    runs: tuple[str, str] = ("runs", "fedilora"),
) -> dict:
    """Evaluate a checkpoint or an exported adapter on ``datamodule``; print and return the results.

    ``aggregator`` and ``callbacks``: the config's method (checked against the checkpoint's) and
    callbacks (named in the results); ``seed``: the run's (the same random backbone where ``pretrained``
    is null); ``runs``: ``(root_dir, name)``, where ``--ckpt_path last`` looks."""
    from fedilora.output import format_results

    if (ckpt_path is None) == (adapter is None):
        raise ConfigError("validate: give exactly one of --ckpt_path (a checkpoint, or last) and --adapter (an export)")
    chosen = tuple(conditions) if conditions else datamodule.conditions()
    unknown = [c for c in chosen if c not in ALL_CONDITIONS]
    if unknown:
        raise ConfigError(f"--conditions: unknown {unknown[0]!r}; allowed: {', '.join(ALL_CONDITIONS)}")
    if "missing" in chosen and datamodule.test_missing_rate == 0:
        raise ConfigError("--conditions missing: set --data.test_missing_rate above 0 (the rate of that condition)")
    models = from_checkpoint(fabric, ckpt_path, runs) if ckpt_path is not None else from_adapter(adapter)
    _check(aggregator, model, datamodule, models)
    launch(fabric)
    build(fabric, seed, model, datamodule, "validate", models.ranks, on_device=False)
    _load_into(model, models, f"--ckpt_path {models.source}" if ckpt_path is not None else f"--adapter {adapter}")
    model.to(fabric.device)
    device = fabric.device
    to = lambda state: to_device(state, device)  # noqa: E731
    # personalized models only where this data gives the client a test split
    personal = {
        c: (rank, to(lora), to(extra))
        for c, (rank, lora, extra) in models.personal.items()
        if c < datamodule.num_clients
    }
    shares = aggregator.communicates or aggregator.pooled
    if models.global_state is not None and shares:
        global_models = [(models.global_rank, *(to(s) for s in models.global_state))]
    else:  # ``Local`` shares nothing: as in fit, its global figures are the mean over the clients' models
        global_models = list(personal.values())
    started = time.perf_counter()
    metrics = evaluate_global(model, fabric, _Conditions(datamodule, chosen), global_models)
    metrics.update(evaluate_personalized(model, fabric, datamodule, personal))
    if not any(k.startswith("global/") for k in metrics):
        raise ConfigError(
            f"{models.source}: no global model to evaluate ({method_name(aggregator)} keeps only the "
            "clients' models; give the export root with its clients/, or the checkpoint)"
        )
    results = {
        "aggregator": method_name(aggregator),
        "callbacks": [method_name(c) for c in callbacks],
        "rounds": models.completed_rounds,
        "num_clients": datamodule.num_clients,
        "ranks": models.client_ranks,
        "global": {c: {k.split("/")[2]: v for k, v in metrics.items() if k.startswith(f"global/{c}/")} for c in chosen},
        "personalized": {k.split("/")[2]: v for k, v in metrics.items() if k.startswith("personalized/mean/")},
        "personalized_clients": int(metrics.get("personalized/num_clients", 0)),
        "wall_time_s": time.perf_counter() - started,
        "log_dir": models.source,
        "source": models.source,
        "metrics": metrics,
    }
    if fabric.is_global_zero:
        table = format_results(results).rsplit("\n", 1)[0]  # its last line names the run's logs
        fabric.print(f"{table}\nevaluated: {models.source} ({models.completed_rounds} rounds trained)")
        if out is not None:
            try:
                Path(out).parent.mkdir(parents=True, exist_ok=True)
                Path(out).write_text(json.dumps(results, indent=2))
            except OSError as err:
                raise ConfigError(f"--out: cannot write {out} ({err.strerror})") from None
    return results
