"""What importing fedilora costs: the torchvision fix is applied at torchvision's import, not before."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_importing_fedilora_does_not_import_torch() -> None:
    assert _run("import sys, fedilora; print('torch' in sys.modules)") == "False"


def test_flower_client_app_shim_imports_no_torch() -> None:
    # a deployed SuperNode starts this module's process for every message; with keep-alive it only
    # forwards the message to the node's worker, so torch (~1.5 s of CPU) must stay out of it
    pytest.importorskip("flwr")
    code = "import sys, fedilora.flower.client_app as a; print([m for m in ('torch', 'lightning') if m in sys.modules])"
    assert _run(code) == "[]"


def test_torchvision_imports_after_fedilora_and_the_hook_is_gone() -> None:
    code = (
        "import sys, fedilora, fedilora._compat as c, open_clip, torchvision;"
        "print(c._HOOK in sys.meta_path, 'torchvision' in sys.modules)"
    )
    assert _run(code) == "False True"
