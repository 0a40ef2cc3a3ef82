"""Suite files: loading, include, validation errors (one line each), expansion, JSON Schema."""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from moebench.core.case import Case, NamedSpec, TimingSpec
from moebench.core.errors import SuiteError
from moebench.suite.schema import suite_json_schema
from moebench.suite.load import AXES, TIMING, load_document, load_suite, validate_document

SUITES_DIR = Path(__file__).resolve().parent.parent / "suites"

GOOD = {
    "name": "quickstart",
    "version": 1,
    "description": "a small grid",
    "defaults": {"hidden": 32, "dtype": "float32", "seed": 3},
    "grid": {
        "workload": ["uniform", {"name": "zipf", "params": {"s": 1.2}, "label": "zipf1.2"}],
        "tokens": [64, 256],
        "experts": [4, 8],
        "top_k": [1, 2],
        "capacity_factor": [1.0, None],
        "drop_policy": "probs",
        "dtype": ["float32", "bfloat16"],
    },
    "routers": ["switch", {"name": "topk", "params": {"renormalize": True}, "label": "topk-renorm"}],
    "timing": {"warmup_rounds": 1, "min_rounds": 2, "max_rounds": 10, "min_time_s": 0.05, "threads": 2},
}
GOOD_CASES = 2 * 2 * 2 * 2 * 2 * 2  # workload × tokens × experts × top_k × capacity_factor × dtype


