"""What a run writes: TensorBoard logs, the resolved config and missing-modality masks next to them,
checkpoints, ``results.json`` and the results table. Only the writing process (rank 0) writes files;
checkpoints are written through Fabric by every process together."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger
from safetensors.torch import save_file
from torch import Tensor

from fedilora.checkpoint import checkpoint_path, prune, save_checkpoint
from fedilora.errors import ConfigError


class RunOutput:
    """The run folder ``root_dir/name/version_N`` of one TensorBoard logger.

    TensorBoard's step is the round's number, 1 for the first round (``round_index + 1``), as in the
    progress bar, the checkpoint names (``round-0001.ckpt``) and ``fedilora compare``'s tables; the
    engine's round index (``history``'s ``round``, the callbacks' ``round``) counts from 0.

    Args:
        logger: The run's TensorBoard logger (its ``log_dir`` is the run folder).
        is_writer: Whether this process writes files and prints (rank 0 of a multi-process run).
    """

    def __init__(self, logger: TensorBoardLogger, is_writer: bool = True) -> None:
        self.logger, self.is_writer = logger, is_writer

    @property
    def log_dir(self) -> Path:
        return Path(self.logger.log_dir)

    def write_run_files(self, config_yaml: str | None, masks: Mapping[str, Tensor]) -> None:
        """The resolved config (``config.yaml``) and the clients' missing-modality masks."""
        if not self.is_writer:
            return
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            if config_yaml is not None:
                (self.log_dir / "config.yaml").write_text(config_yaml)
            save_file({k: v.contiguous() for k, v in masks.items()}, str(self.log_dir / "missing_masks.safetensors"))
        except OSError as err:
            raise ConfigError(
                f"trainer.root_dir: cannot write the run directory {self.log_dir} ({err.strerror})"
            ) from None

    def log_metrics(self, metrics: Mapping[str, float], round_index: int) -> None:
        self.logger.log_metrics(dict(metrics), step=round_index + 1)  # the logger writes on rank 0 only

    def log_histogram(self, tag: str, values: Tensor, round_index: int) -> None:
        if self.is_writer:
            self.logger.experiment.add_histogram(tag, values, round_index + 1)

    def log_text(self, tag: str, text: str, round_index: int) -> None:
        if self.is_writer:
            self.logger.experiment.add_text(tag, text, round_index + 1)

    def log_hparams(self, config: str | Mapping | None, last: Mapping[str, float]) -> None:
        """The run's configuration (the resolved YAML, or a flat ``{"trainer.seed": 0}``) and its final
        evaluation, ``last`` (the last ``history`` entry): one row of TensorBoard's HParams view per run,
        named ``trainer/seed`` etc. either way."""
        if isinstance(config, str):
            params = yaml.safe_load(config) or {}  # nested: the logger joins the keys with "/"
        else:
            params = {str(k).replace(".", "/"): v for k, v in (config or {}).items()}
        final = {k: v for k, v in last.items() if k.startswith(("global/", "personalized/mean/"))}
        if self.is_writer and params and final:
            self.logger.log_hyperparams(params, metrics=final, step=int(last["round"]) + 1)

    def save_checkpoint(self, fabric: Fabric, state: dict, keep_last: int) -> Path:
        """``checkpoints/round-NNNN.ckpt`` of ``state`` (atomic, every process takes part), keeping the
        ``keep_last`` newest."""
        path = checkpoint_path(self.log_dir, state["completed_rounds"])
        try:
            save_checkpoint(fabric, path, state)
        except OSError as err:
            raise ConfigError(f"trainer.root_dir: cannot write checkpoint {path} ({err.strerror})") from None
        if self.is_writer:
            prune(path.parent, keep_last)
        return path

    def write_results(self, results: Mapping) -> None:
        """``results.json`` and the results table on stdout."""
        if self.is_writer:
            (self.log_dir / "results.json").write_text(json.dumps(results, indent=2))
            print(format_results(results))

    def finalize(self, status: str) -> None:
        self.logger.finalize(status)


