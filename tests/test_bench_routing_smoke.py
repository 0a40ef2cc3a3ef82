"""benchmarks/bench_routing.py runs end to end (--quick, small T): the benchmark is not timed
here, only kept working (its header once raised 'Threading layer is not initialized' after
small selections moved to the serial kernel, and nothing noticed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")

ROOT = Path(__file__).resolve().parents[1]


def test_bench_routing_quick_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_routing.py"), "--quick", "--tokens", "4096",
                           "--hidden", "64"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "numba" in proc.stdout and "topk" in proc.stdout
