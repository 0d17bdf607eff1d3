"""Datasets, partitioning over clients, missing-modality dropout and the federated datamodule."""

from fedilora.data.datamodule import FederatedDataModule
from fedilora.data.source import MultimodalData, MultimodalSource
from fedilora.data.synthetic import SyntheticBenchmark

__all__ = ["FederatedDataModule", "MultimodalData", "MultimodalSource", "SyntheticBenchmark"]