def write(path: Path, content: dict | str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    return str(path)


@pytest.fixture
def schema_validator():
    schema = suite_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


# --- the good path ----------------------------------------------------------------------------


def test_good_suite_loads_and_expands(tmp_path):
    suite = load_suite(write(tmp_path / "good.yaml", GOOD))
    assert (suite.name, suite.version, suite.description) == ("quickstart", 1, "a small grid")
    assert suite.path == str(tmp_path / "good.yaml")
    assert len(suite.cases) == GOOD_CASES
    assert suite.routers == (
        NamedSpec("switch", {}, ""),
        NamedSpec("topk", {"renormalize": True}, "topk-renorm"),
    )
    assert suite.timing == TimingSpec(warmup_rounds=1, min_rounds=2, max_rounds=10, min_time_s=0.05, threads=2)
    # axes in Case field order, values in file order: workload varies slowest, dtype fastest
    assert suite.cases[0] == Case(
        workload=NamedSpec("uniform", {}, ""), tokens=64, experts=4, top_k=1, capacity_factor=1.0,
        drop_policy="probs", hidden=32, dtype="float32", seed=3,
    )
    assert suite.cases[1].dtype == "bfloat16" and suite.cases[2].capacity_factor is None
    last = suite.cases[-1]
    assert last.workload == NamedSpec("zipf", {"s": 1.2}, "zipf1.2")
    assert (last.tokens, last.experts, last.top_k, last.capacity_factor, last.dtype) == (256, 8, 2, None, "bfloat16")
    assert all(c.device == "cpu" and c.min_capacity == 0 and c.capacity_multiple == 1 and c.batches == 1 for c in suite.cases)
    assert suite.sha256 == hashlib.sha256(json.dumps(suite.document, sort_keys=True).encode()).hexdigest()


def test_case_ids_are_stable_and_distinct(tmp_path):
    first = load_suite(write(tmp_path / "a.yaml", GOOD))
    again = load_suite(write(tmp_path / "b.yaml", GOOD))
    ids = [c.case_id for c in first.cases]
    assert ids == [c.case_id for c in again.cases]
    assert len(set(ids)) == len(ids)
    assert first.sha256 == again.sha256


def test_defaults_fill_absent_axes(tmp_path):
    doc = {"name": "tiny", "version": 2, "defaults": {"workload": "uniform", "tokens": 8, "experts": 2, "top_k": 1},
           "routers": ["switch"]}
    suite = load_suite(write(tmp_path / "tiny.yaml", doc))
    (case,) = suite.cases
    assert case.capacity_factor == 1.25  # the suite default when no file names one
    assert (case.drop_policy, case.hidden, case.dtype, case.device, case.seed) == ("position", 64, "float32", "cpu", 0)
    assert suite.timing == TimingSpec() and suite.description == ""


def test_grid_wins_over_defaults_and_ints_become_floats(tmp_path):
    doc = copy.deepcopy(GOOD)
    doc["defaults"].update(tokens=999, capacity_factor=2)
    doc["grid"]["capacity_factor"] = 1
    suite = load_suite(write(tmp_path / "s.yaml", doc))
    assert {c.tokens for c in suite.cases} == {64, 256}
    assert all(isinstance(c.capacity_factor, float) for c in suite.cases)
    doc["grid"]["capacity_factor"] = 1.0  # `1` and `1.0` mean the same cases
    same = load_suite(write(tmp_path / "t.yaml", doc))
    assert [c.case_id for c in suite.cases] == [c.case_id for c in same.cases]


def test_params_null_and_validate_document_directly():
    doc = copy.deepcopy(GOOD)
    doc["routers"] = [{"name": "topk", "params": None}]
    suite = validate_document(doc, "inline.yaml")
    assert suite.routers == (NamedSpec("topk", {}, ""),) and suite.path == "inline.yaml"


def test_rule_tables_match_the_dataclasses():
    fields = {f.name: f for f in dataclasses.fields(Case)}
    assert list(AXES) == list(fields)
    for name, rule in AXES.items():
        if fields[name].default is not dataclasses.MISSING:
            assert rule.default == fields[name].default, name
    assert [f.name for f in dataclasses.fields(TimingSpec)] == list(TIMING)


# --- include ----------------------------------------------------------------------------------

BASE = {
    "name": "base",
    "defaults": {"hidden": 16, "dtype": "float16"},
    "grid": {"workload": "uniform", "tokens": [64, 128], "experts": [4], "top_k": 1},
    "routers": ["switch"],
    "timing": {"min_rounds": 2, "max_rounds": 9},
}


def test_include_merges_dicts_and_replaces_lists(tmp_path):
    write(tmp_path / "common" / "base.yaml", BASE)
    child = {"include": "../common/base.yaml", "name": "child", "version": 1,
             "grid": {"tokens": [256]}, "timing": {"max_rounds": 7}, "routers": ["topk"]}
    path = write(tmp_path / "suites" / "child.yaml", child)
    suite = load_suite(path)
    assert suite.name == "child"
    assert [c.tokens for c in suite.cases] == [256]  # list replaced, not concatenated
    assert suite.cases[0].experts == 4 and suite.cases[0].hidden == 16 and suite.cases[0].dtype == "float16"
    assert (suite.timing.min_rounds, suite.timing.max_rounds) == (2, 7)
    assert [r.name for r in suite.routers] == ["topk"]
    document = load_document(path)
    assert "include" not in document and document == suite.document
    assert document["grid"] == {"workload": "uniform", "tokens": [256], "experts": [4], "top_k": 1}


def test_include_list_applies_in_order(tmp_path):
    write(tmp_path / "a.yaml", {"defaults": {"seed": 1, "hidden": 8}})
    write(tmp_path / "b.yaml", {"defaults": {"seed": 2}})
    path = write(tmp_path / "top.yaml", {"include": ["a.yaml", "b.yaml"], **{k: v for k, v in GOOD.items() if k != "defaults"}})
    case = load_suite(path).cases[0]
    assert (case.seed, case.hidden) == (2, 8)


def test_include_diamond_is_not_a_cycle(tmp_path):
    write(tmp_path / "root.yaml", {"version": 1})
    write(tmp_path / "l.yaml", {"include": "root.yaml"})
    write(tmp_path / "r.yaml", {"include": "root.yaml"})
    path = write(tmp_path / "top.yaml", {"include": ["l.yaml", "r.yaml"], **{k: v for k, v in GOOD.items() if k != "version"}})
    assert load_suite(path).version == 1


@pytest.mark.parametrize("self_include", [False, True])
def test_include_cycle_is_an_error(tmp_path, self_include):
    a = tmp_path / "a.yaml"
    write(a, {"include": "a.yaml" if self_include else "b.yaml", **GOOD})
    write(tmp_path / "b.yaml", {"include": "a.yaml"})
    with pytest.raises(SuiteError) as info:
        load_suite(str(a))
    assert info.value.field == "include" and "include cycle" in info.value.message
    assert "\n" not in str(info.value)


def test_include_missing_file_and_bad_include_value(tmp_path):
    path = write(tmp_path / "s.yaml", {"include": ["nope.yaml"], **GOOD})
    with pytest.raises(SuiteError, match=r"s\.yaml: include\[0\]: included file not found: .*nope\.yaml$"):
        load_suite(path)
    path = write(tmp_path / "t.yaml", {"include": 3, **GOOD})
    with pytest.raises(SuiteError, match=r"t\.yaml: include: expected a path or a list of paths, got 3$"):
        load_suite(path)


def test_errors_in_included_values_name_the_included_file(tmp_path):
    bad = copy.deepcopy(BASE)
    bad["grid"]["tokens"] = [64, 0]
    base = write(tmp_path / "base.yaml", bad)
    path = write(tmp_path / "child.yaml", {"include": "base.yaml", "name": "child", "version": 1})
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    assert str(info.value) == f"{base}: grid.tokens[1]: expected an integer > 0, got 0"


# --- malformed suites: one line, file, field path, what was expected ------------------------------


def mutate(fn):
    doc = copy.deepcopy(GOOD)
    fn(doc)
    return doc


def _pop(key):
    return lambda d: d.pop(key)


def _grid(**kw):
    return lambda d: d["grid"].update(kw)


def _set(section, **kw):
    return lambda d: d.setdefault(section, {}).update(kw)


def _router(i, value):
    return lambda d: d["routers"].__setitem__(i, value)


# (id, document change or raw YAML text, field path, message fragment, schema also rejects it)
BAD = [
    ("unknown-top-key", lambda d: d.update(gird=d.pop("grid")), "gird", "unknown key 'gird'; did you mean 'grid'?", True),
    ("not-a-mapping", "- just\n- a list\n", "<top level>", "expected a mapping of suite fields", True),
    ("empty-file", "", "<top level>", "the file is empty", True),
    ("missing-routers", _pop("routers"), "routers", "missing required field", True),
    ("missing-name", _pop("name"), "name", "missing required field", True),
    ("bad-name", lambda d: d.update(name="my suite"), "name", "got 'my suite'", True),
    ("version-0", lambda d: d.update(version=0), "version", "expected an integer >= 1, got 0", True),
    ("empty-routers", lambda d: d.update(routers=[]), "routers", "expected a non-empty list of routers, got []", True),
    ("tokens-0", _grid(tokens=[1024, 0]), "grid.tokens[1]", "expected an integer > 0, got 0", True),
    ("tokens-string", _grid(tokens="many"), "grid.tokens", "expected an integer > 0, got 'many'", True),
    ("tokens-float", _grid(tokens=[64.0]), "grid.tokens[0]", "expected an integer > 0, got 64.0", False),
    ("experts-1", _grid(experts=[4, 1]), "grid.experts[1]", "expected an integer >= 2, got 1", True),
    ("experts-bool", _grid(experts=True), "grid.experts", "expected an integer >= 2, got true", True),
    ("seed-bool", _set("defaults", seed=False), "defaults.seed", "expected an integer >= 0, got false", True),
    ("seed-negative", _grid(seed=[0, -1]), "grid.seed[1]", "expected an integer >= 0, got -1", True),
    ("top_k-over-experts", _grid(top_k=[1, 8], experts=[4, 8]), "grid.top_k[1]",
     "expected an integer <= experts (4, from grid.experts[0]), got 8", False),
    ("top_k-0", _grid(top_k=0), "grid.top_k", "expected an integer >= 1, got 0", True),
    ("cf-0", _grid(capacity_factor=[1.0, 0]), "grid.capacity_factor[1]",
     "expected a number > 0 or null (dropless), got 0", True),
    ("cf-negative", _set("defaults", capacity_factor=-1.5), "defaults.capacity_factor",
     "expected a number > 0 or null (dropless), got -1.5", True),
    ("unknown-router", _router(0, "swtich"), "routers[0]", "unknown router 'swtich'; did you mean 'switch'?", True),
    ("unknown-router-in-mapping", _router(1, {"name": "top_k"}), "routers[1].name",
     "unknown router 'top_k'; did you mean 'topk'?", True),
    ("unknown-router-param", _router(1, {"name": "topk", "params": {"renorm": True}}), "routers[1].params",
     "'renorm'; did you mean 'renormalize'?", True),
    ("router-param-type", _router(1, {"name": "topk", "params": {"renormalize": "yes"}}), "routers[1].params",
     "expected a boolean, got 'yes'", True),
    ("router-param-check", _router(1, {"name": "topk", "params": {"route_scale": -1}}), "routers[1].params",
     "route_scale must be > 0", False),
    ("router-literal", _router(1, {"name": "topk", "params": {"score": "tanh"}}), "routers[1].params",
     "one of 'softmax', 'sigmoid'", True),
    ("unknown-router-key", _router(1, {"name": "topk", "parms": {}}), "routers[1].parms",
     "unknown key 'parms'; did you mean 'params'?", True),
    ("router-not-a-name", _router(0, 3), "routers[0]", "expected a router name or a mapping", True),
    ("duplicate-router-labels", lambda d: d["routers"].append({"name": "topk", "label": "switch"}), "routers[2].label",
     "duplicate label 'switch' (also routers[0])", False),
    ("unknown-workload", _grid(workload=["unifrom"]), "grid.workload[0]",
     "unknown workload 'unifrom'; did you mean 'uniform'?", True),
    ("bad-workload-param", _grid(workload=["uniform", {"name": "zipf", "params": {"s": "big"}}]),
     "grid.workload[1].params", "option 's' of workload 'zipf': expected a number, got 'big'", True),
    ("unknown-workload-param", _set("defaults", workload={"name": "zipf", "params": {"alpha": 1}}),
     "defaults.workload.params", "'alpha'", True),
    ("workload-check", _grid(workload={"name": "zipf", "params": {"s": -1}}), "grid.workload.params",
     "s must be >= 0", False),
    ("unknown-workload-key", _grid(workload=[{"name": "zipf", "lable": "z"}]), "grid.workload[0].lable",
     "did you mean 'label'?", True),
    ("duplicate-workload", _grid(workload=["zipf", {"name": "zipf", "params": {"s": 2.0}}]), "grid.workload[1]",
     "duplicate workload label 'zipf' (also grid.workload[0])", False),
    ("missing-workload", lambda d: d["grid"].pop("workload"), "grid.workload", "missing required axis 'workload'", True),
    ("unknown-drop-policy", _grid(drop_policy=["position", "prob"]), "grid.drop_policy[1]",
     "unknown drop policy 'prob'; did you mean 'probs'?", True),
    ("unknown-dtype", _grid(dtype=["float32", "float64"]), "grid.dtype[1]", "unknown dtype 'float64'", True),
    ("unknown-device", _set("defaults", device="gpu"), "defaults.device", "unknown device 'gpu'", True),
    ("unknown-grid-axis", _grid(tokns=[1]), "grid.tokns", "unknown key 'tokns'; did you mean 'tokens'?", True),
    ("empty-grid-list", _grid(seed=[]), "grid.seed", "empty list: give at least one value", True),
    ("list-in-defaults", _set("defaults", seed=[1, 2]), "defaults.seed", "lists of values belong in grid", True),
    ("duplicate-grid-value", _grid(tokens=[64, 64]), "grid.tokens[1]", "duplicate value 64 (also grid.tokens[0])", False),
    ("grid-not-a-mapping", lambda d: d.update(grid=7), "grid", "expected a mapping, got 7", True),
    ("grid-list-item-not-a-mapping", lambda d: d.update(grid=[1, 2]), "grid[0]", "expected a mapping, got 1", True),
    ("timing-min-rounds-0", _set("timing", min_rounds=0), "timing.min_rounds", "expected an integer >= 1, got 0", True),
    ("timing-max-below-min", _set("timing", max_rounds=1), "timing.max_rounds",
     "expected an integer >= min_rounds (2), got 1", False),
    ("timing-threads-0", _set("timing", threads=0), "timing.threads",
     "expected an integer >= 1 or null (all cores), got 0", True),
    ("timing-enabled-int", _set("timing", enabled=1), "timing.enabled", "expected a boolean, got 1", True),
    ("timing-negative-time", _set("timing", min_time_s=-0.1), "timing.min_time_s", "expected a number >= 0", True),
    ("timing-unknown-key", _set("timing", warmup=3), "timing.warmup", "did you mean 'warmup_rounds'?", True),
    ("yaml-syntax", "name: x\nversion: 1\ngrid: {tokens: [1, 2}\n", "<yaml>", "line 3", None),
    ("yaml-duplicate-key", "name: x\nversion: 1\nname: y\n", "<yaml>", "line 3, column 1: found duplicate key 'name'", None),
    ("yaml-python-object", "name: !!python/object/apply:os.system ['true']\n", "<yaml>", "could not determine a constructor", None),
]


@pytest.mark.parametrize(("change", "field", "fragment"), [b[1:4] for b in BAD], ids=[b[0] for b in BAD])
def test_malformed_suite_is_one_clear_line(tmp_path, change, field, fragment):
    path = write(tmp_path / "bad.yaml", change if isinstance(change, str) else mutate(change))
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    err = info.value
    assert (err.file, err.field or "<top level>") == (path, field)
    assert fragment in err.message
    assert str(err) == f"{path}: {field}: {err.message}"
    assert "\n" not in str(err)


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    assert str(info.value) == f"{path}: <file>: file not found"


# --- JSON Schema --------------------------------------------------------------------------------


def test_schema_accepts_good_suites(tmp_path, schema_validator):
    schema_validator.validate(GOOD)
    write(tmp_path / "base.yaml", BASE)
    child = {"include": "base.yaml", "name": "child", "version": 1}
    schema_validator.validate(child)  # a file with include may leave required fields to its includes
    schema_validator.validate(load_document(write(tmp_path / "child.yaml", child)))


def test_schema_accepts_shipped_suites(schema_validator):
    files = sorted(SUITES_DIR.glob("*.yaml"))
    if not files:
        pytest.skip("no suites/*.yaml yet")
    for file in files:
        load_suite(file)
        schema_validator.validate(load_document(file))


@pytest.mark.parametrize("change", [b[1] for b in BAD if b[4]], ids=[b[0] for b in BAD if b[4]])
def test_schema_rejects_what_the_validator_rejects(change, schema_validator):
    doc = yaml.safe_load(change) if isinstance(change, str) else mutate(change)
    assert not schema_validator.is_valid(doc)


def test_schema_has_enums_and_typed_params():
    schema = suite_json_schema()
    router = schema["$defs"]["router"]["anyOf"]
    assert {"switch", "topk", "deepseek"} <= set(router[0]["enum"])
    topk = next(r["then"] for r in router[1]["allOf"] if r["if"]["properties"]["name"]["const"] == "topk")
    props = topk["properties"]["params"]["properties"]
    assert props["renormalize"] == {"type": "boolean", "default": False}
    assert props["score"]["enum"] == ["softmax", "sigmoid"]
    assert props["route_scale"]["type"] == "number"
    assert schema["$defs"]["grid"]["properties"]["dtype"]["anyOf"][0] == {"enum": ["float32", "bfloat16", "float16"]}


# --- property: any grid drawn from the valid ranges loads and validates against the schema --------

_axis_values = {
    "tokens": st.integers(1, 10**6),
    "experts": st.integers(8, 256),
    "top_k": st.integers(1, 8),
    "capacity_factor": st.one_of(st.none(), st.floats(0.01, 16, allow_nan=False), st.integers(1, 4)),
    "drop_policy": st.sampled_from(["position", "probs", "bpr", "random"]),
    "min_capacity": st.integers(0, 64),
    "seed": st.integers(0, 2**31),
    "dtype": st.sampled_from(["float32", "bfloat16", "float16"]),
}


@functools.cache
def _cached_validator():
    return jsonschema.Draft202012Validator(suite_json_schema())


@settings(max_examples=40, deadline=None)
@given(st.fixed_dictionaries({k: st.lists(v, min_size=1, max_size=2) for k, v in _axis_values.items()}))
def test_random_valid_grids_load_and_match_the_schema(grid):
    # repeated values are an error by design: drop them (1 and 1.0 are the same capacity factor)
    grid = {k: list(dict.fromkeys(v)) for k, v in grid.items()}
    doc = {"name": "prop", "version": 1, "grid": {"workload": "uniform", **grid}, "routers": ["topk"]}
    suite = validate_document(doc, "prop.yaml")
    assert len(suite.cases) == math.prod(len(v) for v in grid.values())
    _cached_validator().validate(doc)