def run_results(
    history: Sequence[Mapping[str, float]],
    *,
    aggregator: str,
    callbacks: Sequence[str],
    rounds: int,
    num_clients: int,
    ranks: Sequence[int],
    conditions: Sequence[str],
    seconds: float,
    log_dir: Path,
    problem: str | None = None,
) -> dict:
    """The final results of a run: the last evaluation of ``history`` (one metrics dict per round) and
    what ran; ``problem`` says why the run is not a success (``fedilora.server.run_problem``)."""
    final = history[-1]
    global_ = {
        condition: {k.split("/")[2]: v for k, v in final.items() if k.startswith(f"global/{condition}/")}
        for condition in conditions
    }
    personalized = {k.split("/")[2]: v for k, v in final.items() if k.startswith("personalized/mean/")}
    return {
        "aggregator": aggregator,
        "callbacks": list(callbacks),
        "rounds": rounds,
        "num_clients": num_clients,
        "ranks": list(ranks),
        "global": global_,
        "personalized": personalized,
        "personalized_clients": int(final.get("personalized/num_clients", 0)),
        "skipped_rounds": int(sum(h.get("round/skipped", 0.0) for h in history)),
        "rejected_updates": int(sum(h.get("round/rejected_updates", 0.0) for h in history)),
        "problem": problem,
        "wall_time_s": seconds,
        "log_dir": str(log_dir),
    }


def majority_warning(results: Mapping, majority: tuple[str, float] | None) -> str | None:
    """A warning when the global model's accuracy is not above the majority-class share of the global test
    set under some condition: any model that predicts one class for every sample scores at most that share,
    so this catches a constant predictor as well as a model worse than one. None when all is well."""
    if majority is None:
        return None
    name, share = majority
    low = [f"{_CONDITION_NAMES.get(c, c)} {v['acc']:.4f}" for c, v in results["global"].items()
           if "acc" in v and v["acc"] <= share + 1e-6]  # fmt: skip
    if not low:
        return None
    return (
        f"WARNING: the global model's accuracy ({', '.join(low)}) is not above {share:.4f}, the share of the "
        f"majority class {name!r} in the global test set: it does no better than predicting {name!r} for every "
        "sample (it may predict one class only); train longer, change model.lr or check the labels"
    )


_CONDITION_NAMES = {
    "complete": "complete",
    "image_only": "image only",
    "text_only": "text only",
    "missing": "as configured",
}


def format_results(results: Mapping) -> str:
    """The results table printed at the end of a run (Markdown); a run that is not a success says so."""
    names = list(next(iter(results["global"].values()), {}))
    header = ["evaluation", *names]
    rows = [[f"global, {_CONDITION_NAMES[c]}", *(_cell(v.get(n)) for n in names)] for c, v in results["global"].items()]
    if results["personalized"]:
        label = f"personalized, mean of {results['personalized_clients']} clients"
        rows.append([label, *(_cell(results["personalized"].get(n)) for n in names)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    callbacks = ", ".join(results["callbacks"]) or "none"
    problem = results.get("problem")
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
            *([_privacy_line(results["privacy"])] if results.get("privacy") else []),
            *([f"NOT A SUCCESS: {problem}"] if problem else []),
            f"logs: {results['log_dir']}",
        ]
    )


def _edits_line(edits: Mapping) -> str:
    line = f"edits: {edits['total']} in {edits['rounds_with_edits']} of {edits['rounds_eligible']} rounds"
    return line + (" (warning: model editing never ran)" if edits["total"] == 0 else "")


def _privacy_line(privacy: Mapping) -> str:
    if privacy.get("private") is False:  # seeded noise: anyone with the config can subtract it
        return (
            f"differential privacy: {privacy['noise']}: the noise can be regenerated from the config, so the "
            f"{privacy['rounds']} noised rounds give no privacy (trainer.privacy.reproducible_noise is for tests)"
        )
    return (
        f"differential privacy: epsilon {privacy['epsilon']:.3g} at delta {privacy['delta']:g} after "
        f"{privacy['rounds']} noised rounds (noise multiplier {privacy['noise_multiplier']:.4g}, "
        f"clip norm {privacy['clip_norm']:.4g}, noise {privacy.get('noise', 'secure')})"
    )


def _cell(value: float | None) -> str:
    return f"{math.nan if value is None else value:.4f}"
