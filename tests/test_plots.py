"""Plots and report.html from hand-made run folders: which plots apply, valid PNGs, embedding in
report.md, inlining in a self-contained report.html, combined CPU + GPU runs."""

import base64
import json
import re

import numpy as np
import pandas as pd
import pytest

from moebench.report import plots
from moebench.report.plot_style import Style, draw_lines, new_figure
from moebench.report.html import markdown_to_html, render_html
from moebench.report.build import write_report
from moebench.store.runs import LOADS, RunDir
from moebench.report.tables import load_expert_loads, load_rows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROUTERS = ("topk", "expert_choice", "random")
EXPERTS = 8
SKEW = {"uniform": 1.1, "zipf": 2.5}  # imbalance of topk per workload
SPEED = {"topk": 1.0, "expert_choice": 1.5, "random": 0.8}  # relative time per call


def _meta(run_id, device="cpu"):
    return {"run_id": run_id, "suite": "fakeplots", "suite_version": 1, "command": "moebench run x",
            "quick": False, "devices": [device], "seeds": [0], "routers": list(ROUTERS),
            "environment": {"cpu_model": "Fake CPU"}, "status": "complete",
            "description": "Fake suite for the plot tests."}


def _case(workload, tokens, cf, batches=1, device="cpu"):
    cf_text = "dropless" if cf is None else f"cf{cf}"
    return {"case_id": f"{workload}-T{tokens}-{cf_text}-b{batches}-{device}", "workload": workload,
            "workload_params": "{}", "tokens": tokens, "experts": EXPERTS, "top_k": 2,
            "capacity_factor": cf, "drop_policy": "position", "min_capacity": 0,
            "capacity_multiple": 1, "hidden": 64, "dtype": "float32", "device": device, "seed": 0,
            "batches": batches}


def _loads(case, router):
    """Per-expert loads (expert order scrambled, so ranks matter); expert_choice is even."""
    total = case["tokens"] * case["top_k"]
    if router == "expert_choice":
        return [total / EXPERTS] * EXPERTS
    weights = np.arange(EXPERTS, 0, -1, dtype=float) ** (1.5 if case["workload"] == "zipf" else 0.1)
    if router == "random":
        weights = np.ones(EXPERTS) + 0.05 * np.arange(EXPERTS)
    loads = np.round(total * weights / weights.sum())
    return [float(x) for x in np.roll(loads, 3)]


def _row(run_id, case, router, speed=1.0):
    cf = case["capacity_factor"]
    imbalance = 1.0 if router == "expert_choice" else SKEW[case["workload"]] * (0.9 if router == "random" else 1)
    if cf is not None:
        imbalance = min(imbalance, cf)
    drop = 0.0 if cf is None or router == "expert_choice" else max(0.0, 0.4 - 0.2 * cf) * SPEED[router]
    row = {"run_id": run_id, "suite": "fakeplots", **case, "router": router, "router_name": router,
           "router_params": "{}", "threads": 2, "status": "ok", "reason": None, "capacity": None,
           "imbalance": imbalance, "cv": imbalance - 1, "entropy": 1 / imbalance, "gini": 0.1,
           "idle_experts": 0, "min_load": 10.0, "max_load": 300.0, "drop_rate": drop,
           "token_drop_rate": drop / 2, "expert_usage": 0.8, "aux_loss": 1.0, "z_loss": 4.0}
    for i, phase in enumerate(("route", "dispatch", "combine")):
        ms = case["tokens"] / 1e4 * SPEED[router] * speed * (i + 1)
        row.update({f"{phase}.median_ms": ms, f"{phase}.iqr_ms": ms / 10,
                    f"{phase}.tokens_per_s": case["tokens"] / ms * 1e3, f"{phase}.peak_mem_bytes": None})
    return row


def make_run(root, run_id, *, device="cpu", speed=1.0, cfs=(1.0, 2.0, None), tokens=(256, 1024),
             workloads=("uniform", "zipf"), routers=ROUTERS, stream=True, loads=True):
    run = RunDir(root / "fakeplots" / run_id)
    run.create(_meta(run_id, device), "name: fakeplots\n")
    cases = [_case(w, t, cf, device=device) for w in workloads for t in tokens for cf in cfs]
    if stream:
        cases.append(_case("zipf", tokens[0], cfs[0], batches=3, device=device))
    for case in cases:
        for router in routers:
            run.append_row(_row(run_id, case, router, speed))
            key = {"run_id": run_id, "case_id": case["case_id"], "router": router}
            if loads:
                with open(run.path / LOADS, "a") as fh:
                    fh.write(json.dumps({**key, "batch": 0, "loads": _loads(case, router)}) + "\n")
            if case["batches"] > 1:
                run.append_batches([{**key, "batch": b, "imbalance": 1.0 + 0.3 * b * (router == "topk"),
                                     "drop_rate": 0.05 * b * (router != "expert_choice")}
                                    for b in range(3)])
    return run.path


