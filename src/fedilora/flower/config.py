"""The YAML of ``fedilora fit`` read for a Flower run: the same parser, groups and checks.

The server reads the file named by the run config (``config``, ``overrides``) and sends the resolved
YAML to every client with each message, so that a client needs no config file of its own: it builds
the same model and data from it, plus what its node config says (``partition-id``, ``rank``).
"""

from __future__ import annotations

import os
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningArgumentParser

from fedilora.cli import FediLoRACLI
from fedilora.data.datamodule import FederatedDataModule
from fedilora.errors import ConfigError
from fedilora.model import LoRACLIPClassifier
from fedilora.trainer import FederatedTrainer


@dataclass
class Parsed:
    model: LoRACLIPClassifier
    datamodule: FederatedDataModule
    trainer: FederatedTrainer
    yaml: str  # the resolved configuration (what ``fedilora fit`` writes as config.yaml)


def _cli(trainer_class: type[FederatedTrainer]) -> type[FediLoRACLI]:
    class _CLI(FediLoRACLI):
        def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_class_arguments(trainer_class, "trainer", fail_untyped=False, sub_configs=True)
            parser.add_lightning_class_args(LoRACLIPClassifier, "model")
            parser.add_lightning_class_args(FederatedDataModule, "data")

    return _CLI


def set_threads() -> None:
    """Torch threads from ``FEDILORA_FLOWER_THREADS`` (unset or 0: torch's default). CPU kernels may sum
    in another order with another thread count: bit-equal runs need the same count everywhere."""
    threads = int(os.environ.get("FEDILORA_FLOWER_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)


def resolve_path(config: str, bases: list[Path]) -> Path:
    """``config`` as given if absolute, else the first of ``bases / config`` that exists."""
    path = Path(config).expanduser()
    candidates = [path] if path.is_absolute() else [base / path for base in bases]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(f"run config `config`: {config} not found (tried {tried}); give an absolute path")


def parse(
    config: str, overrides: str | list[str] = "", trainer_class: type[FederatedTrainer] = FederatedTrainer
) -> Parsed:
    """Parse a config (a file path or the YAML text itself) and ``fedilora fit`` arguments.

    Raises ConfigError (one line) where ``fedilora fit`` would print a usage error.
    """
    extra = shlex.split(overrides) if isinstance(overrides, str) else list(overrides)
    try:
        with warnings.catch_warnings():  # it would print the process's argv: a Flower app's holds its token
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            cli = _cli(trainer_class)(args=["--config", config, *extra], run=False)
    except SystemExit as exit_:  # jsonargparse reports the problem on stderr and exits
        source = "the config sent by the server" if "\n" in config else config
        raise ConfigError(f"{source} with overrides {extra} does not parse (see the message above)") from exit_
    yaml = cli.parser.dump(cli.config, skip_none=False)
    cli.trainer.config_yaml = yaml
    return Parsed(cli.model, cli.datamodule, cli.trainer, yaml)
