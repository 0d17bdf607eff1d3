"""How a run's processes start and its objects are built, in one order for ``fit``, ``export`` and ``validate``."""

from __future__ import annotations

from collections.abc import Sequence

from lightning.fabric import Fabric

from fedilora.data.datamodule import FederatedDataModule
from fedilora.errors import ConfigError
from fedilora.model import LoRACLIPClassifier


def launch(fabric: Fabric) -> None:
    """``fabric.launch()``: start the other processes of this node, or join those a cluster's launcher
    started (torchrun, SLURM), which must agree with ``trainer.devices`` and ``trainer.num_nodes``."""
    try:
        fabric.launch()
    except ValueError as err:  # Fabric's check of the launcher's world size, tasks per node and nodes
        raise ConfigError(
            f"trainer.devices/num_nodes (or the launcher's environment): {str(err).splitlines()[0]}"
        ) from None


def build(
    fabric: Fabric,
    seed: int,
    model: LoRACLIPClassifier,
    datamodule: FederatedDataModule | None = None,
    stage: str = "fit",
    ranks: Sequence[int] = (),
    on_device: bool = True,
    verbose: bool = True,
) -> None:
    """The build order: seed every generator (the random backbone where ``pretrained`` is null, the
    adapters' initialisation), set up the data for ``stage``, build the backbone, add an adapter per
    rank in ``ranks``, and move the model to the run's device (``on_device``)."""
    fabric.seed_everything(seed, verbose=verbose)
    if datamodule is not None:
        datamodule.setup(stage)
    model.configure_model()
    if ranks:
        model.add_ranks(list(ranks))
    if on_device:
        model.to(fabric.device)