def png_ok(path):
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 5000


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("plots")
    return write_report([make_run(root / "results", "20250101T000000Z-aaaa")], root / "reports")


def test_every_plot_is_written_and_valid(full_report):
    names = sorted(p.name for p in (full_report.parent / "plots").glob("*.png"))
    assert "imbalance_heatmap.png" in names
    assert "drop_rate_vs_capacity.png" in names
    assert "throughput_vs_tokens.png" in names
    assert len([n for n in names if n.startswith("stream_")]) == 1
    loads = [n for n in names if n.startswith("loads_")]
    assert 1 <= len(loads) <= plots.MAX_CASE_FIGURES
    assert loads[0].startswith("loads_1_zipf")  # the most skewed case first
    for name in names:
        assert png_ok(full_report.parent / "plots" / name), name


def test_plots_embedded_in_markdown(full_report):
    text = full_report.read_text()
    assert "## Plots" in text
    pngs = sorted((full_report.parent / "plots").glob("*.png"))
    referenced = re.findall(r"!\[[^\]]+\]\((plots/[^)]+\.png)\)", text)
    assert sorted(referenced) == sorted(f"plots/{p.name}" for p in pngs)
    # the plots come after the tables, before the skipped rows (none here)
    assert text.index("## Throughput") < text.index("## Plots")


