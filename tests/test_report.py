"""Reports from a hand-made run folder: tables, bold best values, streams, skipped rows, CSVs."""

import json
import math

import pandas as pd
import pytest

from moebench.report.build import write_report
from moebench.store.runs import RunDir
from moebench.report.markdown import column_direction, engineering, format_value, markdown_table
from moebench.report.tables import (
    balance_table, load_rows,
)

COMMAND = "moebench run suites/fake.yaml --device cpu --seed 0"
ROUTERS = ("topk", "expert_choice", "sinkhorn")

CASE_A = {  # single batch, capacity factor 1.25
    "case_id": "zipf-A", "workload": "zipf", "workload_params": json.dumps({"alpha": 1.2}),
    "tokens": 1024, "experts": 8, "top_k": 2, "capacity_factor": 1.25, "drop_policy": "position",
    "min_capacity": 0, "capacity_multiple": 1, "hidden": 64, "dtype": "float32", "device": "cpu",
    "seed": 0, "batches": 1,
}
CASE_B = {**CASE_A, "case_id": "drift-B", "workload": "drift", "workload_params": "{}",
          "capacity_factor": None, "batches": 3}  # a dropless stream

# Per case and router: imbalance (lower is better), min_load (higher is better), route tokens/s.
VALUES = {
    ("zipf-A", "topk"): (1.5, 100.0, 2.0e6),
    ("zipf-A", "expert_choice"): (1.0, 120.0, 1.5e6),
    ("zipf-A", "sinkhorn"): (1.2, 140.0, 1.0e6),
    ("drift-B", "topk"): (1.4, 90.0, 3.0e6),
    ("drift-B", "expert_choice"): (1.1, 80.0, 5.0e6),
    ("drift-B", "sinkhorn"): (1.3, 110.0, 4.0e6),
}
STREAM = {  # per router of CASE_B: imbalance and drop_rate of batches 0, 1, 2
    "topk": ([1.5, 1.2, 1.8], [0.1, 0.3, 0.2]),
    "expert_choice": ([1.1, 1.0, 1.2], [0.0, 0.0, 0.0]),
    "sinkhorn": ([1.3, 1.4, 1.2], [0.05, 0.02, 0.08]),
}


def _meta(run_id, status="complete"):
    return {
        "run_id": run_id, "suite": "fake", "suite_version": 1, "suite_path": "suites/fake.yaml",
        "suite_sha256": "ab" * 32, "description": "A fake suite for the report tests.",
        "moebench_version": "0.1.0", "command": COMMAND, "quick": False, "devices": ["cpu"],
        "seeds": [0], "cases": 2, "routers": list(ROUTERS) + ["hash", "broken"],
        "timing": {"warmup_rounds": 3, "min_rounds": 5},
        "environment": {"python": "3.12.0", "platform": "Linux-x86_64", "hostname": "box",
                        "cpu_model": "Fake CPU 9000", "logical_cores": 16, "torch": "2.5.0",
                        "cuda": {"available": False, "version": None, "devices": []},
                        "git": {"commit": "deadbeef" * 5, "dirty": False}},
        "started_at": "2025-01-01T00:00:00+00:00", "ended_at": "2025-01-01T00:10:00+00:00",
        "status": status,
    }


def _ok_row(run_id, case, router):
    imbalance, min_load, tps = VALUES[(case["case_id"], router)]
    row = {"run_id": run_id, "suite": "fake", **case, "router": router, "router_name": router,
           "router_params": "{}", "threads": 4, "status": "ok", "reason": None,
           "capacity": None if case["capacity_factor"] is None else 320,
           "imbalance": imbalance, "cv": imbalance - 1, "entropy": 1 / imbalance, "gini": 0.1,
           "idle_experts": 0, "min_load": min_load, "max_load": 300.0, "drop_rate": 0.01,
           "token_drop_rate": 0.001, "experts_per_token_min": 1, "experts_per_token_mean": 1.98,
           "experts_per_token_max": 2, "expert_usage": 0.8, "aux_loss": 1.02, "z_loss": 4.5}
    for i, phase in enumerate(("route", "dispatch", "combine")):
        median = 1024 / tps * 1e3
        row.update({f"{phase}.median_ms": median, f"{phase}.mean_ms": median,
                    f"{phase}.iqr_ms": 0.01 * (i + 1), f"{phase}.min_ms": median,
                    f"{phase}.max_ms": median, f"{phase}.ci_low_ms": median,
                    f"{phase}.ci_high_ms": median, f"{phase}.rounds": 50,
                    f"{phase}.tokens_per_s": tps, f"{phase}.peak_mem_bytes": None})
    return row


