"""``fedilora fit --config configs/<x>.yaml``: LightningCLI with the federated trainer as its trainer."""

from __future__ import annotations

import signal
import sys
from typing import Any

import yaml
from jsonargparse import get_loader, set_loader
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from fedilora import baselines  # noqa: F401  (registers the baseline aggregators by short name)
from fedilora.aggregation import Aggregator
from fedilora.callbacks import FederatedCallback
from fedilora.checkpoint import Stopped
from fedilora.coverage import DimensionWiseDelta  # noqa: F401  (registers the aggregator by short name)
from fedilora.data.datamodule import FederatedDataModule
from fedilora.editing import ModelEditing  # noqa: F401  (registers the editing callback by short name)
from fedilora.errors import ConfigError, RunFailed
from fedilora.model import LoRACLIPClassifier
from fedilora.trainer import FederatedTrainer


def _subclass_names(base: type) -> list[str]:
    found, queue = [], list(base.__subclasses__())
    while queue:
        cls = queue.pop(0)
        if not cls.__name__.startswith("LazyInstance_"):  # jsonargparse's lazy defaults
            found.append(cls.__name__)
        queue.extend(cls.__subclasses__())
    return found


class _YAMLSyntaxError(yaml.YAMLError):
    """A config file that is not YAML, with the file, line and column in one line."""


_YAML_MODE = "fedilora_yaml"  # jsonargparse's YAML loader, with the file name in its syntax errors


def _config_file() -> str | None:
    """The config file jsonargparse is reading now (from its stack of nested config files)."""
    try:
        from jsonargparse._util import config_load_stack  # private: the one place that knows the file

        stack = config_load_stack.get()
    except (ImportError, AttributeError, LookupError):
        return None
    return str(stack[-1][0]) if stack else None


def _load_yaml(text: str) -> Any:
    try:
        return get_loader("yaml")(text)
    except yaml.MarkedYAMLError as err:
        mark, where = err.problem_mark or err.context_mark, _config_file() or "a config value"
        if mark is not None:
            where += f", line {mark.line + 1}, column {mark.column + 1}"
        start, context = err.context_mark, ""
        if err.context and start is not None:
            context = f" ({err.context} at line {start.line + 1}, column {start.column + 1})"
        raise _YAMLSyntaxError(f"{where}: invalid YAML: {err.problem}{context}") from None


set_loader(_YAML_MODE, _load_yaml, exceptions=(yaml.YAMLError,))


class _Parser(LightningArgumentParser):
    """YAML syntax errors in one line, and what is allowed for a strategy that does not resolve."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_mode", _YAML_MODE)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        if self.exit_on_error and "invalid YAML: " in message:
            # one line, not 50 lines of usage: the message already names the file, line and column
            line = next(line for line in message.splitlines() if "invalid YAML: " in line)
            raise ConfigError(line.strip().removeprefix("- ").removeprefix("Problems parsing config: "))
        for key, base in (("trainer.aggregator", Aggregator), ("trainer.callbacks", FederatedCallback)):
            if f'Parser key "{key}"' in message:
                message += f"\n  known {key.split('.')[1]}: {', '.join(_subclass_names(base))} (or a class_path)"
        return super().error(message, ex)


class FediLoRACLI(LightningCLI):
    """LightningCLI whose ``trainer`` group is ``FederatedTrainer``; subcommands ``fit``, ``export``, ``validate``."""

    def __init__(self, args: Any = None, run: bool = True) -> None:
        super().__init__(
            model_class=LoRACLIPClassifier,
            datamodule_class=FederatedDataModule,
            trainer_class=FederatedTrainer,
            save_config_callback=None,  # the federated trainer writes the config next to its own logs
            auto_configure_optimizers=False,  # the LightningModule configures its own local optimizer
            parser_class=_Parser,
            parser_kwargs={"prog": "fedilora", "fit": {"default_config_files": []}},
            args=args,
            run=run,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "datamodule"}, "export": {"model", "datamodule"}, "validate": {"model", "datamodule"}}

    def add_default_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """No ``--seed_everything``: ``trainer.seed`` drives every random choice of a run."""

    def _set_seed(self) -> None:
        pass

    def _parse_ckpt_path(self) -> None:
        """Nothing: LightningCLI would ``torch.load`` the checkpoint here, before fedilora verifies it (a
        damaged file ended in a torch traceback), and merge its ``hyper_parameters`` into the config (a
        checkpoint could change the learning rate). The configuration comes from the config only; the
        trainer reads and checks the checkpoint itself."""

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(FederatedTrainer, "trainer", fail_untyped=False, sub_configs=True)
        parser.add_lightning_class_args(LoRACLIPClassifier, "model")
        parser.add_lightning_class_args(FederatedDataModule, "data")

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model_name", "data.tokenizer")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.task", "model.task", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any) -> FederatedTrainer:
        return self._get(self.config_init, "trainer")  # built by the parser, callbacks included

    def before_fit(self) -> None:
        self.trainer.config_yaml = self._parser("fit").dump(self.config["fit"], skip_none=False)

    def before_export(self) -> None:  # the checkpoint's fingerprint is checked against the resolved config
        self.trainer.config_yaml = self._parser("export").dump(self.config["export"], skip_none=False)


def _config_error_in(err: BaseException) -> ConfigError | None:
    """The ConfigError that ``err`` was raised from, following the cause/context chain, or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def main(args: Any = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["compare"]:  # methods side by side: its own options, runs `fit` for each method
        from fedilora.compare import main as compare

        return compare(argv[1:])
    try:
        FediLoRACLI(args=args)
    except ConfigError as err:
        print(f"fedilora: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunFailed as err:
        print(f"fedilora: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except ValueError as err:  # jsonargparse wraps a ConfigError raised in a list item's __init__ (a callback)
        cause = _config_error_in(err)
        if cause is None:
            raise
        print(f"fedilora: error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: the trainer saved the last completed round
        signum = err.signum if isinstance(err, Stopped) else signal.SIGINT
        print(f"fedilora: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        raise SystemExit(128 + signum) from None


if __name__ == "__main__":
    main()
