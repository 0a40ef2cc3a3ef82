"""A registry of named, option-carrying classes (routers, workloads) with did-you-mean errors.

Registered classes are frozen dataclasses whose fields are their options, so a suite's
``params`` map onto them one to one and are type-checked from the field annotations.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable, Literal

from moebench.core.errors import MoebenchError, UnknownNameError, did_you_mean


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One option: its name, the Python type expected, its default and its choices."""

    name: str
    type: Any
    default: Any
    choices: tuple | None = None

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        return type_name(self.type)

    def check(self, value: Any) -> str | None:
        """None if ``value`` suits the option, else what was expected."""
        return None if matches(self.type, value) else f"expected {self.describe()}, got {value!r}"


def type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def matches(tp: Any, value: Any) -> bool:
    """isinstance for the annotation forms options use (Literal, unions, bool/int/float/str)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(matches(a, value) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return isinstance(value, tp)


def options_of(cls: type) -> dict[str, OptionSpec]:
    """The options of a registered class, from its dataclass fields."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else None
        out[f.name] = OptionSpec(f.name, tp, f.default, choices)
    return out


class Registry:
    """Named classes of one kind ('router', 'workload'); ``load`` fills it on first use."""

    def __init__(self, kind: str, load: Callable[[], None], builtin: Callable[[], list[str] | None] | None = None,
                 needs_options: tuple[str, ...] = ()):
        """builtin: the names ``load`` registers, told without importing anything heavy (a table
        its test checks against the loaded registry), or None where a plugin could add others.
        needs_options: the built-in names that do not build with their defaults alone."""
        self.kind = kind
        self._load = load
        self._builtin = builtin
        self._needs_options = needs_options
        self._loaded = False
        self._classes: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type], type]:
        """Class decorator: make ``cls`` available under ``name``."""

        def decorate(cls: type) -> type:
            old = self._classes.get(name)
            if old is not None and old.__qualname__ != cls.__qualname__:
                raise MoebenchError(f"{self.kind} {name!r} is registered twice ({old.__module__}, {cls.__module__})")
            cls.name = name
            self._classes[name] = cls
            return cls

        return decorate

    def replace(self, name: str, cls: type) -> None:
        """Put ``cls`` under ``name``, replacing any class there: an isolated worker mirroring a
        class the parent process registered by hand (``register`` refuses a second class)."""
        cls.name = name
        self._classes[name] = cls

    def classes(self) -> dict[str, type]:
        if not self._loaded:
            self._loaded = True
            self._load()
        return dict(sorted(self._classes.items()))

    def names(self) -> list[str] | None:
        """Every name, without loading the registry where its built-in table says them all (no
        plugin); None where only loading can tell. A suite naming an unknown router or workload
        is refused before torch loads (#23)."""
        if self._loaded:
            return sorted(self._classes)
        builtin = self._builtin() if self._builtin is not None else None
        return None if builtin is None else sorted({*builtin, *self._classes})

    def builds_unloaded(self, name: str, params: dict | None) -> bool:
        """True when ``name`` with ``params`` is known to build without loading the registry: a
        built-in name given no options builds with its defaults (the registry's test builds
        every built-in so, but those of ``needs_options``). False means: ask `problem`."""
        if params or self._loaded or self._builtin is None or name in self._needs_options:
            return False
        return name in (self._builtin() or ())

    def get(self, name: str) -> type:
        classes = self.classes()
        if name not in classes:
            raise UnknownNameError(self.kind, name, list(classes))
        return classes[name]

    def problem(self, name: str, params: dict | None) -> str | None:
        """None if ``name`` with ``params`` builds, else one line saying what is wrong."""
        try:
            self.create(name, params)
        except MoebenchError as exc:
            return str(exc)
        return None

    def create(self, name: str, params: dict | None = None):
        """Build an instance from its name and options; raises MoebenchError when invalid."""
        cls = self.get(name)
        options = options_of(cls)
        params = dict(params or {})
        for key, value in params.items():
            if key not in options:
                raise MoebenchError(f"{self.kind} {name!r} has no option {key!r}{did_you_mean(key, list(options))}")
            problem = options[key].check(value)
            if problem:
                raise MoebenchError(f"option {key!r} of {self.kind} {name!r}: {problem}")
        obj = cls(**params)
        problem = obj.check() if hasattr(obj, "check") else None
        if problem:
            raise MoebenchError(f"{self.kind} {name!r}: {problem}")
        return obj
