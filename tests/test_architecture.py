"""The dependency rules of docs/architecture.md, checked on the imports the source spells out.

The imports are read with `ast` from every .py file under moebench/: module-level and
function-level `import x`, `from x import y` and relative `from . import y` all count (an
import inside a function still runs, and still closes a circle). Imports built from strings
(`importlib.import_module("...")`) and entry points are not seen: they are how a seam finds its
plugins without a static edge.

`RULES` is the one table of rules; docs/architecture.md shows the same rows (checked below).
Each violation prints as ``module -> imported (rule)``.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "moebench"


@dataclass(frozen=True)
class Rule:
    """One dependency rule over the modules of a package.

    source: what the rule constrains, relative to the package: a folder ("core"), each kind
        folder under kinds/ on its own ("kinds.*"), or one module ("run.session").
    only: if set, the package folders (relative names) the source may import besides itself;
        any other module of the package is a violation.
    never: module prefixes the source must not import: package-relative ("run.session"),
        "@other-kind" (any kind other than the source's own), "@any-kind" (any module under
        kinds/<name>/), or a third-party top-level name written with a leading "!" ("!torch").
    text: the rule as docs/architecture.md states it.
    """

    source: str
    text: str
    only: tuple[str, ...] | None = None
    never: tuple[str, ...] = ()


RULES: tuple[Rule, ...] = (
    Rule("core", "core imports no other moebench folder", only=()),
    Rule("routers", "routers imports only core", only=("core",)),
    Rule("peers", "peers imports only routers and core", only=("routers", "core")),
    Rule("store", "store imports only core", only=("core",)),
    Rule("store", "store never imports torch or pandas", never=("!torch", "!pandas")),
    Rule("report", "report never imports run, routers or torch", never=("run", "routers", "!torch")),
    Rule("compare", "compare never imports run, routers or torch", never=("run", "routers", "!torch")),
    Rule("kinds.*", "a kind never imports another kind, run.session or cli",
         never=("@other-kind", "run.session", "cli")),
    Rule("suite", "suite and run.session never import a kind", never=("@any-kind",)),
    Rule("run.session", "suite and run.session never import a kind", never=("@any-kind",)),
)
CIRCLE_RULE = "no import circles"

# Rules the real tree still breaks while #19's restructuring lands: the real-tree test of each
# is an expected failure (strict=False: it turns into a pass, not an error, once fixed).
STILL_VIOLATED: dict[str, str] = {}


# --------------------------------------------------------------------------- the import graph

def modules(package_dir: Path) -> dict[str, Path]:
    """{dotted module name: file} for every .py file under ``package_dir`` (a package's
    __init__.py is the package's own name)."""
    base = package_dir.parent
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(base).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imported_names(module: str, files: dict[str, Path], tree: ast.AST) -> list[str]:
    """Every dotted name an import statement of ``tree`` imports, relative imports resolved:
    ``from a import b`` imports ``a.b`` where that is a module of the package, else ``a``
    (b is then an attribute of a, or a module of a third-party package)."""
    names = []
    is_package = files[module].name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".") if is_package else module.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                full = f"{base}.{alias.name}"
                names.append(full if full in files else base)
    return [n for n in names if n]


@dataclass
class Graph:
    """Edges between the package's modules, and the third-party top-level names each imports."""

    package: str
    files: dict[str, Path]
    edges: dict[str, set[str]]
    external: dict[str, set[str]]


def import_graph(package_dir: Path) -> Graph:
    """The import graph of the package at ``package_dir``.

    A name resolves to the longest module of the package it starts with (``a.b.attr`` -> ``a.b``).
    Two kinds of edge are left out, as Python's own package machinery makes them harmless:
    a package's __init__ importing its direct children (re-exports), and a module importing
    an ancestor package's __init__.
    """
    package = package_dir.name
    files = modules(package_dir)
    edges: dict[str, set[str]] = {m: set() for m in files}
    external: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for name in _imported_names(module, files, tree):
            if name != package and not name.startswith(package + "."):
                external[module].add(name.split(".")[0])
                continue
            target = name
            while target not in files and "." in target:
                target = target.rsplit(".", 1)[0]
            if target not in files or target == module:
                continue
            if files[module].name == "__init__.py" and target.rsplit(".", 1)[0] == module:
                continue  # a package re-exporting its children
            if files[target].name == "__init__.py" and module.startswith(target + "."):
                continue  # a module importing its own ancestor package
            edges[module].add(target)
    return Graph(package, files, edges, external)


