"""Datasets, partitioning over clients, missing-modality dropout and the federated datamodule."""

from fedilora.data.benchmarks import HatefulMemes, MMIMDb, UPMCFood101
from fedilora.data.datamodule import FederatedDataModule
from fedilora.data.errors import DataError
from fedilora.data.files import FileSource, ImageFiles
from fedilora.data.generic import MultimodalTable
from fedilora.data.hf import HuggingFaceDataset
from fedilora.data.source import MultimodalData, MultimodalSource
from fedilora.data.synthetic import HardSyntheticBenchmark, SyntheticBenchmark

__all__ = [
    "DataError",
    "FederatedDataModule",
    "FileSource",
    "HardSyntheticBenchmark",
    "HatefulMemes",
    "HuggingFaceDataset",
    "ImageFiles",
    "MMIMDb",
    "MultimodalData",
    "MultimodalSource",
    "MultimodalTable",
    "SyntheticBenchmark",
    "UPMCFood101",
]
