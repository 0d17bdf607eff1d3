"""The LightningCLI of ``fedilora fit``, ``export`` and ``validate``: the federated trainer as its trainer."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import get_loader, set_loader
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from fedilora import __version__, algorithms
from fedilora.algorithms.base import Aggregator
from fedilora.callbacks import FederatedCallback
from fedilora.checkpoint import find_last, newest_checkpoint
from fedilora.cli.commands import DESCRIPTION, EXTERNAL, LIGHTNING
from fedilora.data.datamodule import FederatedDataModule
from fedilora.errors import ConfigError
from fedilora.model import LoRACLIPClassifier
from fedilora.trainer import FederatedTrainer

# every method and callback of fedilora.algorithms, so that a config can name it by its class name alone
METHODS = algorithms.methods()


def _subclass_names(base: type) -> list[str]:
    found, queue = [], list(base.__subclasses__())
    while queue:
        cls = queue.pop(0)
        if not cls.__name__.startswith("LazyInstance_"):  # jsonargparse's lazy defaults
            found.append(cls.__name__)
        queue.extend(cls.__subclasses__())
    return found


_RUN_FOLDER = re.compile(r"version_\d+")


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



def _versions() -> str:
    parts = []
    for package in ("lightning", "torch", "open_clip_torch", "peft"):
        with contextlib.suppress(PackageNotFoundError):
            parts.append(f"{package} {version(package)}")
    return f"fedilora {__version__} ({', '.join(parts)})"


class _Version(argparse.Action):
    """``--version``: fedilora's and its main components' versions, one line (argparse's would wrap it)."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        print(_versions())
        parser.exit()


def _option_names(parser: Any) -> list[str]:
    """Every long option of ``parser`` and of its subcommands' parsers."""
    names = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    subcommands = getattr(parser, "_subcommands_action", None)
    for sub in (subcommands._name_parser_map.values() if subcommands else []):
        names += _option_names(sub)
    return names


def _init_parameters(class_path: str) -> list[str]:
    import inspect

    try:
        module, name = class_path.rsplit(".", 1)
        return list(inspect.signature(getattr(importlib.import_module(module), name)).parameters)
    except (ValueError, ImportError, AttributeError, TypeError):
        return []


def _suggest(given: str, known: list[str]) -> str:
    close = difflib.get_close_matches(given, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _unknown_key(message: str, parser: Any) -> str | None:
    """One line for an unknown option, subcommand or config key, with the closest known name; else None."""
    prog = parser.prog.replace(" [options]", "")
    if getattr(parser, "_subcommands_action", None) is not None:  # a config file's key, before the subcommand
        prog += " <subcommand>"
    hint = f"; every option is listed by: {prog} --help"
    if match := re.match(r"unrecognized arguments: (\S+)", message):
        given = match.group(1).split("=", 1)[0]
        return f"unknown option {given}{_suggest(given, _option_names(parser))}{hint}"
    if match := re.match(r"(Group|Subcommand) '([\w.]+)' does not accept option '([\w.]+)'", message):
        kind, where, option = match.groups()
        given = f"{where}.{option}" if kind == "Group" else option
        subcommands = getattr(parser, "_subcommands_action", None)
        if kind == "Subcommand" and subcommands is not None and where in subcommands._name_parser_map:
            parser = subcommands._name_parser_map[where]
            hint = f"; every option is listed by: fedilora {where} --help"
        known = [name.removeprefix("--") for name in _option_names(parser)]
        return f"unknown key {given}{_suggest(given, known)}{hint}"
    nested = r"Parser key \"([\w.]+)\":\s+Problem with given class_path '([\w.]+)':\s+Option '(\w+)' is not accepted"
    if match := re.search(nested, message):
        key, class_path, given = match.groups()
        known = _init_parameters(class_path)
        close = difflib.get_close_matches(given, known, n=1, cutoff=0.6)
        suggestion = f" (did you mean {key}.init_args.{close[0]}?)" if close else ""
        return f"unknown key {key}.init_args.{given}: {class_path} has no parameter {given!r}{suggestion}"
    if match := re.match(r"argument subcommand: invalid choice: '([^']*)'", message):
        known = [*parser._subcommands_action._name_parser_map]
        return f"unknown subcommand {match.group(1)!r}{_suggest(match.group(1), known)}; choose from {', '.join(known)}"
    return None


class _Parser(LightningArgumentParser):
    """YAML syntax errors in one line, and what is allowed for a strategy that does not resolve."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_mode", _YAML_MODE)
        kwargs.setdefault("description", DESCRIPTION)  # subcommands pass their own
        kwargs.setdefault("allow_abbrev", False)  # `--trainer.round 3` is an error, never `rounds`
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        if self.exit_on_error and "invalid YAML: " in message:
            # one line, not 50 lines of usage: the message already names the file, line and column
            line = next(line for line in message.splitlines() if "invalid YAML: " in line)
            raise ConfigError(line.strip().removeprefix("- ").removeprefix("Problems parsing config: "))
        if self.exit_on_error:
            unknown = _unknown_key(message, getattr(ex, "subcommand_parser", None) or self)
            if unknown is not None:  # one line, not the usage of every option
                raise ConfigError(unknown)
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
        return {name: {"model", "datamodule"} for name in LIGHTNING}

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]):
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        self.parser.add_argument("--version", action=_Version, nargs=0, default=argparse.SUPPRESS, help="versions")
        if add_subcommands:  # listed in --help; main() runs them before this class is involved
            for name, description in EXTERNAL.items():
                external = _Parser(description=description)
                external.add_argument("args", nargs="*", help=f"see: fedilora {name} --help")
                self.parser._subcommands_action.add_subcommand(name, external, help=description)

    def before_instantiate_classes(self) -> None:
        if self.config.get("subcommand") in EXTERNAL:
            raise ConfigError(f"{self.config.subcommand}: run it with fedilora.cli.main, not FediLoRACLI")

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
        self._resolve_last("fit")

    def before_export(self) -> None:  # the checkpoint's fingerprint is checked against the resolved config
        self.trainer.config_yaml = self._parser("export").dump(self.config["export"], skip_none=False)
        self._announce(self._resolve_last("export"))

    def before_validate(self) -> None:
        self._announce(self._resolve_last("validate"))

    def _resolve_last(self, subcommand: str) -> str | None:
        """``--ckpt_path last`` with a run's own ``config.yaml`` (``<root>/<name>/version_N/config.yaml``)
        is that run's newest checkpoint, not the newest of the most recent version of its name."""
        config = self.config_init[subcommand]
        if config.get("ckpt_path") != "last":
            return config.get("ckpt_path")
        for given in reversed(config.get("config") or []):
            folder = Path(str(given)).parent
            if _RUN_FOLDER.fullmatch(folder.name) and (folder / "checkpoints").is_dir():
                newest = newest_checkpoint(folder)
                if newest is None:
                    raise ConfigError(f"--ckpt_path last: no checkpoint in {folder / 'checkpoints'} (--config {given})")
                config["ckpt_path"] = str(newest)
                return config["ckpt_path"]
        config["ckpt_path"] = str(find_last(self.trainer.root_dir, self.trainer.name))
        return config["ckpt_path"]

    def _announce(self, ckpt_path: str | None) -> None:
        if ckpt_path is not None:  # named before the (long) evaluation or export starts
            self.trainer.fabric.print(f"checkpoint: {ckpt_path}")
