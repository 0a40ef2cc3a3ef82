"""The kinds of case: one `Kind` per kind of case, found through one registry.

A kind is what a suite measures: plain routing (the default), training (`train:`), expert
parallelism (`parallel:`), router traces (a workload, a router and a command, no block of
its own), or a plugin's own. A `Kind` is a plain record of hooks; every hook is optional:

    block     its top-level suite key: parse, axes, cases, JSON schema    (suite/load.py, schema.py)
    rows      the RowResults of one case, one per router                   (run/session.py)
    meta      what it adds to meta.json when a run starts                  (run/session.py)
    launch    hooks around a run under torchrun                            (cli.py `run`)
    section   its report section, and where it goes                        (report/build.py)
    metrics   its row columns with their directions                        (core/metrics.py)
    routers / workloads   modules that register its routers / workloads    (routers/registry.py,
                                                                            core/workloads.py)
    commands  its `moebench` subcommands                                   (cli.py)

Built-in kinds are named by module (`BUILTIN`, imported with importlib, so nothing here, in
`suite` or in `run.session` imports a kind); a package adds one through the entry-point group
``moebench.kinds``, whose entry point names a `Kind` (or a function returning one)::

    [project.entry-points."moebench.kinds"]
    my_kind = "my_package.kind:KIND"

A suite is one kind of case: the kind whose block it has, else plain routing. A kind module
must stay light to import (no torch, no pandas at module level): `moebench` loads every kind
to build its command line. Import what a hook needs inside the hook.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, NoReturn

from moebench.core.errors import MoebenchError

if TYPE_CHECKING:
    import argparse
    from pathlib import Path

    from moebench.core.case import Case, NamedSpec, Suite

ENTRY_POINT_GROUP = "moebench.kinds"
ROUTING = "routing"  # the kind of a suite with no kind's block
# name -> module whose KIND it is, in the order their report sections appear
BUILTIN: dict[str, str] = {
    ROUTING: "moebench.run.routing_kind",
    "train": "moebench.kinds.train.kind",
    "parallel": "moebench.kinds.parallel.kind",
    "traces": "moebench.kinds.traces.kind",
}

Direction = Literal["lower", "higher", "none"]
Fail = Callable[[str, str], NoReturn]


@dataclass(frozen=True)
class Metric:
    """A row column with a direction: name, which way is better, whether the value is
    reproducible bit-for-bit from the seed (deterministic) or a measurement (timing), and what
    it means. A name may hold ``*`` (fnmatch) for a family of columns, e.g. ``model.ep*.layer_ms``."""

    name: str
    direction: Direction
    deterministic: bool
    description: str


@dataclass(frozen=True)
class BlockContext:
    """What a block's ``parse`` may use from the suite being validated.

    fail(field, message): raises the suite's one-line SuiteError (file, field, message).
    named(item, field, registry): a registry name or {name, params, label} mapping, checked.
    routers: the suite's routers (NamedSpec, validated).  document: the whole merged suite."""

    fail: Fail
    named: Callable[[Any, str, Any], "NamedSpec"]
    routers: tuple
    document: dict


@dataclass(frozen=True)
class Block:
    """A kind's top-level suite block.

    key: the top-level key (e.g. ``train``).
    parse(value, ctx): the block's value -> the kind's spec (kept in ``Suite.blocks[kind]``);
        report problems through ``ctx.fail``.
    schema: the JSON schema of the block's value (a looser one is fine: the validator decides).
    axes(spec, document, fail): {axis: [(value, field)]} the block sets for every grid (e.g.
        the train block's tasks are its workloads), or None.
    cases(spec, cases, fail): each grid's expanded cases -> the cases the suite runs (filter,
        rename, or check them and ``fail``), or None.
    supplies: required axes the block may supply (the schema does not require them with it).
    """

    key: str
    parse: Callable[[Any, BlockContext], Any]
    schema: dict = field(default_factory=lambda: {"type": "object"})
    axes: Callable[[Any, dict, Fail], dict] | None = None
    cases: Callable[[Any, list, Fail], list] | None = None
    supplies: tuple[str, ...] = ()


@dataclass(frozen=True)
class Launch:
    """A kind that starts processes of its own under torchrun (`moebench run`).

    follow(suite): called before the run; on a torchrun rank other than 0 it serves rank 0 and
        returns the command's exit code; None: this process runs the session.
    release(suite): called after the run, however it ended (lets waiting ranks go).
    A kind without Launch has independent cases: under torchrun the ranks split them
    (moebench/run/shards.py `torchrun_sweep`)."""

    follow: Callable[["Suite"], int | None]
    release: Callable[["Suite"], None]


Rows = Callable[["Suite", "Case", Any, dict, set, bool], Iterable]
Section = Callable[[Any, "Path"], "str | None"]