def test_html_is_self_contained(full_report):
    html = (full_report.parent / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>")
    pngs = sorted((full_report.parent / "plots").glob("*.png"))
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(uris) == len(pngs)
    assert sorted(base64.b64decode(u) for u in uris) == sorted(p.read_bytes() for p in pngs)
    assert not re.search(r"https?://", html)  # no CDN, no web fonts, no remote images
    assert "<script" not in html and "<link" not in html and "@import" not in html
    assert 'src="plots/' not in html
    # the same content: provenance, tables with the best values bold
    assert "How this was made" in html and "Fake CPU" in html
    assert "<table>" in html and '<td class="num best"><strong>' in html
    assert html.count("<h2") == full_report.read_text().count("\n## ")


def test_plots_that_do_not_apply_are_absent(tmp_path):
    # one capacity factor, one token count, no stream, no loads.jsonl: only the heatmap (and the
    # summary's headline figure, which every report with ok rows has)
    run = make_run(tmp_path / "results", "20250102T000000Z-bbbb", cfs=(1.25,), tokens=(512,),
                   stream=False, loads=False)
    path = write_report([run], tmp_path / "reports")
    assert sorted(p.name for p in (path.parent / "plots").glob("*.png")) == [
        "headline_pareto.png", "imbalance_heatmap.png"]
    assert load_expert_loads([run]).empty
    assert "drop_rate_vs_capacity" not in path.read_text()
    # one router, one workload as well: nothing to plot, no Plots section
    run = make_run(tmp_path / "results", "20250103T000000Z-cccc", cfs=(1.25,), tokens=(512,),
                   workloads=("zipf",), routers=("topk",), stream=False, loads=False)
    path = write_report([run], tmp_path / "reports")
    assert not list(path.parent.glob("plots/*.png"))
    assert "## Plots" not in path.read_text()
    assert "data:image" not in (path.parent / "report.html").read_text()


def test_stale_plots_are_removed(tmp_path):
    run = make_run(tmp_path / "results", "20250104T000000Z-dddd", cfs=(1.25,), tokens=(512,),
                   stream=False, loads=False)
    stale = tmp_path / "reports" / "fakeplots" / "20250104T000000Z-dddd" / "plots" / "old.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(PNG_MAGIC)
    write_report([run], tmp_path / "reports")
    assert not stale.exists()


def test_combined_cpu_and_gpu_runs(tmp_path):
    cpu = make_run(tmp_path / "results", "20250105T000000Z-c0c0", cfs=(1.0, None), tokens=(256, 1024))
    gpu = make_run(tmp_path / "results", "20250106T000000Z-9a9a", device="cuda", speed=0.2,
                   cfs=(1.0, None), tokens=(256, 1024))
    path = write_report([cpu, gpu], tmp_path / "reports")
    names = {p.name for p in (path.parent / "plots").glob("*.png")}
    assert "throughput_vs_tokens.png" in names and "imbalance_heatmap.png" in names
    assert "drop_rate_vs_capacity.png" not in names  # one numeric capacity factor
    # the same case of both runs shares a figure: one stream figure, not two
    assert len([n for n in names if n.startswith("stream_")]) == 1
    assert "Line styles tell the devices/runs apart" in path.read_text()
    ctx = plots.with_context(load_rows([cpu, gpu]))
    assert set(ctx["variant"]) == {"cpu", "cuda"}
    assert ctx.groupby("plot_case")["run_id"].nunique().eq(2).all()


def test_two_runs_on_one_device_are_told_apart_by_run():
    rows = pd.DataFrame({"run_id": ["20250101T000000Z-aaaa", "20250102T000000Z-bbbb"],
                         "case_id": ["c", "c"], "router": ["topk", "topk"], "status": ["ok", "ok"],
                         "workload": ["zipf", "zipf"], "tokens": [256, 256], "experts": [8, 8],
                         "top_k": [1, 1], "capacity_factor": [1.0, 1.0], "device": ["cpu", "cpu"]})
    assert sorted(plots.with_context(rows)["variant"]) == ["run aaaa", "run bbbb"]


def test_load_expert_loads_ranks(tmp_path):
    run = make_run(tmp_path / "results", "20250107T000000Z-eeee", cfs=(1.0,), tokens=(256,),
                   workloads=("zipf",), stream=False)
    loads = load_expert_loads([run])
    assert list(loads.columns) == ["run_id", "case_id", "router", "expert", "load", "rank"]
    assert len(loads) == len(ROUTERS) * EXPERTS
    topk = loads[loads["router"] == "topk"].sort_values("rank")
    assert topk["load"].is_monotonic_decreasing
    assert topk["expert"].iloc[0] == 3  # np.roll(…, 3) put the largest load on expert 3
    assert sorted(topk["rank"]) == list(range(EXPERTS))


def test_identical_routers_share_a_line():
    frame = pd.DataFrame({"router": ["a", "a", "b", "b", "c", "c"], "x": [0, 1] * 3,
                          "y": [1.0, 2.0, 1.0, 2.0, 3.0, 1.0], "variant": [None] * 6})
    fig, axes = new_figure()
    entries, variants = draw_lines([(axes[0, 0], frame)], "x", "y", Style.of(["a", "b", "c"]))
    assert entries == [("a = b", "a"), ("c", "c")] and variants == [None]
    assert len(axes[0, 0].get_lines()) == 2


def test_router_colours_are_fixed():
    one = Style.of(["topk", "random", "expert_choice"])
    two = Style.of(["expert_choice", "topk", "random", "topk"])
    assert one.palette == two.palette and one.markers == two.markers
    assert len(set(one.palette.values())) == 3


def test_markdown_to_html_subset(tmp_path):
    md = ("# Title `x`\n\nSome <b>text</b> with **bold**, _it_ and hot_experts.\n\n"
          "- item `a|b`\n- item two\n\n```\ncmd --flag <x>\n```\n\n"
          "| case | v |\n|---|---:|\n| a \\| b | **1.0** |\n|  | 2.0 |\n\n"
          "![missing](plots/none.png)\n\n![remote](https://example.com/x.png)\n")
    body, title, toc = markdown_to_html(md, tmp_path)
    assert title == "Title `x`" and toc == []
    assert "&lt;b&gt;text&lt;/b&gt;" in body and "<strong>bold</strong>" in body
    assert "<em>it</em>" in body and "hot_experts" in body
    assert "<code>a|b</code>" in body and "cmd --flag &lt;x&gt;" in body
    assert "<td class=\"case\">a | b</td>" in body and '<td class="num best"><strong>1.0</strong></td>' in body
    assert "image not available: missing" in body and "image not available: remote" in body
    assert "example.com" not in body
    page = render_html("# T\n\n## A\n\ntext\n\n## B\n", tmp_path)
    assert '<a href="#a">A</a>' in page and '<h2 id="b">B</h2>' in page
