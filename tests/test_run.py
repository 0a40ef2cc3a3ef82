"""End to end: the CLI, the session (resume, interrupt, faults) and every shipped suite."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

from moebench.cli import main
from moebench.core.metrics import direction
from moebench.store.runs import load_run
from moebench.routers.base import RouteInputs
from moebench.run.session import RunOptions, execute
from moebench.suite.load import load_suite
from moebench.core.workloads import WORKLOADS, Uniform

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "suites").glob("*.yaml"))

TINY = """
name: tiny
version: 1
description: two routers, two cases
grid:
  workload: [uniform, {{name: zipf, params: {{s: 1.5}}}}]
  tokens: 64
  experts: 4
  top_k: 1
  capacity_factor: 1.0
  device: {device}
routers: [switch, {{name: topk, params: {{renormalize: true}}, label: topk_renorm}}]
timing: {{warmup_rounds: 1, min_rounds: 2, max_rounds: 3, min_time_s: 0.0, threads: 1}}
"""


def write_suite(tmp_path: Path, device: str = "cpu", text: str = TINY) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(text.format(device=device))
    return path


def only_run(root: Path) -> Path:
    (run,) = list((root / "tiny").iterdir())
    return run


def test_run_writes_rows_meta_and_report(tmp_path, capsys):
    suite = write_suite(tmp_path)
    code = main(["run", str(suite), "--results", str(tmp_path / "r"), "--reports", str(tmp_path / "p")])
    assert code == 0
    out = capsys.readouterr().out
    run = load_run(only_run(tmp_path / "r"))
    rows = run.rows()
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    df = pd.DataFrame(rows)  # a row is flat: the DataFrame is the table
    for col in ("imbalance", "drop_rate", "route.median_ms", "dispatch.tokens_per_s", "combine.max_ms"):
        assert col in df.columns and df[col].notna().all()
        assert direction(col) in ("lower", "higher")
    # 2-3 rounds: too few for a 95% CI of the median; none is claimed, min-max would cover 1 - 2/2^n
    assert df["combine.ci_high_ms"].isna().all()
    assert (df["combine.ci_coverage"] == 1 - 2 * 0.5 ** df["combine.rounds"]).all()
    assert all(not isinstance(v, (dict, list)) for r in rows for v in r.values())
    meta = run.meta()
    assert meta["status"] == "complete" and meta["ended_at"] and meta["seeds"] == [0]
    assert meta["suite_sha256"] and meta["environment"]["torch"] == torch.__version__
    report = Path(out.strip().splitlines()[-1].split("report: ")[1])
    text = report.read_text()
    for heading in ("## Load balance", "## Dropped tokens", "## Throughput"):
        assert heading in text


def test_cuda_case_without_cuda_is_skipped_with_reason(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    suite = load_suite(write_suite(tmp_path, device="cuda"))
    run = execute(suite, RunOptions(results_root=tmp_path / "r"))
    rows = run.rows()
    assert rows and all(r["status"] == "skipped" and "CUDA" in r["reason"] for r in rows)


def test_interrupt_keeps_rows_and_resume_finishes_without_redoing(tmp_path):
    suite = load_suite(write_suite(tmp_path))
    opts = RunOptions(results_root=tmp_path / "r")

    def stop_after_first(cases, total):
        for i, case in enumerate(cases):
            if i == 1:
                raise KeyboardInterrupt
            yield case

    with pytest.raises(KeyboardInterrupt):
        execute(suite, opts, progress=stop_after_first)
    run_dir = only_run(tmp_path / "r")
    partial = load_run(run_dir)
    assert partial.meta()["status"] == "interrupted"
    assert len(partial.rows()) == 2  # the first case's two routers survived
    # a torn last line (killed mid-write) is ignored, not fatal
    with open(partial.rows_path, "a") as fh:
        fh.write('{"case_id": "trunc')
    partial.rows_path.write_text(partial.rows_path.read_text().rsplit("\n", 1)[0] + "\n")
    before = [r["case_id"] for r in partial.rows()]
    execute(suite, RunOptions(results_root=tmp_path / "r", resume=run_dir))
    rows = load_run(run_dir).rows()
    assert len(rows) == 4
    assert [r["case_id"] for r in rows][:2] == before
    assert len({(r["case_id"], r["router"]) for r in rows}) == 4
    assert load_run(run_dir).meta()["status"] == "complete"


def test_resume_refuses_another_suite(tmp_path, capsys):
    suite = write_suite(tmp_path)
    main(["run", str(suite), "--results", str(tmp_path / "r"), "--no-report"])
    run_dir = only_run(tmp_path / "r")
    suite.write_text(suite.read_text().replace("tokens: 64", "tokens: 128"))
    code = main(["run", str(suite), "--results", str(tmp_path / "r"), "--resume", str(run_dir), "--no-report"])
    assert code == 2
    assert "different version of suite" in capsys.readouterr().err


@dataclass(frozen=True)
class NanLogits(Uniform):
    """A workload whose logits are NaN: the runner must record an error row and go on."""

    def make(self, shape, structure, noise, batch_index):
        inputs = super().make(shape, structure, noise, batch_index)
        return RouteInputs(logits=inputs.logits * math.nan, hidden=inputs.hidden)


@pytest.fixture
def nan_workload():
    """Registered only for the test that needs it (the registry is global)."""
    WORKLOADS.classes()
    WORKLOADS.register("nan_for_tests")(NanLogits)
    yield
    del WORKLOADS._classes["nan_for_tests"]


def test_nan_logits_give_error_rows_and_the_run_goes_on(tmp_path, nan_workload):
    text = TINY.replace("workload: [uniform, {{name: zipf, params: {{s: 1.5}}}}]", "workload: [nan_for_tests, uniform]")
    suite = load_suite(write_suite(tmp_path, text=text))
    rows = execute(suite, RunOptions(results_root=tmp_path / "r")).rows()
    status = {(r["workload"], r["status"]) for r in rows}
    assert status == {("nan_for_tests", "error"), ("uniform", "ok")}
    assert all("NaN" in r["reason"] for r in rows if r["status"] == "error")


def test_validate_list_schema(tmp_path, capsys):
    assert main(["validate", str(write_suite(tmp_path))]) == 0
    assert "ok:" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.format(device="cpu").replace("tokens: 64", "tokens: 0"))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.yaml: grid.tokens" in err
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    for name in ("switch", "expert_choice", "round_robin", "zipf", "position"):
        assert name in listing
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out)["type"] == "object"


def test_bad_suite_leaves_no_result(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.format(device="cpu").replace("switch,", "swtich,"))
    assert main(["run", str(bad), "--results", str(tmp_path / "r")]) == 2
    assert "did you mean 'switch'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_suite_validates_and_smoke_runs(path, tmp_path):
    suite = load_suite(path)
    rows = execute(suite, RunOptions(results_root=tmp_path / "r", quick=True, device="cpu")).rows()
    assert rows
    errors = [(r["case_id"], r["router"], r["reason"]) for r in rows if r["status"] == "error"]
    assert not errors
    if suite.timing.mode == "cuda_graph":  # forced onto the CPU here, so skipped with or without CUDA
        assert all(r["status"] == "skipped" and "CUDA" in r["reason"] for r in rows)
    else:
        assert any(r["status"] == "ok" for r in rows)
