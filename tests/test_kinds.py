"""The Kind seam (moebench/core/kinds.py): built-in kinds found by name, a package's kind found
through the ``moebench.kinds`` entry-point group, and the README's router plugin example.

The plugin kind is tests/fixtures/kind_plugin/: a package (`moebench_echo_kind`) and its
``.dist-info`` with ``entry_points.txt``, put on the path (PYTHONPATH for the CLI, sys.path in
process), never pip-installed. Its suites have an ``echo:`` block; each row's ``echo_score``
is ``gain * tokens / experts`` (higher is better).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moebench.core import kinds
from moebench.core import metrics

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "kind_plugin"

ECHO_SUITE = """
name: echo_suite
version: 1
echo: {gain: 3, max_tokens: 64}
grid: {tokens: [32, 64, 128], experts: 4, top_k: 1}
routers: [switch, {name: topk, label: top2like}]
"""


def moebench(args: list[str], cwd: Path, *paths: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, paths), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "moebench", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def python(code: str, *paths: Path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, paths), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def echo_kind(monkeypatch):
    """The fixture package on sys.path and the kinds registry reloaded (then restored)."""
    monkeypatch.syspath_prepend(str(FIXTURE))
    monkeypatch.setattr(kinds, "_KINDS", None)
    yield kinds.get("echo")
    sys.modules.pop("moebench_echo_kind", None)


# ------------------------------------------------------------------------------ built-ins

def test_builtin_kinds_in_order_with_their_blocks():
    found = kinds.kinds()
    assert list(found)[:4] == ["routing", "train", "parallel", "traces"]
    assert {key: kind.name for key, kind in kinds.blocks().items()} == {"train": "train", "parallel": "parallel"}
    from moebench.suite.load import TOP_LEVEL_KEYS, top_level_keys

    assert TOP_LEVEL_KEYS == top_level_keys()
    assert top_level_keys()[-2:] == ("train", "parallel") and "timing" in top_level_keys()
    assert found["parallel"].launch is not None and found["train"].launch is None
    assert [k.name for k in found.values() if k.section_at == "inputs" and k.section] == ["traces"]


def test_a_suite_knows_its_kind_and_block():
    from moebench.suite.load import validate_document

    plain = {"name": "s", "version": 1, "grid": {"workload": "uniform", "tokens": 8, "experts": 2, "top_k": 1},
             "routers": ["switch"]}
    suite = validate_document(plain, "s.yaml")
    assert (suite.kind, suite.blocks, suite.train, suite.parallel) == ("routing", {}, None, None)
    par = validate_document({**plain, "parallel": {"mode": "model", "ep": [2]}}, "p.yaml")
    assert par.kind == "parallel" and par.parallel is par.blocks["parallel"] and par.parallel.ep == (2,)


def test_a_suite_is_one_kind_of_case():
    from moebench.core.errors import SuiteError
    from moebench.suite.load import validate_document

    doc = {"name": "s", "version": 1, "grid": {"tokens": 8, "experts": 2, "top_k": 1}, "routers": ["switch"],
           "train": {"steps": 2, "task": "teacher"}, "parallel": {"mode": "model", "ep": [2]}}
    with pytest.raises(SuiteError, match=r"s.yaml: parallel: a suite is one kind of case: give only one of train, parallel"):
        validate_document(doc, "s.yaml")


def test_suite_session_cli_and_report_import_no_kind():
    """Importing them loads no kind (the kinds load by name, on first use)."""
    out = python("import sys, moebench.suite.load, moebench.suite.schema, moebench.run.session, moebench.cli, "
                 "moebench.report.build, moebench.routers.registry, moebench.core.workloads, moebench.core.metrics; "
                 "print(sorted(m for m in sys.modules if m.startswith(('moebench.kinds', 'moebench.peers'))))")
    assert out.strip() == "[]"


def test_builtin_routers_and_workloads_resolve_without_an_extra_import():
    out = python("from moebench.routers.registry import ROUTERS; from moebench.core.workloads import WORKLOADS; "
                 "r = ROUTERS.classes(); w = WORKLOADS.classes(); "
                 "print('recorded' in r, 'peer:megatron.topk' in r, 'switch' in r, 'trace' in w, 'trace_fit' in w)")
    assert out.split() == ["True"] * 5
    out = python("from moebench.core.workloads import WORKLOADS; print('trace' in WORKLOADS.classes())")
    assert out.strip() == "True"


def test_every_kinds_columns_have_a_direction():
    from moebench.kinds.train.metrics import FINAL

    every = metrics.all_metrics()
    for name in FINAL:  # formerly a hand copy in core/metrics.py
        assert every[f"{name}_ci_low"].direction == "none" and f"{name}_ci_high" in every
    assert metrics.direction("eval_loss") == "lower" and metrics.direction("nmi") == "higher"
    assert every["train.step_ms"].deterministic is False
    for column in ("rank_imbalance", "straggler_ratio", "layer_ms", "a2a_ms", "remote_fraction"):
        assert metrics.direction(column) == "lower", column
    assert every["rank_imbalance"].deterministic and not every["straggler_ratio"].deterministic
    model = metrics.metric("model.ep16.layer_ms")
    assert (model.name, model.direction, model.deterministic) == ("model.ep16.layer_ms", "lower", True)
    assert metrics.metric("model.epX.layer_ms") is None and metrics.direction("byte_matrix") == "none"
    assert metrics.direction("route.median_ms") == "lower" and metrics.direction("imbalance") == "lower"
    assert dict(metrics.METRICS) == every  # the old name: a view of all of them
    names = list(every)  # routing metrics first, phase times last (compare's order)
    assert names[0] == "imbalance" and names[-1] == "combine.x_memcopy"


def test_a_kinds_metric_may_not_contradict_anothers(monkeypatch):
    bad = kinds.Kind("bad", metrics=(kinds.Metric("imbalance", "higher", True, "contradicts core"),))
    monkeypatch.setattr(kinds, "_KINDS", {**kinds.kinds(), "bad": bad})
    with pytest.raises(Exception, match="kind 'bad': metric 'imbalance' is higher/deterministic, but it is already lower"):
        metrics.all_metrics()
    monkeypatch.undo()
    assert metrics.direction("imbalance") == "lower"  # the registry reloaded: the tables follow it


# ------------------------------------------------------------------------- a plugin kind

def test_a_plugin_kind_joins_in_process(echo_kind):
    from moebench.suite.load import top_level_keys, validate_document
    from moebench.suite.schema import suite_json_schema

    assert list(kinds.kinds())[-1] == "echo" and "echo" in top_level_keys()
    assert metrics.direction("echo_score") == "higher" and metrics.all_metrics()["echo_score"].deterministic
    import yaml

    suite = validate_document(yaml.safe_load(ECHO_SUITE), "echo.yaml")
    assert suite.kind == "echo" and suite.blocks == {"echo": {"gain": 3, "max_tokens": 64}}
    assert [c.tokens for c in suite.cases] == [32, 64]  # its case filter: max_tokens
    assert {c.workload.name for c in suite.cases} == {"uniform"}  # the axis it sets
    schema = suite_json_schema()
    assert schema["properties"]["echo"]["properties"]["gain"] == {"type": "integer", "minimum": 1}
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(yaml.safe_load(ECHO_SUITE), schema)  # no workload axis: the block supplies it
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "s", "version": 1, "routers": ["switch"], "grid": {"tokens": 8}}, schema)


def test_a_plugin_kind_validates_runs_and_reports(tmp_path):
    (tmp_path / "echo.yaml").write_text(ECHO_SUITE)
    done = moebench(["validate", "echo.yaml"], tmp_path, FIXTURE)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok: echo.yaml: 2 cases x 2 routers"

    done = moebench(["run", "echo.yaml", "--no-report"], tmp_path, FIXTURE)
    assert done.returncode == 0, done.stderr
    run_dir = Path(re.search(r"results: (\S+)", done.stdout).group(1))
    run_dir = run_dir if run_dir.is_absolute() else tmp_path / run_dir
    rows = [json.loads(line) for line in (run_dir / "rows.jsonl").read_text().splitlines()]
    assert sorted((r["tokens"], r["router"], r["echo_score"]) for r in rows) == [
        (32, "switch", 24.0), (32, "top2like", 24.0), (64, "switch", 48.0), (64, "top2like", 48.0)]
    assert json.loads((run_dir / "meta.json").read_text())["echo_gain"] == 3  # its meta

    done = moebench(["report", str(run_dir)], tmp_path, FIXTURE)
    assert done.returncode == 0, done.stderr
    report = Path(re.search(r"report: (\S+)", done.stdout).group(1))
    text = (report if report.is_absolute() else tmp_path / report).read_text()
    assert "## Echo\n\n4 echo rows, best echo_score 48." in text

    done = moebench(["schema"], tmp_path, FIXTURE)
    assert "echo" in json.loads(done.stdout)["properties"]


def test_a_plugin_kinds_block_errors_are_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text(ECHO_SUITE.replace("gain: 3", "gain: 0"))
    done = moebench(["validate", "bad.yaml"], tmp_path, FIXTURE)
    assert done.returncode == 2 and done.stderr.strip() == "error: bad.yaml: echo.gain: expected an integer >= 1, got 0"
    done = moebench(["validate", "bad.yaml"], tmp_path)  # the plugin is not installed: an unknown key
    assert done.returncode == 2 and "bad.yaml: echo: unknown key 'echo'" in done.stderr


def test_a_broken_plugin_kind_is_one_line(tmp_path):
    info = tmp_path / "broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[moebench.kinds]\nbroken = no_such_module_here:KIND\n")
    done = moebench(["list"], tmp_path, tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("moebench: error: kind plugin 'broken' (no_such_module_here:KIND) failed to load")
    assert len(done.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------- the README's plugin example

def readme_plugin() -> tuple[str, str]:
    """(entry-point TOML, module source) of the README's "Your own routers" example."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    part = text[text.index("### Your own routers"):]
    toml = re.search(r"```toml\n(.*?)```", part, re.S).group(1)
    code = re.search(r"```python\n(.*?)```", part, re.S).group(1)
    return toml, code