def make_run(root, run_id, status="complete"):
    run = RunDir(root / "fake" / run_id)
    run.create(_meta(run_id, status), "name: fake\n")
    for case in (CASE_A, CASE_B):
        for router in ROUTERS:
            run.append_row(_ok_row(run_id, case, router))
            if case is CASE_B:
                imb, drops = STREAM[router]
                run.append_batches([
                    {"run_id": run_id, "case_id": "drift-B", "router": router, "batch": b,
                     "imbalance": imb[b], "drop_rate": drops[b]} for b in range(3)])
    base = {"run_id": run_id, "suite": "fake", "router_params": "{}", "threads": 4}
    run.append_row({**base, **CASE_A, "router": "hash", "router_name": "hash",
                    "status": "skipped", "reason": "hash routing needs top_k == 1"})
    run.append_row({**base, **CASE_B, "router": "broken", "router_name": "broken",
                    "status": "error", "reason": "RuntimeError: boom | bad"})
    return run.path


def md_table(text, heading):
    """The rows of the Markdown table under ``## heading`` as dicts (case labels filled down)."""
    lines = text.split(f"## {heading}\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    lines = lines[start:end]
    split = lambda line: [c.strip() for c in line.strip().strip("|").split(" | ")]
    header, out, case = split(lines[0]), [], None
    for line in lines[2:]:
        row = dict(zip(header, split(line)))
        case = row["case"] = row["case"] or case
        out.append(row)
    return out


@pytest.fixture
def run_a(tmp_path):
    return make_run(tmp_path / "results", "20250101T000000Z-aaaa")


def test_report_files_and_provenance(run_a, tmp_path):
    path = write_report([run_a], tmp_path / "reports")
    assert path == tmp_path / "reports" / "fake" / "20250101T000000Z-aaaa" / "report.md"
    text = path.read_text()
    for heading in ("## Load balance", "## Dropped tokens", "## Throughput", "## Streams",
                    "## Skipped and failed rows", "## How this was made"):
        assert heading in text
    assert COMMAND in text
    assert "A fake suite for the report tests." in text
    assert "Fake CPU 9000" in text and "torch 2.5.0" in text and "deadbeef" in text
    assert "INTERRUPTED" not in text and "INCOMPLETE" not in text
    assert sorted(p.name for p in path.parent.glob("*.csv")) == [
        "balance.csv", "drops.csv", "side_by_side.csv", "skipped.csv", "streams.csv", "throughput.csv"]


def test_csvs_have_one_row_per_ok_case_and_router(run_a, tmp_path):
    out = write_report([run_a], tmp_path / "reports").parent
    for name in ("balance", "drops", "throughput"):
        df = pd.read_csv(out / f"{name}.csv")
        assert len(df) == 6
        assert set(zip(df["case_id"], df["router"])) == set(VALUES)
        assert list(df.columns[:2]) == ["case", "router"]
    balance = pd.read_csv(out / "balance.csv")
    # sorted by case axes (drift before zipf), then routers in suite order
    assert list(balance["router"]) == list(ROUTERS) * 2
    assert balance["case"][0] == "drift T=1024 E=8 k=2 dropless batches=3"  # default params: none shown
    assert balance["case"][3] == "zipf (alpha=1.2) T=1024 E=8 k=2 cf=1.25 batches=1"
    throughput = pd.read_csv(out / "throughput.csv")
    assert "route.peak_mb" not in throughput.columns  # never measured on CPU
    assert {"route.median_ms", "route.iqr_ms", "route.tokens_per_s", "threads"} <= set(throughput.columns)


def test_best_values_are_bold(run_a, tmp_path):
    text = write_report([run_a], tmp_path / "reports").read_text()
    balance = {(r["case"].split()[0], r["router"]): r for r in md_table(text, "Load balance")}
    assert len(balance) == 6
    assert column_direction("imbalance") == "lower" and column_direction("min_load") == "higher"
    # imbalance: lower is better
    assert balance[("zipf", "expert_choice")]["imbalance"] == "**1.000**"
    assert balance[("zipf", "topk")]["imbalance"] == "1.500"
    assert balance[("drift", "expert_choice")]["imbalance"] == "**1.100**"
    # min_load: higher is better
    assert balance[("zipf", "sinkhorn")]["min_load"] == "**140**"
    assert balance[("zipf", "expert_choice")]["min_load"] == "120"
    assert balance[("drift", "sinkhorn")]["min_load"] == "**110**"
    # all routers tie on gini: nothing bold
    assert all(r["gini"] == "0.1" for r in balance.values())
    speed = {(r["case"].split()[0], r["router"]): r for r in md_table(text, "Throughput")}
    assert speed[("drift", "expert_choice")]["route.tokens_per_s"] == "**5M**"
    assert speed[("zipf", "topk")]["route.tokens_per_s"] == "**2M**"
    assert speed[("zipf", "sinkhorn")]["route.tokens_per_s"] == "1M"
    assert speed[("zipf", "topk")]["route.median_ms"] == "**0.512**"
    assert "lower is better: `imbalance`" in text and "higher is better: `entropy`" in text


def test_stream_table_statistics(run_a, tmp_path):
    out = write_report([run_a], tmp_path / "reports").parent
    streams = pd.read_csv(out / "streams.csv").set_index("router")
    assert list(streams.index) == list(ROUTERS)  # only the stream case
    topk = streams.loc["topk"]
    assert topk["imbalance_first"] == pytest.approx(1.5)
    assert topk["imbalance_last"] == pytest.approx(1.8)
    assert topk["imbalance_mean"] == pytest.approx(1.5)
    assert topk["imbalance_worst"] == pytest.approx(1.8)
    assert topk["drop_rate_first"] == pytest.approx(0.1)
    assert topk["drop_rate_last"] == pytest.approx(0.2)
    assert topk["drop_rate_mean"] == pytest.approx(0.2)
    assert topk["drop_rate_worst"] == pytest.approx(0.3)
    sinkhorn = streams.loc["sinkhorn"]
    assert sinkhorn["imbalance_worst"] == pytest.approx(1.4)
    assert sinkhorn["drop_rate_mean"] == pytest.approx(0.05)
    text = (out / "report.md").read_text()
    rows = {r["router"]: r for r in md_table(text, "Streams")}
    assert rows["expert_choice"]["imbalance_worst"] == "**1.200**"
    assert rows["topk"]["drop_rate_worst"] == "0.3"


def test_skipped_rows_listed_with_reasons(run_a, tmp_path):
    out = write_report([run_a], tmp_path / "reports").parent
    skipped = pd.read_csv(out / "skipped.csv")
    assert list(skipped["router"]) == ["broken", "hash"]
    assert list(skipped["status"]) == ["error", "skipped"]
    assert skipped["reason"].tolist() == ["RuntimeError: boom | bad", "hash routing needs top_k == 1"]
    text = (out / "report.md").read_text()
    listed = md_table(text, "Skipped and failed rows")
    assert [r["reason"] for r in listed] == ["RuntimeError: boom \\| bad", "hash routing needs top_k == 1"]
    assert "hash" not in {r["router"] for r in md_table(text, "Load balance")}


def test_combining_two_runs(run_a, tmp_path):
    run_b = make_run(tmp_path / "results", "20250102T000000Z-bbbb", status="interrupted")
    path = write_report([run_a, run_b], tmp_path / "reports")
    assert path.parent == tmp_path / "reports" / "fake" / "combined-20250101T000000Z-aaaa+20250102T000000Z-bbbb"
    balance = pd.read_csv(path.parent / "balance.csv")
    assert len(balance) == 12
    assert balance.groupby("run_id").size().to_dict() == {"20250101T000000Z-aaaa": 6, "20250102T000000Z-bbbb": 6}
    assert len(pd.read_csv(path.parent / "streams.csv")) == 6
    text = path.read_text()
    assert "### Run `20250101T000000Z-aaaa`" in text and "### Run `20250102T000000Z-bbbb`" in text
    assert "INTERRUPTED" in text
    rows = md_table(text, "Load balance")
    assert "run_id" in rows[0]
    # best is per case within each run: both runs' expert_choice bold on zipf imbalance
    bold = [r for r in rows if r["case"].startswith("zipf") and r["imbalance"].startswith("**")]
    assert sorted(r["run_id"] for r in bold) == ["20250101T000000Z-aaaa", "20250102T000000Z-bbbb"]


def test_incomplete_run_is_flagged(tmp_path):
    run = make_run(tmp_path / "results", "20250103T000000Z-cccc", status="running")
    text = write_report([run], tmp_path / "reports").read_text()
    assert "INCOMPLETE" in text
    assert "8 rows of 10 planned" in text


def test_run_without_streams_or_skips(tmp_path):
    run = RunDir(tmp_path / "r" / "fake" / "x")
    run.create(_meta("x"), "name: fake\n")
    for router in ROUTERS:
        run.append_row({k: v for k, v in _ok_row("x", CASE_A, router).items() if k != "run_id"})
    path = write_report([run.path], tmp_path / "reports")
    assert sorted(p.name for p in path.parent.glob("*.csv")) == ["balance.csv", "drops.csv", "side_by_side.csv", "throughput.csv"]
    assert "## Streams" not in path.read_text()
    df = load_rows([run.path])
    assert set(df["run_id"]) == {"x"}  # filled in from meta
    assert df["case"][0] == "zipf T=1024 E=8 k=2 cf=1.25"  # no varying axes


def test_formatting():
    assert engineering(1_234_567) == "1.23M"
    assert engineering(999_700) == "1M"
    assert engineering(950) == "950"
    assert engineering(12_300) == "12.3k"
    assert format_value("route.median_ms", 0.12345) == "0.123"
    assert format_value("imbalance", 1.23456) == "1.235"
    assert format_value("drop_rate", 0.012345) == "0.0123"
    assert format_value("capacity", 320.0, integer=True) == "320"
    assert format_value("capacity", None) == "-"
    assert format_value("capacity", float("nan")) == "-"


def test_markdown_empty_and_escaping():
    assert markdown_table(balance_table(pd.DataFrame(columns=["run_id", "case_id", "router", "status"]))) == "_No rows._"


PHASE_SUITE = """
name: phases
version: 1
grid: {workload: [uniform, zipf], tokens: 64, experts: 4, top_k: 2, capacity_factor: 1.0}
routers: [topk, sinkhorn]
timing: {warmup_rounds: 0, min_rounds: 2, max_rounds: 2, min_time_s: 0.0, threads: 1, isolate: false}
"""
SIMULATED = "RuntimeError: simulated capture failure: operation not permitted when stream is capturing"


@pytest.fixture
def phase_run(tmp_path, monkeypatch):
    """A real in-process run where Sinkhorn's route is a skipped phase in both cases (as in
    cuda_graph mode) and preparing topk's dispatch raises in the first case (uniform), the
    way tests/test_capture_runner.py simulates a failed capture."""
    import moebench.run.runner as runner
    from moebench.run.exec_modes import PhaseSkip
    from moebench.run.session import RunOptions, execute
    from moebench.suite.load import load_suite

    real_builders, real_prepare, seen = runner.phase_builders, runner.prepare, []

    def builders(router, *args, **kwargs):
        out = real_builders(router, *args, **kwargs)
        if router.name == "sinkhorn":
            out["route"] = lambda: PhaseSkip("route: Sinkhorn's tolerance loop cannot be captured")
        elif router.name == "topk" and not seen:
            seen.append(router)
            build = out["dispatch"]

            def failing():
                fn = build()
                marked = lambda: fn()  # noqa: E731
                marked.fail = True
                return marked

            out["dispatch"] = failing
        return out

    def prepare(fn, mode, device, generators=()):
        if getattr(fn, "fail", False):
            raise RuntimeError(SIMULATED.split(": ", 1)[1])
        return real_prepare(fn, mode, device, generators)

    monkeypatch.setattr(runner, "phase_builders", builders)
    monkeypatch.setattr(runner, "prepare", prepare)
    path = tmp_path / "phases.yaml"
    path.write_text(PHASE_SUITE)
    return execute(load_suite(path), RunOptions(results_root=tmp_path / "results")).path


def test_phases_not_timed_section_and_throughput_cells(phase_run, tmp_path):
    path = write_report([phase_run], tmp_path / "reports")
    text = path.read_text()
    assert "## Phases not timed" in text and text.index("## Throughput") < text.index("## Phases not timed")
    assert "## Skipped and failed rows" not in text  # every row is ok; only phases are not
    section = text.split("## Phases not timed\n", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    split = lambda line: [c.strip() for c in line.strip().strip("|").split(" | ")]
    header, *body = map(split, table)
    assert header == ["router", "phase", "status", "reason", "rows", "cases"]
    grouped = {(r[0], r[1]): r for r in body}
    assert len(body) == 2  # two sinkhorn cases with one reason: one line
    skip = grouped["sinkhorn", "route"]
    assert skip[2:5] == ["skipped", "route: Sinkhorn's tolerance loop cannot be captured", "2 of 2"]
    assert skip[5] == "uniform T=64 E=4 k=2 cf=1; zipf T=64 E=4 k=2 cf=1"
    err = grouped["topk", "dispatch"]
    assert err[2] == "error" and err[3].startswith(SIMULATED + " (at `moebench/run/runner.py:")
    assert err[4:] == ["1 of 2", "uniform T=64 E=4 k=2 cf=1"]

    per_case = pd.read_csv(path.parent / "phases_not_timed.csv")
    assert list(zip(per_case["router"], per_case["phase"], per_case["status"])) == [
        ("topk", "dispatch", "error"), ("sinkhorn", "route", "skipped"), ("sinkhorn", "route", "skipped")]
    assert per_case["error_at"].iloc[0].startswith("moebench/run/runner.py:") and per_case["error_at"].iloc[1:].isna().all()

    speed = {(r["case"].split()[0], r["router"]): r for r in md_table(text, "Throughput")}
    assert "route.status" not in speed["uniform", "topk"]  # the status shows in the cells instead
    for workload in ("uniform", "zipf"):
        s = speed[workload, "sinkhorn"]
        assert s["route.median_ms"] == s["route.iqr_ms"] == s["route.tokens_per_s"] == "skipped"
        assert float(s["dispatch.median_ms"].strip("*").removesuffix(" †")) > 0  # †: the fake rows have no CI
    assert speed["uniform", "topk"]["dispatch.median_ms"] == "error"
    assert speed["uniform", "topk"]["dispatch.tokens_per_s"] == "error"
    assert float(speed["zipf", "topk"]["dispatch.median_ms"].strip("*").removesuffix(" †")) > 0
    csv = pd.read_csv(path.parent / "throughput.csv").set_index(["case", "router"])
    assert csv.loc[("uniform T=64 E=4 k=2 cf=1", "topk"), "dispatch.status"] == "error"
    assert math.isnan(csv.loc[("uniform T=64 E=4 k=2 cf=1", "topk"), "dispatch.median_ms"])


def test_a_phase_not_ok_never_shows_a_number(run_a, tmp_path):
    """A row whose route is an error but still carries route numbers (a partial or older
    writer): the throughput table shows `error`, and the best route goes to the next router."""
    assert "## Phases not timed" not in write_report([run_a], tmp_path / "reports").read_text()
    run = RunDir(run_a)
    row = _ok_row(run_a.name, CASE_A, "topk")  # the fastest route of zipf-A, 2M tokens/s
    row.update({"route.status": "error", "route.reason": "MemoryError: out of memory", "route.error_at": "x.py:1"})
    run.append_row(row)  # the later duplicate wins
    path = write_report([run_a], tmp_path / "reports")
    text = path.read_text()
    speed = {(r["case"].split()[0], r["router"]): r for r in md_table(text, "Throughput")}
    assert speed["zipf", "topk"]["route.median_ms"] == speed["zipf", "topk"]["route.tokens_per_s"] == "error"
    assert speed["zipf", "expert_choice"]["route.tokens_per_s"] == "**1.5M**"
    assert speed["zipf", "topk"]["dispatch.tokens_per_s"] == "**2M**"  # its other phases stay
    assert "| topk | route | error | MemoryError: out of memory (at `x.py:1`) | 1 of 2 |" in text
    side = pd.read_csv(path.parent / "side_by_side.csv")
    assert side.loc[side["case"].str.startswith("zipf"), "topk"].isna().all()
