"""``fedilora fit --config configs/<x>.yaml``: LightningCLI with the federated trainer as its trainer."""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from fedilora import baselines  # noqa: F401  (registers the baseline aggregators by short name)
from fedilora.aggregation import Aggregator
from fedilora.callbacks import FederatedCallback
from fedilora.data.datamodule import FederatedDataModule
from fedilora.editing import ModelEditing  # noqa: F401  (registers the editing callback by short name)
from fedilora.errors import ConfigError
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


class _Parser(LightningArgumentParser):
    """Adds what is allowed to jsonargparse's message for a strategy that does not resolve."""

    def error(self, message: str, ex: Exception | None = None):
        for key, base in (("trainer.aggregator", Aggregator), ("trainer.callbacks", FederatedCallback)):
            if f'Parser key "{key}"' in message:
                message += f"\n  known {key.split('.')[1]}: {', '.join(_subclass_names(base))} (or a class_path)"
        return super().error(message, ex)


class FediLoRACLI(LightningCLI):
    """LightningCLI whose ``trainer`` group is ``FederatedTrainer`` and whose only subcommand is ``fit``."""

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
        return {"fit": {"model", "datamodule"}, "export": {"model", "datamodule"}}

    def add_default_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """No ``--seed_everything``: ``trainer.seed`` drives every random choice of a run."""

    def _set_seed(self) -> None:
        pass

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
    except KeyboardInterrupt:
        print("fedilora: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