def circles(graph: Graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for start in sorted(graph.edges):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


# --------------------------------------------------------------------------- the rules

def folder(graph: Graph, module: str) -> str:
    """The package-relative folder a module belongs to: "core", "run", "kinds.train", ...;
    a module at the top of the package is its own folder ("cli", "metrics"); the package's
    __init__ is ""."""
    parts = module.split(".")[1:]
    if not parts:
        return ""
    if parts[0] == "kinds" and len(parts) > 1 and (graph.files[module].name == "__init__.py" or len(parts) > 2):
        return f"kinds.{parts[1]}"
    return parts[0]


def _applies(rule: Rule, source_folder: str, relative: str | None = None) -> bool:
    """Whether ``rule`` constrains a module of ``source_folder`` (package-relative name ``relative``)."""
    if rule.source.endswith(".*"):
        return source_folder.startswith(rule.source[:-1])
    if "." in rule.source and not rule.source.startswith("kinds."):
        return relative is not None and (relative == rule.source or relative.startswith(rule.source + "."))
    return source_folder == rule.source


def _forbidden(rule: Rule, graph: Graph, source_folder: str, target: str) -> bool:
    """Whether package module ``target`` breaks ``rule`` for a module of ``source_folder``."""
    target_folder = folder(graph, target)
    if target_folder == source_folder:
        return False
    if rule.only is not None and target_folder not in rule.only:
        return True
    relative = target[len(graph.package) + 1:]
    for never in rule.never:
        if never in ("@other-kind", "@any-kind"):
            if target_folder.startswith("kinds.") and target_folder != source_folder:
                return True
        elif not never.startswith("!") and (relative == never or relative.startswith(never + ".")):
            return True
    return False


def shortest_cycle(graph: Graph, component: list[str]) -> list[str]:
    """A shortest import path from the first module of ``component`` back to itself, within it."""
    start, members = component[0], set(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:  # breadth first, so the first return to start is a shortest one
        following = []
        for node in frontier:
            for child in sorted(graph.edges[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return path[::-1] + [start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{start} is on no circle")  # pragma: no cover (a component is a circle)


def violations_by_rule(graph: Graph, rules=RULES) -> list[tuple[str, str]]:
    """(rule text, line) for every violation: ``module -> imported (rule)``; a circle as
    ``a -> b -> a (no import circles)``, a shortest cycle through its first module, followed by
    ``[also in this circle: ...]`` when the strongly connected component holds more modules."""
    out = []
    for module in sorted(graph.files):
        source_folder = folder(graph, module)
        relative = module[len(graph.package) + 1:]
        for rule in rules:
            if not _applies(rule, source_folder, relative):
                continue
            for target in sorted(graph.edges[module]):
                if _forbidden(rule, graph, source_folder, target):
                    out.append((rule.text, f"{module} -> {target} ({rule.text})"))
            for name in sorted(graph.external[module]):
                if f"!{name}" in rule.never:
                    out.append((rule.text, f"{module} -> {name} ({rule.text})"))
    for component in circles(graph):
        cycle = shortest_cycle(graph, component)
        rest = [m for m in component if m not in cycle]
        line = " -> ".join(cycle) + f" ({CIRCLE_RULE})"
        out.append((CIRCLE_RULE, line + (f" [also in this circle: {', '.join(rest)}]" if rest else "")))
    return out


def violations(graph: Graph, rules=RULES) -> list[str]:
    """Every violation's line (see `violations_by_rule`)."""
    return [line for _, line in violations_by_rule(graph, rules)]


# --------------------------------------------------------------------------- the real tree

@pytest.fixture(scope="module")
def real_graph() -> Graph:
    return import_graph(ROOT / PACKAGE)


def _report(lines: list[str]) -> str:
    return f"{len(lines)} violation(s):\n" + "\n".join(lines)


def _maybe_xfail(text: str):
    reason = STILL_VIOLATED.get(text)
    return [pytest.mark.xfail(strict=False, reason=reason)] if reason else []


@pytest.mark.parametrize("text", [
    pytest.param(text, marks=_maybe_xfail(text), id=text)
    for text in dict.fromkeys([r.text for r in RULES] + [CIRCLE_RULE])
])
def test_real_tree_keeps_rule(real_graph, text):
    found = [line for rule, line in violations_by_rule(real_graph) if rule == text]
    print("\n".join(found))
    assert not found, _report(found)


def test_every_rule_folder_exists(real_graph):
    """A rule about a folder that was renamed away would pass vacuously."""
    places = {(folder(real_graph, m), m[len(PACKAGE) + 1:]) for m in real_graph.files}
    for rule in RULES:
        assert any(_applies(rule, f, m) for f, m in places), f"rule {rule.text!r}: no folder or module {rule.source}"


def test_docs_show_the_same_rules():
    """docs/architecture.md's dependency table lists exactly the rules of RULES (and circles)."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("## Dependency rules", 1)
    assert len(section) == 2, "docs/architecture.md has no '## Dependency rules' section"
    body = section[1].split("\n## ", 1)[0]
    rows = [m.group(1).strip() for m in re.finditer(r"^\|([^|]+)\|", body, re.M)]
    stated = [r for r in rows if r and not set(r) <= set("-: ") and r != "rule"]
    expected = list(dict.fromkeys([r.text for r in RULES] + [CIRCLE_RULE]))
    assert stated == expected, f"docs/architecture.md states {stated}, tests/test_architecture.py {expected}"


def _names_something(graph: Graph, dotted: str) -> bool:
    """Whether ``dotted`` is a module of the package, or a module followed by one name that
    its source mentions (``moebench.core.metrics.direction``, ``moebench.routers.register``)."""
    parts = dotted.split(".")
    if dotted in graph.files:
        return True
    owner = ".".join(parts[:-1])
    return owner in graph.files and re.search(rf"\b{parts[-1]}\b", graph.files[owner].read_text(encoding="utf-8")) is not None


def test_docs_name_only_existing_modules(real_graph):
    """Every `moebench/...` path and `moebench.x.y` module the README and docs/*.md name exists
    (a moved module leaves no stale pointer behind)."""
    stale = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        for path in re.findall(r"(?<![\w/.-])(moebench/[\w/]*\w(?:\.py)?)", text):
            if not (ROOT / path).exists():
                stale.append(f"{doc.name}: {path}")
        for dotted in re.findall(r"(?<![\w/.-])(moebench(?:\.\w+)+)", text):
            if not _names_something(real_graph, dotted):
                stale.append(f"{doc.name}: {dotted}")
    assert not stale, "docs name modules that do not exist:\n" + "\n".join(stale)


# --------------------------------------------------------------------------- planted violations

def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    """A fake package ``fakepkg`` under tmp_path with the given files (and every __init__.py)."""
    root = tmp_path / "fakepkg"
    for rel, source in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")
    for directory in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    return root


CLEAN = {
    "core/case.py": "import torch\n",
    "core/metrics.py": "from .case import x\n",
    "routers/base.py": "from fakepkg.core.case import x\nfrom . import util\n",
    "routers/util.py": "import numpy\n",
    "peers/a.py": "from fakepkg.routers import base\nfrom fakepkg.core import metrics\n",
    "store/runs.py": "import json\nimport numpy as np\nfrom fakepkg.core import case\n",
    "report/build.py": "import pandas\nfrom fakepkg.store import runs\n",
    "compare/verdicts.py": "from fakepkg.core.metrics import x\n",
    "kinds/train/loop.py": "from fakepkg.run import runner\nfrom fakepkg.routers import base\nfrom . import spec\n",
    "kinds/train/spec.py": "from fakepkg.core import case\n",
    "kinds/parallel/engine.py": "from ...core import case\n",
    "run/session.py": "from fakepkg.store import runs\nfrom fakepkg.core import kinds\n",
    "run/runner.py": "from fakepkg.core import case\n",
    "run/routing_kind.py": "from fakepkg.kinds import registry\n",  # only run.session is held to no kinds
    "kinds/registry.py": "from fakepkg.core import kinds\n",
    "suite/load.py": "from fakepkg.core import kinds\nfrom fakepkg.routers.base import y\n",
    "core/kinds.py": "import importlib\n",
    "cli.py": "from fakepkg.run import session\n",
}


def test_clean_fake_package_has_no_violation(tmp_path):
    graph = import_graph(_package(tmp_path, CLEAN))
    assert violations(graph) == []


def test_planted_violations_are_each_reported(tmp_path):
    planted = dict(CLEAN)
    planted.update({
        # core importing run: at module level, and (relative) inside a function
        "core/metrics.py": "from fakepkg.run.runner import x\n",
        "core/case.py": "def f():\n    from ..run import session\n",
        "routers/base.py": "import fakepkg.store.runs\n",
        "store/runs.py": "import pandas as pd\nfrom torch import nn\n",
        "report/build.py": "def plot():\n    import torch\n    from fakepkg.routers import base\n",
        "compare/verdicts.py": "from fakepkg.run import runner\n",
        "kinds/train/loop.py": "from fakepkg.kinds.parallel import engine\nfrom fakepkg.run.session import go\n",
        "kinds/parallel/engine.py": "from ... import cli\n",
        "suite/load.py": "from fakepkg.kinds.train.spec import parse\n",
        "run/session.py": "def rows():\n    from fakepkg.kinds.parallel import engine\n",
        # a two-module circle, closed inside a function
        "run/a.py": "from fakepkg.run import b\n",
        "run/b.py": "def later():\n    import fakepkg.run.a\n",
    })
    found = violations(import_graph(_package(tmp_path, planted)))
    print("\n".join(found))
    expected = [
        "fakepkg.core.metrics -> fakepkg.run.runner (core imports no other moebench folder)",
        "fakepkg.core.case -> fakepkg.run.session (core imports no other moebench folder)",
        "fakepkg.routers.base -> fakepkg.store.runs (routers imports only core)",
        "fakepkg.store.runs -> pandas (store never imports torch or pandas)",
        "fakepkg.store.runs -> torch (store never imports torch or pandas)",
        "fakepkg.report.build -> torch (report never imports run, routers or torch)",
        "fakepkg.report.build -> fakepkg.routers.base (report never imports run, routers or torch)",
        "fakepkg.compare.verdicts -> fakepkg.run.runner (compare never imports run, routers or torch)",
        "fakepkg.kinds.train.loop -> fakepkg.kinds.parallel.engine (a kind never imports another kind, run.session or cli)",
        "fakepkg.kinds.train.loop -> fakepkg.run.session (a kind never imports another kind, run.session or cli)",
        "fakepkg.kinds.parallel.engine -> fakepkg.cli (a kind never imports another kind, run.session or cli)",
        "fakepkg.suite.load -> fakepkg.kinds.train.spec (suite and run.session never import a kind)",
        "fakepkg.run.session -> fakepkg.kinds.parallel.engine (suite and run.session never import a kind)",
        "fakepkg.run.a -> fakepkg.run.b -> fakepkg.run.a (no import circles)",
        # the planted session -> kind -> cli imports close a circle with cli -> session
        "fakepkg.cli -> fakepkg.run.session -> fakepkg.kinds.parallel.engine -> fakepkg.cli (no import circles)",
    ]
    for line in expected:
        assert line in found, f"not reported: {line}"
    assert len(found) == len(expected), _report(sorted(set(found) - set(expected)))


def test_circle_through_three_folders_is_one_component(tmp_path):
    files = {
        "core/a.py": "from fakepkg.suite import b\n",
        "suite/b.py": "def f():\n    from fakepkg.run import c\n",
        "run/c.py": "from fakepkg.core.a import thing\n",
        "run/d.py": "from fakepkg.run import c\n",  # reaches the circle but is not on it
    }
    assert circles(import_graph(_package(tmp_path, files))) == [
        ["fakepkg.core.a", "fakepkg.run.c", "fakepkg.suite.b"]
    ]


if __name__ == "__main__":  # python tests/test_architecture.py: print the real tree's violations
    lines = violations(import_graph(ROOT / PACKAGE))
    print("\n".join(lines) or "no violations")
    sys.exit(1 if lines else 0)
