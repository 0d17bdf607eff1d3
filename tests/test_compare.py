import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_comparison_writes_table_and_plots(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "compare.py"), "--quick", "--out", str(tmp_path)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    with (tmp_path / "table.csv").open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0][:6] == ["method", "global complete, round 1", "global complete", "global image only",
                           "global text only", "personalized"]  # fmt: skip
    assert [r[0] for r in rows[1:]] == ["fedilora", "hetlora"]
    for row in rows[1:]:
        # accuracies, and bytes were communicated
        assert 0.0 <= float(row[1]) <= 1.0 and 0.0 <= float(row[2]) <= 1.0 and float(row[-1]) > 0
    edits = rows[0].index("edits (rounds)")
    assert re.fullmatch(r"\d+ \(\d+ of 1\)", rows[1][edits])  # 2 rounds: editing can run in round 1 only
    assert rows[2][edits] == "-"  # hetlora has no editing
    assert "| fedilora |" in (tmp_path / "table.md").read_text()
    for plot in ("accuracy_per_round.png", "accuracy_vs_missing_rate.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
