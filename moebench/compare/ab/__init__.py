"""`moebench ab`: an interleaved A/B speed gate between two versions of the code (docs/ci.md).

sides.py (git worktrees, interpreters), protocol.py + side_worker.py (one worker per side,
JSON lines; the worker runs against the side's own moebench), driver.py (paired blocks,
rounds, looks), stats.py (Hodges-Lehmann, Wilcoxon signed-rank interval, verdicts, error
budget), outcome.py (table, run folders, ab.json, exit code), command.py (`run_ab`).
"""

DEFAULT_BUDGET_S = 150.0  # wall time of the whole command: quickstart fits in 3 minutes with its set-up