def test_the_readme_plugin_example_works(tmp_path):
    toml, code = readme_plugin()
    group, name, value = re.search(r'\[project\.entry-points\."([^"]+)"\]\s*\n(\w+)\s*=\s*"([^"]+)"', toml).groups()
    assert group == "moebench.routers"
    site = tmp_path / "site"
    module = site / Path(*value.split(".")).with_suffix(".py")
    module.parent.mkdir(parents=True)
    (module.parent / "__init__.py").write_text("")
    module.write_text(code)
    info = site / "my_package-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-package\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{name} = {value}\n")
    router = re.search(r'@register\("(\w+)"\)', code).group(1)
    (tmp_path / "suite.yaml").write_text(textwrap.dedent(f"""
        name: readme_plugin
        version: 1
        grid: {{workload: zipf, tokens: 64, experts: 4, top_k: 2, capacity_factor: 1.0}}
        routers: [{{name: {router}, params: {{temperature: 0.5}}}}]
        timing: {{warmup_rounds: 0, min_rounds: 1, max_rounds: 1, min_time_s: 0.0, threads: 1, isolate: false}}
    """))
    done = moebench(["list"], tmp_path, site)
    assert done.returncode == 0 and router in done.stdout, done.stderr
    done = moebench(["run", "suite.yaml", "--no-report", "--results", "res"], tmp_path, site)
    assert done.returncode == 0, done.stderr
    assert "(1 ok, 0 skipped, 0 errors)" in done.stdout
