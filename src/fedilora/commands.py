"""fedilora's command table: the LightningCLI subcommands and the commands with their own parsers."""

#: run by ``fedilora.lightning_cli.FediLoRACLI`` (one config: trainer, model, data)
LIGHTNING = ("fit", "export", "validate")

DESCRIPTION = (
    "fedilora: federated LoRA fine-tuning of open_clip models with heterogeneous ranks and missing "
    "modalities (FediLoRA and its baselines). Start with: fedilora fit --config configs/demo.yaml"
)
#: commands that are not LightningCLI's, with their --help line: ``fedilora.cli.main`` runs their module's main(argv)
EXTERNAL = {
    "compare": "Run methods side by side over seeds on one dataset: table and plots.",
    "predict": "Labels of image files and/or texts from a model written by `fedilora export`.",
}
