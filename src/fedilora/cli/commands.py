"""fedilora's command table (as litgpt's ``__main__``): every ``fedilora`` command, what runs it, its --help line.

Plain data: :mod:`fedilora.cli.lightning` reads it for ``fedilora --help``, and ``fedilora compare`` builds
its runs with that module, so the modules that run the commands with their own parser are named by
:data:`fedilora.cli.RUNNERS` (the entry point), never here: naming them here would close the cycle
``compare -> cli.lightning -> cli.commands -> compare``.
"""

from __future__ import annotations

from dataclasses import dataclass

DESCRIPTION = (
    "fedilora: federated LoRA fine-tuning of open_clip models with heterogeneous ranks and missing "
    "modalities (FediLoRA and its baselines). Start with: fedilora fit --config configs/demo.yaml"
)


@dataclass(frozen=True)
class Command:
    #: True: a subcommand of ``FediLoRACLI`` (one config: trainer, model, data), whose --help line is the
    #: first line of ``FederatedTrainer``'s method of that name (LightningCLI's rule); False: its own
    #: parser, run by its module's ``main(argv)``
    lightning: bool
    help: str | None = None


COMMANDS = {
    "fit": Command(lightning=True),
    "export": Command(lightning=True),
    "validate": Command(lightning=True),
    "compare": Command(False, "Run methods side by side over seeds on one dataset: table and plots."),
    "predict": Command(False, "Labels of image files and/or texts from a model written by `fedilora export`."),
}

#: run by ``fedilora.cli.lightning.FediLoRACLI``
LIGHTNING = tuple(name for name, command in COMMANDS.items() if command.lightning)
#: the commands with their own parser, with their --help line: ``fedilora.cli.main`` runs their module's main(argv)
EXTERNAL = {name: command.help for name, command in COMMANDS.items() if not command.lightning}
