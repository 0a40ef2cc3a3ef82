"""A suite refused for a reason that needs no torch is refused without importing it (#23 item 12).

`moebench validate F` and `moebench run F` read the file and check its fields before anything
imports torch, scipy, numba or pandas: the registries' names are known from tables (checked
here against the loaded registries), and a built-in name given no options builds with its
defaults (checked here for every built-in). A check that needs a class (a router's options)
still loads the registry, but only after every other check (of the grid, timing and the
`train:` / `parallel:` blocks) passed, and an accepted suite validates and runs as before.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moebench.core.case import DROP_POLICY_NAMES, MODES
from moebench.core.workload_registry import BUILTIN as WORKLOAD_TABLE, WORKLOADS
from moebench.routers.registry import BUILTIN as ROUTER_TABLE, ROUTERS

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "scipy", "numba", "pandas")
GOOD = {
    "name": "light",
    "version": 1,
    "grid": {"workload": "uniform", "tokens": 16, "experts": 4, "top_k": 1},
    "routers": ["topk"],
    "timing": {"warmup_rounds": 0, "min_rounds": 1, "max_rounds": 1, "min_time_s": 0.0, "isolate": False},
}


def cli(argv: list[str], cwd: Path) -> tuple[int, str, str, list[str]]:
    """(exit code, stdout, stderr, heavy modules imported) of the CLI in a fresh interpreter."""
    side = cwd / "heavy.json"
    code = ("import sys, json\nfrom moebench.cli import main\ntry:\n    code = main(sys.argv[2:])\nfinally:\n"
            f"    open(sys.argv[1], 'w').write(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
            "raise SystemExit(code)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(side), *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stdout, proc.stderr, json.loads(side.read_text())


def suite(tmp_path: Path, text: str | bytes | dict, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, dict):
        text = yaml.safe_dump(text, sort_keys=False)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def changed(section: str | None, key: str, value) -> dict:
    doc = json.loads(json.dumps(GOOD))
    (doc.setdefault(section, {}) if section else doc)[key] = value
    return doc


LIGHT = {  # refusals that need no torch, and the end of their one line
    "bad-yaml": ("name: [x\n", "while parsing a flow sequence"),
    "binary": (b"\x00\x01\x02name", "binary"),
    "unknown-field": (changed(None, "gird", 1), "unknown key 'gird'; did you mean 'grid'?"),
    "wrong-type": (changed("grid", "tokens", "many"), "grid.tokens: expected an integer > 0, got 'many'"),
    "out-of-range": (changed("grid", "hidden", 10**9), "grid.hidden: expected an integer <= 131072"),
    "timing-range": (changed("timing", "min_time_s", -1), "timing.min_time_s: expected a number >= 0, got -1"),
    "unknown-router": (changed(None, "routers", ["tpok"]), "routers[0]: unknown router 'tpok'; did you mean 'topk'?"),
    "unknown-workload": (changed("grid", "workload", "unifrom"), "unknown workload 'unifrom'; did you mean 'uniform'?"),
    "unknown-drop-policy": (changed("grid", "drop_policy", "prob"), "unknown drop policy 'prob'; did you mean 'probs'?"),
    "unknown-mode": (changed("timing", "mode", "eagr"), "unknown timing mode 'eagr'; did you mean 'eager'?"),
}


TRAIN = {**GOOD, "grid": {"tokens": 16, "experts": 4, "top_k": 1}, "routers": ["switch"],
         "train": {"steps": 2, "task": "teacher"}}
PARALLEL = {**GOOD, "parallel": {"ep": 2}}
MODEL = {**GOOD, "parallel": {"mode": "model", "ep": [2, 4]}}


def block(base: dict, key: str, value, where: str | None = None) -> dict:
    doc = json.loads(json.dumps(base))
    where = where or ("train" if "train" in doc else "parallel")
    (doc[where] if where in ("train", "parallel") else doc)[key] = value
    return doc


BLOCKS = {  # train: and parallel: refusals: every field is checked before torch loads (#23)
    "train-wrong-type": (block(TRAIN, "steps", "x"), "train.steps: expected an integer >= 1, got 'x'"),
    "train-out-of-range": (block(TRAIN, "steps", -5), "train.steps: expected an integer >= 1, got -5"),
    "train-lr-range": (block(TRAIN, "lr", 1e300), "train.lr: expected a number <= 100"),
    "train-seeds": (block(TRAIN, "seeds", [0, "a"]), "train.seeds[1]: expected an integer >= 0, got 'a'"),
    "train-unknown-task": (block(TRAIN, "task", "teachr"), "train.task: unknown task 'teachr'; did you mean 'teacher'?"),
    "train-unknown-optimizer": (block(TRAIN, "optimizer", "adamx"), "unknown optimizer 'adamx'; did you mean 'adam'?"),
    "train-unknown-key": (block(TRAIN, "stpes", 3), "train.stpes: unknown key 'stpes'; did you mean 'steps'?"),
    "train-variant-router": (block(TRAIN, "variants", {"v": {"routers": ["swich"]}}),
                             "train.variants.v.routers[0]: unknown router label 'swich'; did you mean 'switch'?"),
    "train-workload-axis": (block(TRAIN, "grid", {"workload": "uniform", "tokens": 16, "experts": 4, "top_k": 1},
                                  where="top"), "grid.workload: a train suite takes its data from train.task"),
    # a router option needs the class, but the train block's refusal comes first
    "train-before-router-options": (block({**TRAIN, "routers": [{"name": "topk", "params": {"renormalize": "yes"}}]},
                                          "steps", -5), "train.steps: expected an integer >= 1, got -5"),
    "parallel-wrong-type": (block(PARALLEL, "ep", "abc"), "parallel.ep: expected an integer >= 1, got 'abc'"),
    "parallel-timeout-type": (block(PARALLEL, "timeout_s", "x"), "parallel.timeout_s: expected a number"),
    "parallel-out-of-range": (block(PARALLEL, "ffn_hidden", 10**9), "parallel.ffn_hidden: expected an integer <= 262144"),
    "parallel-too-many-ranks": (block(PARALLEL, "ep", 1000), "parallel.ep: expected at most 64 local ranks"),
    "parallel-unknown-placement": (block(PARALLEL, "placement", "eplbb"),
                                   "unknown placement 'eplbb'; did you mean 'eplb'?"),
    "parallel-unknown-policy": (block(PARALLEL, "eplb_policy", "global2"), "unknown EPLB policy 'global2'"),
    "parallel-unknown-backend": (block(PARALLEL, "backend", "mpi"), "unknown backend 'mpi'"),
    "parallel-unknown-key": (block(PARALLEL, "placment", "eplb"), "parallel.placment: unknown key 'placment'"),
    "parallel-nodes": (block(PARALLEL, "nodes", 3), "parallel.nodes: expected a divisor of ep (2), got 3"),
    "parallel-split": (block(PARALLEL, "ep", 32), "parallel.ep: tokens=16 do not split evenly over ep=32 ranks"),
    "model-unknown-profile": (block(MODEL, "profile", "h800"), "unknown hardware profile 'h800'"),
    "model-out-of-range": (block(MODEL, "dispatch_bytes", 2**70), "parallel.dispatch_bytes: expected an integer <= 16"),
    "parallel-before-router-options": (block({**PARALLEL, "routers": [{"name": "topk", "params": {"renormalize": 1}}]},
                                             "ep", 0), "parallel.ep: expected an integer >= 1, got 0"),
}


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("what", list(LIGHT) + list(BLOCKS))
def test_a_light_refusal_imports_no_torch(what, command, tmp_path):
    text, expected = LIGHT[what] if what in LIGHT else BLOCKS[what]
    path = suite(tmp_path, text)
    argv = [command, str(path)] + (["--results", str(tmp_path / "results"), "--no-report"] if command == "run" else [])
    code, out, err, heavy = cli(argv, tmp_path)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and expected in err, err
    assert heavy == [], f"{what}: {command} imported {heavy}"
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("doc", [changed("grid", "top_k", 9), BLOCKS["train-unknown-task"][0],
                                 BLOCKS["parallel-wrong-type"][0]], ids=["grid", "train", "parallel"])
def test_validate_and_run_refuse_with_the_same_line(doc, tmp_path):
    path = suite(tmp_path, doc)
    _, _, validate_err, _ = cli(["validate", str(path)], tmp_path)
    _, _, run_err, _ = cli(["run", str(path), "--results", str(tmp_path / "r"), "--no-report"], tmp_path)
    assert validate_err.split("error: ", 1)[1] == run_err.split("error: ", 1)[1]


@pytest.mark.parametrize("doc, expected", [
    (changed(None, "routers", [{"name": "topk", "params": {"renormalize": "yes"}}]),
     "routers[0].params: option 'renormalize' of router 'topk': expected a boolean"),
    (changed("grid", "workload", "trace"), "grid.workload.params: workload 'trace': path (a trace folder) is required"),
    (block(TRAIN, "task", {"name": "teacher", "params": {"nope": 1}}), "train.task.params: task 'teacher' has no option"),
], ids=["router-option", "workload-without-its-required-option", "task-option"])
def test_options_are_still_checked(doc, expected, tmp_path):
    """An option needs the class: that refusal may load torch, and says what it did."""
    code, _, err, _ = cli(["validate", str(suite(tmp_path, doc))], tmp_path)
    assert code == 2 and expected in err, err


def test_an_accepted_suite_validates_and_runs(tmp_path):
    path = suite(tmp_path, GOOD)
    code, out, err, heavy = cli(["validate", str(path)], tmp_path)
    assert code == 0 and out.strip() == f"ok: {path}: 1 cases x 1 routers", err
    assert heavy == []  # plain names with their defaults: nothing to build
    code, out, err, _ = cli(["run", str(path), "--results", str(tmp_path / "results"), "--no-report"], tmp_path)
    assert code == 0, err
    assert "(1 ok, 0 skipped, 0 errors)" in out


def test_the_name_tables_are_the_registries():
    """The tables the validator reads without torch say exactly what loading registers."""
    def built_in(registry):  # other tests register routers of their own (modules outside moebench)
        return sorted(n for n, cls in registry.classes().items() if cls.__module__.startswith("moebench."))

    assert built_in(ROUTERS) == sorted(n for names in ROUTER_TABLE.values() for n in names)
    assert built_in(WORKLOADS) == sorted(n for names in WORKLOAD_TABLE.values() for n in names)
    from moebench.core.drop_policies import DROP_POLICIES
    from moebench.run.exec_modes import MODES as RUN_MODES

    assert tuple(DROP_POLICIES) == DROP_POLICY_NAMES and RUN_MODES is MODES
    # the train: and parallel: blocks' names (#23): the task table, and the placement, EPLB
    # policy and profile names parallel/spec.py checks, which the torch modules use
    from moebench.kinds.parallel import placement, profiles, spec
    from moebench.kinds.train.task_registry import BUILTIN as TASK_TABLE, TASKS

    assert TASKS.names() == sorted(TASK_TABLE) and sorted(TASKS.classes()) == TASKS.names()
    assert placement.PLACEMENTS is spec.PLACEMENTS and placement.EPLB_POLICIES is spec.EPLB_POLICIES
    assert profiles.PROFILES is spec.PROFILES and set(profiles.BUILTIN) < set(spec.PROFILES)


def test_the_tables_name_the_modules_loading_imports():
    from moebench.core.kinds import plugin_modules
    from moebench.core.workload_registry import MODULE

    assert list(ROUTER_TABLE) == plugin_modules("routers")
    assert list(WORKLOAD_TABLE) == [MODULE, *plugin_modules("workloads")]


def _tasks():
    from moebench.kinds.train.task_registry import TASKS

    return TASKS


@pytest.mark.parametrize("registry", [ROUTERS, WORKLOADS, "tasks"], ids=["router", "workload", "task"])
def test_every_builtin_builds_with_its_defaults(registry):
    registry = _tasks() if registry == "tasks" else registry
    """What lets the validator accept a plain built-in name without building it."""
    for name in registry.names():
        assert (registry.problem(name, {}) is None) == (name not in registry._needs_options), name
