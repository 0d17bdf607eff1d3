"""What importing fedilora costs: the torchvision fix is applied at torchvision's import, not before."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedilora import _compat


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


# ``make setup`` writes fedilora_torchvision.pth into the venv: a notebook or script that imports peft or
# open_clip first (without fedilora) must not die on "operator torchvision::nms does not exist"
@pytest.mark.parametrize("code", ["import open_clip", "from peft import PeftModel", "import torchmetrics, lightning"])
def test_libraries_import_first_in_a_fresh_interpreter(code: str) -> None:
    _run(f"{code}; print('ok')")


def test_the_startup_hook_is_installed_and_imports_no_torch() -> None:
    # -c runs after site: the hook is already there, put by the .pth, which imported neither torch nor the
    # fedilora package (whose __init__ may import more than every interpreter start should pay for)
    code = "import sys, fedilora._compat as c; print(c._HOOK in sys.meta_path, 'torch' in sys.modules)"
    start = "import sys; print('fedilora._compat' in sys.modules, 'fedilora' in sys.modules)"
    assert _run(f"{start}; {code}").split() == ["True", "False", "True", "False"]
    site = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    with open(f"{site}/{_compat.PTH_NAME}") as installed:
        assert installed.read() == _compat.PTH_LINE, "stale hook: run make setup"


def test_the_startup_hook_is_quiet_without_fedilora(tmp_path) -> None:
    # -S: no site-packages, so fedilora is not importable; a leftover .pth must not print at every start
    path = _compat.install_startup_hook(tmp_path)
    done = subprocess.run([sys.executable, "-S", "-c", f"exec(open({path!r}).read()); print('started')"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "started", "")
