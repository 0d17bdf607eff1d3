"""Make ``torchvision`` importable next to a CPU-only torch build.

The only torchvision release that pins torch 2.13.0 ships CUDA-linked C ops. With the CPU torch its
``_C`` library fails to load, and ``import torchvision`` (hence lightning, torchmetrics, open_clip and
peft) then dies registering fake kernels for ``torchvision::nms``/``qnms``, schemas that the library
would have defined. Defining those two schemas first lets the import succeed; fedilora calls no
torchvision C op. This module is imported by ``fedilora/__init__.py`` before anything else, so every
process that imports fedilora (the CLI, DDP workers started by Fabric, spawned dataloader workers)
gets it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

_LIBRARY: torch.library.Library | None = None  # kept alive: the schemas vanish when it is collected


def _torchvision_c_library_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # nothing to patch
    package_dir = Path(spec.origin).parent
    libraries = sorted(package_dir.glob("_C*.so")) + sorted(package_dir.glob("_C*.pyd"))
    if not libraries:
        return False
    try:
        torch.ops.load_library(str(libraries[0]))
    except (OSError, ImportError):
        return False
    return True


def register_torchvision_schemas() -> bool:
    """Define ``torchvision::nms``/``qnms`` when torchvision's own C library cannot load.

    Returns True when the schemas were defined by this function.
    """
    global _LIBRARY
    if _LIBRARY is not None or "torchvision" in sys.modules or _torchvision_c_library_loads():
        return False
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY = library
    return True


register_torchvision_schemas()