@dataclass(frozen=True)
class Kind:
    """One kind of case (see the module docstring for where each hook is used).

    name: the kind's name (``Suite.kind``, ``Suite.blocks`` key).  description: one line.
    block: its top-level suite block, or None.
    rows(suite, case, timing, base_row, skip, quick): the RowResults (moebench/run/runner.py)
        of one case, one per router not in ``skip``; None: plain routing's rows.
    meta(suite, cases): what it adds to a new run's meta.json.
    launch: its hooks around a torchrun launch (see `Launch`).
    section(report_data, out_dir): its report section (Markdown, None to leave it out);
        section_at: "lead" (right after the summary: a kind's own results lead its report) or
        "inputs" (after the provenance, with what the run was given: trace statistics).
    metrics: its row columns with their directions (core/metrics.py `all_metrics`).
    routers / workloads: modules whose import registers its routers / workloads.
    commands(subparsers): adds its `moebench` subcommands (argparse).
    """

    name: str
    description: str = ""
    block: Block | None = None
    rows: Rows | None = None
    meta: Callable[["Suite", list], dict] | None = None
    launch: Launch | None = None
    section: Section | None = None
    section_at: Literal["lead", "inputs"] = "lead"
    metrics: tuple[Metric, ...] = ()
    routers: tuple[str, ...] = ()
    workloads: tuple[str, ...] = ()
    commands: Callable[["argparse._SubParsersAction"], None] | None = None


_KINDS: dict[str, Kind] | None = None
_LOADING = False


def _as_kind(obj: Any, where: str) -> Kind:
    if callable(obj) and not isinstance(obj, Kind):
        obj = obj()
    if not isinstance(obj, Kind):
        raise MoebenchError(f"kind {where}: expected a moebench.core.kinds.Kind, got {type(obj).__name__}")
    return obj


def kinds() -> dict[str, Kind]:
    """Every kind, built-ins first (in `BUILTIN` order), then the ``moebench.kinds`` entry
    points; loaded once. A broken plugin is one MoebenchError line naming it."""
    global _KINDS, _LOADING
    if _KINDS is not None:
        return _KINDS
    if _LOADING:  # a kind module asked for the kinds while being imported: it must not
        raise MoebenchError("the kinds registry was used while a kind was being imported; "
                            "import what a hook needs inside the hook")
    _LOADING = True
    try:
        found: dict[str, Kind] = {}
        for name, module in BUILTIN.items():
            found[name] = _as_kind(importlib.import_module(module).KIND, module)
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                kind = _as_kind(ep.load(), f"plugin {ep.name!r} ({ep.value})")
            except MoebenchError:
                raise
            except Exception as exc:  # a broken plugin gets one clear line, not a traceback
                raise MoebenchError(f"kind plugin {ep.name!r} ({ep.value}) failed to load: {exc}") from None
            if kind.name in found:
                if found[kind.name] == kind:  # the same plugin seen twice on the path
                    continue
                raise MoebenchError(f"kind {kind.name!r} is defined twice (plugin {ep.name!r}: {ep.value})")
            found[kind.name] = kind
        keys: dict[str, str] = {}
        for kind in found.values():
            if kind.block is not None:
                if kind.block.key in keys:
                    raise MoebenchError(f"suite key {kind.block.key!r} is claimed by kinds {keys[kind.block.key]!r} "
                                        f"and {kind.name!r}")
                keys[kind.block.key] = kind.name
        _KINDS = found
    finally:
        _LOADING = False
    return _KINDS


def get(name: str) -> Kind:
    """The kind called ``name``; MoebenchError if there is none (a run of a plugin's kind
    reported where that plugin is not installed)."""
    found = kinds()
    if name not in found:
        raise MoebenchError(f"unknown kind of case {name!r} (is the package that adds it installed?); "
                            f"known: {', '.join(found)}")
    return found[name]


def of(suite: "Suite") -> Kind:
    """The kind of a suite (``Suite.kind``)."""
    return get(getattr(suite, "kind", ROUTING))


def blocks() -> dict[str, Kind]:
    """{top-level suite key: the kind whose block it is}."""
    return {k.block.key: k for k in kinds().values() if k.block is not None}


def plugin_modules(what: Literal["routers", "workloads"]) -> list[str]:
    """Every kind's ``routers`` (or ``workloads``) modules, by name, in kind order."""
    return [module for kind in kinds().values() for module in getattr(kind, what)]


def import_plugins(what: Literal["routers", "workloads"]) -> None:
    """Import every kind's ``routers`` (or ``workloads``) modules, which register themselves:
    how the registries find the built-in plugins without importing a kind."""
    for module in plugin_modules(what):
        importlib.import_module(module)
