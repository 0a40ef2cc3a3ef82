"""The CI gate: a fresh quick run of the default suite matches the committed baseline on every
deterministic metric (loads, drops, losses). A change in routing behaviour fails here until
the baseline is refreshed on purpose (docs/ci.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moebench.compare.verdicts import compare_runs, format_text
from moebench.run.session import RunOptions, execute
from moebench.suite.load import load_suite

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "results" / "baseline" / "quickstart.json"


def test_quick_quickstart_matches_the_committed_baseline(tmp_path):
    if not BASELINE.exists():
        pytest.fail(f"{BASELINE} is missing: see docs/ci.md to create it")
    suite = load_suite(ROOT / "suites" / "quickstart.yaml")
    run = execute(suite, RunOptions(results_root=tmp_path, quick=True, device="cpu"))
    result = compare_runs(BASELINE, run.path, metrics="deterministic")
    assert result.matched > 0
    assert result.exit_code == 0, format_text(result)
