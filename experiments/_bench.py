"""What every benchmark script shares: the machine description and the results file."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
    }


def write_results(name: str, payload: dict, quick: bool, threads: int) -> Path:
    """``results/<name>[_quick][_threadsN].json`` with the machine added; prints and returns the path.

    Full runs are kept in git and rendered into the docs by ``render_results.py``; quick runs are git-ignored.
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = ("_quick" if quick else "") + ("" if threads == 2 else f"_threads{threads}")
    out = RESULTS / f"{name}{suffix}.json"
    out.write_text(json.dumps({**payload, "machine": machine()}, indent=2))
    print(f"results: {out}")
    return out
