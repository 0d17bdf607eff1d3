"""The README's comparison: every method config over seeds 0-2 in the paper's setting, plus a missing-rate sweep.

``fedilora compare`` (``src/fedilora/compare.py``) runs it; this script only makes every method config
the default of ``--methods`` and adds the sweep of FediLoRA, HetLoRA, FLoRA and FlexLoRA at missing rates
0.0-0.8. Every option of ``fedilora compare`` works here (``--data``, ``--model``, ``--methods``,
``--seeds``, ``--rounds``, resuming, ``--tabulate``).

    .venv/bin/python experiments/compare.py                 # the README's table (3 seeds) and plots
    .venv/bin/python experiments/compare.py --quick         # seconds: 2 methods, 1 seed, tiny data

Writes ``table.md``, ``table.csv``, ``runs.json``, ``accuracy_per_round.png``, ``communication_per_round.png``
and ``accuracy_vs_missing_rate.png`` to ``--out`` (default ``experiments/results/compare``).
"""

from __future__ import annotations

from fedilora.compare import METHODS, SWEEP_METHODS, main

if __name__ == "__main__":
    main(sweep_methods=SWEEP_METHODS, methods=METHODS)
