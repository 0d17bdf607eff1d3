"""Make ``torchvision`` importable next to a CPU-only torch build.

The only torchvision release that pins torch 2.13.0 ships CUDA-linked C ops. With the CPU torch its
``_C`` library fails to load, and ``import torchvision`` (hence lightning, torchmetrics, open_clip and
peft) then dies registering fake kernels for ``torchvision::nms``/``qnms``, schemas that the library
would have defined. Defining those two schemas first lets the import succeed; fedilora calls no
torchvision C op. ``fedilora/__init__.py`` installs ``before_torchvision`` first, so every process that
imports fedilora (the CLI, DDP workers started by Fabric, spawned dataloader workers) gets the schemas
just before its first ``import torchvision``.

The hook runs the fix lazily, at that import, rather than when fedilora is imported: importing torch
costs ~1.5 s of CPU, and a Flower ClientApp process (started for every message on a deployed
SuperNode) imports fedilora only to hand the message to its node's worker; it never needs torch.

Users import peft or open_clip before fedilora too (notebooks, their own scripts), so ``make setup``
writes ``fedilora_torchvision.pth`` into the venv's site-packages (``install_startup_hook``): every
interpreter start then imports this module and installs the hook. That runs at every ``python``
start, so this module imports nothing but ``sys`` at the top (``importlib.abc`` alone pulls in
``importlib.resources``, ~25 ms).
"""

from __future__ import annotations

import os  # already imported by the interpreter's start (site), unlike typing or pathlib
import sys

_LIBRARY = None  # the torch.library.Library, kept alive: the schemas vanish when it is collected


def _torchvision_c_library_loads() -> bool:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # nothing to patch
    import torch

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
    import torch

    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY = library
    return True


class _BeforeTorchvision:
    """Defines the schemas when ``torchvision`` is first imported, then lets the import go on (a
    meta path finder: ``find_spec`` is all the import system asks of one)."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            uninstall()  # first: register_torchvision_schemas itself looks torchvision up
            register_torchvision_schemas()
        return None  # the regular finders import it


_HOOK = _BeforeTorchvision()


def before_torchvision() -> None:
    """Install the hook (idempotent); with torchvision already imported it is too late, and not needed
    if that import succeeded."""
    if "torchvision" not in sys.modules and _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


def uninstall() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


PTH_NAME = "fedilora_torchvision.pth"
# Run at every interpreter start by the .pth: load this file alone, as ``fedilora._compat``, without
# importing the fedilora package (its __init__ may import more than a start should pay for), and
# install the hook. A broken or uninstalled fedilora must never stop python from starting, hence the
# broad except: the import of torchvision then fails as it would have without the hook.
_STARTUP = """
try:
    import importlib.util as util
    package = util.find_spec("fedilora")
    if package is not None and "fedilora._compat" not in sys.modules:
        path = package.submodule_search_locations[0] + "/_compat.py"
        spec = util.spec_from_file_location("fedilora._compat", path)
        module = util.module_from_spec(spec)
        sys.modules["fedilora._compat"] = module
        spec.loader.exec_module(module)
        module.before_torchvision()
except Exception:
    sys.modules.pop("fedilora._compat", None)
"""
PTH_LINE = f"import sys; exec({_STARTUP!r})\n"  # a .pth line that starts with "import" is executed


def install_startup_hook(site_dir: str | os.PathLike[str] | None = None) -> str:
    """Write ``fedilora_torchvision.pth`` into ``site_dir`` (default: this interpreter's site-packages),
    so that the hook is in place before anything imports torchvision, whatever is imported first."""
    import sysconfig
    from pathlib import Path

    path = Path(site_dir or sysconfig.get_path("purelib")) / PTH_NAME
    path.write_text(PTH_LINE)
    return str(path)
