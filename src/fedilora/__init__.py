"""fedilora: federated multimodal LoRA fine-tuning (FediLoRA, arXiv 2509.06984) and its baselines."""

from fedilora import _compat  # noqa: F401  (must run before anything imports torchvision)

__version__ = "0.1.0"
