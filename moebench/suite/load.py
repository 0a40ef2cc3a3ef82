"""Suite files: YAML -> merged document -> validated, expanded `Suite` (docs/architecture.md, data flow).

``load_suite(path)`` is ``validate_document(load_document(path))``; reading the YAML and its
includes is `moebench.suite.files`. Every problem raises a
one-line `SuiteError` naming the file, the field path (dots and ``[i]``) and what was expected.
The field rules live in two tables, `AXES` and `TIMING`, which schema.py also reads, so the
validator and the JSON Schema cannot drift apart. A kind's block (``train:``, ``parallel:``, a
plugin's) is parsed, and may set axes and filter cases, through its `Kind.block` hooks
(moebench/core/kinds.py): this module imports no kind.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any


# nothing here imports torch (#23): a suite refused for its fields is refused at once; the
# registries load (and torch with them) only for a check that needs a class (options), and
# only once every check that needs none (of every block: train:, parallel:, ...) has passed
from moebench.run.allocator import ALLOCATORS
from moebench.core.case import DROP_POLICY_NAMES, MODES, Case, NamedSpec, Suite, TimingSpec, case_fields
from moebench.core.errors import SuiteError, UnknownNameError, did_you_mean
from moebench.core.paths import FOLDER_NAME, MAX_NAME_CHARS, folder_name_problem
from moebench.suite.files import include_list, read_suite_file, show
from moebench.suite.rules import Rule
from moebench.core.registry import Registry
from moebench.routers.registry import ROUTERS
from moebench.core.workload_registry import WORKLOADS
from moebench.core import kinds

NAME_PATTERN = FOLDER_NAME  # suite names end up in result directory names: never '.', '..' or 'a/b'
LABEL_PATTERN = rf"[A-Za-z0-9_.+=-]{{1,{MAX_NAME_CHARS}}}"  # labels end up in case ids and table columns
MAX_DESCRIPTION_CHARS = 10_000
MAX_MESSAGE_CHARS = 300  # an error quoting a long value stays a readable line
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")
SUITE_KEYS = ("name", "version", "description", "include", "defaults", "grid", "routers", "timing")


def top_level_keys() -> tuple[str, ...]:
    """Every key a suite file may have at its top: the suite's own, then each kind's block
    (``train``, ``parallel``, a plugin's; moebench/core/kinds.py)."""
    return SUITE_KEYS + tuple(kinds.blocks())


def __getattr__(name: str):
    if name == "TOP_LEVEL_KEYS":  # built on first use: the kinds load then, not on import
        return top_level_keys()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

SPEC_KEYS = ("name", "params", "label")
MAX_CASES = 100_000  # a typo like `tokens: [1, 2, ..., 4096]` should fail fast, not hang


# Axes in Case field order (the expansion order). Defaults match Case's, except that Case has
# no default capacity factor; a suite that never names one gets 1.25.
AXES: dict[str, Rule] = {
    "workload": Rule("workload", required=True),
    "tokens": Rule("int", 0, exclusive=True, required=True, maximum=2**26),
    "experts": Rule("int", 2, required=True, maximum=2**17),
    "top_k": Rule("int", 1, required=True, maximum=2**17),
    "capacity_factor": Rule("number", 0, exclusive=True, nullable=True, what="dropless", default=1.25, maximum=1e6),
    "drop_policy": Rule("choice", choices=DROP_POLICY_NAMES, what="drop policy", default="position"),
    "min_capacity": Rule("int", 0, default=0, maximum=2**31),
    "capacity_multiple": Rule("int", 1, default=1, maximum=2**20),
    "hidden": Rule("int", 1, default=64, maximum=2**17),
    "dtype": Rule("choice", choices=DTYPES, what="dtype", default="float32"),
    "device": Rule("choice", choices=DEVICES, what="device", default="cpu"),
    "seed": Rule("int", 0, default=0, maximum=2**63 - 1),
    "batches": Rule("int", 1, default=1, maximum=100_000),
}
if tuple(AXES) != case_fields():  # the Case dataclass is the one list of axes: each needs a rule here
    raise TypeError(f"suite AXES {tuple(AXES)} do not match the Case fields {case_fields()}")

TIMING: dict[str, Rule] = {
    "warmup_rounds": Rule("int", 0, maximum=10**6),
    "min_rounds": Rule("int", 1, maximum=10**6),
    "max_rounds": Rule("int", 1, maximum=10**7),
    "min_time_s": Rule("number", 0, maximum=86_400),
    "threads": Rule("int", 1, nullable=True, what="all cores", maximum=4096),
    "enabled": Rule("bool"),
    "cpu_memory": Rule("bool"),
    "mode": Rule("choice", choices=MODES, what="timing mode"),
    "cpu_allocator": Rule("choice", choices=ALLOCATORS, what="CPU allocator"),
    "timeout_s": Rule("number", 0, exclusive=True, nullable=True, what="no limit", maximum=30 * 86_400),
    "isolate": Rule("bool"),
}


def load_document(path: str | Path) -> dict:
    """The suite at ``path`` with its includes merged in (``include`` removed), not validated.

    Raises SuiteError for a missing file, bad YAML, a bad include or an include cycle. The
    result is not necessarily a mapping when the file itself is not one.
    """
    return read_suite_file(Path(path), str(path))[0]


def load_suite(path: str | Path) -> Suite:
    """Load, merge, validate and expand the suite at ``path``; raises SuiteError."""
    document, origins = read_suite_file(Path(path), str(path))
    return validate_document(document, str(path), origins)


def validate_document(document: Any, file: str, origins: dict[str, str] | None = None) -> Suite:
    """Validate a merged suite document and expand its grid.

    file: the suite's path as the user gave it (used in errors and as ``Suite.path``).
    origins: dotted key path -> file it came from (from includes), for error messages.
    """
    return _Validator(str(file), origins or {}).suite(document)


# ---------------------------------------------------------------------------------------------
# Validation and expansion


class _Validator:
    def __init__(self, file: str, origins: dict[str, str]):
        self.file = file
        self.origins = origins
        # (registry, name, name field, field, params) of the specs that need their class to be
        # checked: run by `class_checks` after every light check (#23)
        self.deferred: list[tuple[Registry, str, str, str, dict]] = []

    def fail(self, field: str, message: str):
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 3] + "..."
        raise SuiteError(self.origin(field), field, message)

    def origin(self, field: str) -> str:
        """The file that set ``field`` (longest key-path prefix with a known origin)."""
        parts = re.split(r"(?=[.\[])", field)
        for n in range(len(parts), 0, -1):
            file = self.origins.get("".join(parts[:n]))
            if file:
                return file
        return self.file

    def mapping(self, value: Any, field: str, allowed) -> dict:
        if not isinstance(value, dict):
            self.fail(field, f"expected a mapping, got {show(value)}")
        for key in value:
            if key not in allowed:
                path = f"{field}.{key}" if field else str(key)
                hint = did_you_mean(str(key), list(allowed))
                origin = self.origin(path)
                if origin != self.file and not hint.startswith("; did you mean"):
                    # an included file that is no suite file (a config, a secret): its keys are not shown
                    self.fail(field, f"unknown key (not shown: {origin} may not be a suite file){hint}")
                self.fail(path, f"unknown key {show(key)}{hint}")
        return value

    def suite(self, doc: Any) -> Suite:
        if doc is None:
            self.fail("", "the file is empty; expected a mapping of suite fields")
        if not isinstance(doc, dict):
            self.fail("", f"expected a mapping of suite fields, got {show(doc)}")
        self.mapping(doc, "", top_level_keys())
        for key in ("name", "version", "routers"):
            if key not in doc:
                self.fail(key, "missing required field")
        name, version, description = doc["name"], doc["version"], doc.get("description", "")
        problem = folder_name_problem(name)
        if problem:
            self.fail("name", f"{problem}, got {show(name)}")
        problem, _ = Rule("int", 1, maximum=2**31).check(version)
        if problem:
            self.fail("version", problem)
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
            self.fail("description", f"expected a string of at most {MAX_DESCRIPTION_CHARS} characters, "
                      f"got {show(description) if not isinstance(description, str) else f'{len(description)} characters'}")
        if "include" in doc:  # normally resolved by load_document; a direct caller gets it checked
            include_list(doc["include"], self.file)
        routers = self.routers(doc["routers"])
        timing = self.timing(doc.get("timing", {}))  # before the grid: a refusal never waits for its expansion
        kind, block = self.block(doc, routers)
        cases = self.cases(doc, kind, block)
        self.class_checks()  # last: these load the registries (torch)
        sha256 = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()
        return Suite(name, version, description, self.file, doc, sha256, routers, cases, timing,
                     kind=kind.name, blocks={kind.name: block} if kind.block is not None else {})

    def block(self, doc: dict, routers: tuple[NamedSpec, ...]) -> tuple[kinds.Kind, Any]:
        """The suite's kind (the one whose block it has, else plain routing) and its parsed block."""
        present = [(key, kind) for key, kind in kinds.blocks().items() if key in doc]
        if len(present) > 1:
            keys = [key for key, _ in present]
            self.fail(keys[1], f"a suite is one kind of case: give only one of {', '.join(keys)}")
        if not present:
            return kinds.get(kinds.ROUTING), None
        key, kind = present[0]
        context = kinds.BlockContext(self.fail, self.named, routers, doc)
        return kind, kind.block.parse(doc[key], context)

    def named(self, item: Any, field: str, registry: Registry) -> NamedSpec:
        """A registry name, or a {name, params, label} mapping, checked against ``registry``."""
        kind = registry.kind
        params: Any = {}
        label: Any = ""
        if isinstance(item, dict):
            self.mapping(item, field, SPEC_KEYS)
            if "name" not in item:
                self.fail(f"{field}.name", "missing required field")
            name, name_field = item["name"], f"{field}.name"
            params = {} if item.get("params") is None else item["params"]
            label = item.get("label", "")
            if not isinstance(params, dict):
                self.fail(f"{field}.params", f"expected a mapping of {kind} options, got {show(params)}")
            if "label" in item and not (isinstance(label, str) and re.fullmatch(LABEL_PATTERN, label)):
                self.fail(f"{field}.label", f"expected a label of 1 to {MAX_NAME_CHARS} letters, digits and _.+=-, "
                          f"got {show(label)}")
        elif isinstance(item, str):
            name, name_field = item, field
        else:
            self.fail(field, f"expected a {kind} name or a mapping of name/params/label, got {show(item)}")
        if not isinstance(name, str):
            self.fail(name_field, f"expected a {kind} name, got {show(name)}")
        known = registry.names()  # without loading the registry (torch) where no plugin can add names
        if known is not None and name not in known:
            self.fail(name_field, str(UnknownNameError(kind, name, known)))
        if not registry.builds_unloaded(name, params):  # not a built-in name with its defaults
            self.deferred.append((registry, name, name_field, field, params))
        return NamedSpec(name, dict(params), label)

    def class_checks(self) -> None:
        """The checks of `named` that need the class (a name only loading can tell, options):
        they load the registry, and torch with it, so they run after every other check (#23)."""
        for registry, name, name_field, field, params in self.deferred:
            try:
                registry.get(name)
            except UnknownNameError as exc:
                self.fail(name_field, str(exc))
            problem = registry.problem(name, params)
            if problem:
                self.fail(f"{field}.params", problem)

    def routers(self, value: Any) -> tuple[NamedSpec, ...]:
        if not isinstance(value, list) or not value:
            self.fail("routers", f"expected a non-empty list of routers, got {show(value)}")
        specs: list[NamedSpec] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(value):
            spec = self.named(item, f"routers[{i}]", ROUTERS)
            if spec.display in seen:
                self.fail(
                    f"routers[{i}].label",
                    f"duplicate label {spec.display!r} (also routers[{seen[spec.display]}]); "
                    "give each router a distinct label",
                )
            seen[spec.display] = i
            specs.append(spec)
        return tuple(specs)

    def axis_values(self, value: Any, field: str, rule: Rule, listable: bool) -> list[tuple[Any, str]]:
        """[(normalised value, field path)] of one axis; a list only in grid."""
        if isinstance(value, list):
            if not listable:
                self.fail(field, "expected a single value (lists of values belong in grid)")
            if not value:
                self.fail(field, "empty list: give at least one value")
            items = [(v, f"{field}[{j}]") for j, v in enumerate(value)]
        else:
            items = [(value, field)]
        out: list[tuple[Any, str]] = []
        seen: dict[str, str] = {}
        for raw, path in items:
            if rule.kind == "workload":
                value_ = self.named(raw, path, WORKLOADS)
                key = value_.display
            else:
                problem, value_ = rule.check(raw)
                if problem:
                    self.fail(path, problem)
                key = json.dumps(value_)
            if key in seen:  # a repeated value would repeat cases (and their ids)
                if rule.kind == "workload":
                    self.fail(path, f"duplicate workload label {key!r} (also {seen[key]}); give each a distinct label")
                self.fail(path, f"duplicate value {key} (also {seen[key]}); give each value once")
            seen[key] = path
            out.append((value_, path))
        return out

    def cases(self, doc: dict, kind: kinds.Kind, block: Any = None) -> tuple[Case, ...]:
        """The expanded grid. ``grid`` is one mapping of axes, or a list of them (a union of
        grids, e.g. tokens swept at one E and E swept at one T); repeated cases appear once."""
        defaults = self.mapping(doc.get("defaults", {}), "defaults", AXES)
        given = {a: self.axis_values(v, f"defaults.{a}", AXES[a], listable=False) for a, v in defaults.items()}
        hooks = kind.block
        if hooks is not None and hooks.axes is not None:  # e.g. a train suite's tasks are its workloads
            given.update(hooks.axes(block, doc, self.fail))
        grid = doc.get("grid", {})
        if isinstance(grid, list):
            if not grid:
                self.fail("grid", "empty list: give at least one grid")
            grids = [self.grid_axes(g, f"grid[{i}]", given) for i, g in enumerate(grid)]
        else:
            grids = [self.grid_axes(grid, "grid", given)]
        # counted before anything is expanded: a list of grids (or of aliases to one) cannot
        # make millions of cases before it is refused
        total = sum(math.prod(len(v) for v in axes.values()) for axes in grids)
        if total > MAX_CASES:
            self.fail("grid", f"expands to {total} cases (before removing repeats); at most {MAX_CASES} are allowed")
        parts = [self.expand(axes) for axes in grids]
        if hooks is not None and hooks.cases is not None:  # e.g. the cases a train suite trains, or checked
            parts = [hooks.cases(block, part, self.fail) for part in parts]
        unique = {c.case_id: c for part in parts for c in part}
        if len(unique) > MAX_CASES:
            self.fail("grid", f"expands to {len(unique)} cases; at most {MAX_CASES} are allowed")
        return tuple(unique.values())

    def grid_axes(self, grid: Any, field: str, defaults: dict) -> dict[str, list[tuple[Any, str]]]:
        """The validated values of every axis of one grid (not expanded)."""
        grid = self.mapping(grid, field, AXES)
        given = dict(defaults)
        given.update({a: self.axis_values(v, f"{field}.{a}", AXES[a], listable=True) for a, v in grid.items()})
        axes: dict[str, list[tuple[Any, str]]] = {}
        for axis, rule in AXES.items():
            if axis in given:
                axes[axis] = given[axis]
            elif rule.required:
                self.fail(f"{field}.{axis}", f"missing required axis {axis!r} (give it in grid or defaults)")
            else:
                axes[axis] = [(rule.default, "")]
        for k, k_field in axes["top_k"]:
            for e, e_field in axes["experts"]:
                if k > e:
                    self.fail(k_field, f"expected an integer <= experts ({e}, from {e_field}), got {k}")
        count = math.prod(len(v) for v in axes.values())
        if count > MAX_CASES:
            self.fail(field, f"expands to {count} cases; at most {MAX_CASES} are allowed")
        return axes

    @staticmethod
    def expand(axes: dict[str, list[tuple[Any, str]]]) -> list[Case]:
        names = list(AXES)
        return [
            Case(**{n: v for n, (v, _) in zip(names, combo)}) for combo in itertools.product(*(axes[n] for n in names))
        ]

    def timing(self, value: Any) -> TimingSpec:
        given = self.mapping(value, "timing", TIMING)
        fields = {}
        for key, raw in given.items():
            problem, fields[key] = TIMING[key].check(raw)
            if problem:
                self.fail(f"timing.{key}", problem)
        spec = TimingSpec(**fields)
        low, high = spec.min_rounds, spec.max_rounds
        if high < low:  # blame the field the file gave (both given: max_rounds)
            if "max_rounds" in given:
                self.fail("timing.max_rounds", f"expected an integer >= min_rounds ({low}), got {high}")
            self.fail("timing.min_rounds", f"expected an integer <= max_rounds ({high}), got {low}")
        return spec
