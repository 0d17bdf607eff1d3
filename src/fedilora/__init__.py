"""fedilora: federated multimodal LoRA fine-tuning (FediLoRA, arXiv 2509.06984) and its baselines."""

from fedilora import _compat

_compat.before_torchvision()  # must run before anything imports torchvision (see _compat)

__version__ = "0.1.0"

from fedilora.predict import Prediction, predict  # noqa: E402  (light: the model is imported on first use)

__all__ = ["Prediction", "__version__", "predict"]
