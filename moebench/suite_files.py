"""Reading suite files: YAML with duplicate keys rejected, `include:` chains merged, and the
file each key came from remembered (so errors name the file that set a bad field).

Validation of the merged document is `moebench.suite`'s job.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import yaml

from moebench.errors import SuiteError


def show(value: Any) -> str:
    """A value as the user wrote it in YAML, shortened to fit one line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value) if isinstance(value, (str, int, float)) else json.dumps(value, default=str)
    text = " ".join(text.split())
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------------
# Loading: YAML, includes, deep merge


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (plain PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: the base class reports it
                continue
            if duplicate:
                problem = f"found duplicate key {show(key)}"
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, problem, key_node.start_mark
                )
        return super().construct_mapping(node, deep)


def _yaml_message(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    text = (f"line {mark.line + 1}, column {mark.column + 1}: " if mark else "") + problem
    text += f" ({context})" if context else ""
    return " ".join(text.split())


def _read_yaml(path: Path, file: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SuiteError(file, "<file>", "file not found") from None
    except IsADirectoryError:
        raise SuiteError(file, "<file>", "is a directory, not a suite file") from None
    except UnicodeDecodeError:
        raise SuiteError(file, "<file>", "not UTF-8 text") from None
    except OSError as exc:
        raise SuiteError(file, "<file>", f"cannot read: {exc.strerror or exc}") from None
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise SuiteError(file, "<yaml>", _yaml_message(exc)) from None


def include_list(value: Any, file: str) -> list[tuple[str, str]]:
    """[(path, field)] of an `include:` value: one path or a list of paths."""
    if isinstance(value, str):
        return [(value, "include")]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [(v, f"include[{i}]") for i, v in enumerate(value)]
    raise SuiteError(file, "include", f"expected a path or a list of paths, got {show(value)}")


def _deep_merge(base: dict, override: dict) -> dict:
    """Mappings merge key by key (``override`` wins); anything else, lists included, is replaced."""
    out = dict(base)
    for key, value in override.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _deep_merge(out[key], value) if both else value
    return out


def _key_paths(doc: dict, prefix: str = "") -> Iterator[str]:
    """Dotted paths of every mapping key in ``doc`` ("grid", "grid.tokens", ...)."""
    for key, value in doc.items():
        path = f"{prefix}{key}"
        yield path
        if isinstance(value, dict):
            yield from _key_paths(value, path + ".")


def read_suite_file(path: Path, file: str, chain: tuple[tuple[str, str], ...] = ()) -> tuple[Any, dict[str, str]]:
    """The document at ``path`` with its includes merged in, and the file each key path came from.

    file: the path as shown in errors.  chain: (real path, shown path) of the including files.
    """
    doc = _read_yaml(path, file)
    if not isinstance(doc, dict):
        if chain:  # the top file's shape is reported by the validator
            raise SuiteError(file, "", f"an included file must be a mapping, got {show(doc)}")
        return doc, {}
    chain = chain + ((os.path.realpath(path), file),)
    merged: dict = {}
    origins: dict[str, str] = {}
    for include, field in include_list(doc.get("include", []), file):
        target = path.parent / include
        shown = os.path.normpath(os.path.join(os.path.dirname(file), include))
        if any(real == os.path.realpath(target) for real, _ in chain):
            cycle = " -> ".join([shown_ for _, shown_ in chain] + [shown])
            raise SuiteError(file, field, f"include cycle: {cycle}")
        if not target.is_file():
            raise SuiteError(file, field, f"included file not found: {shown}")
        sub, sub_origins = read_suite_file(target, shown, chain)
        merged = _deep_merge(merged, sub)
        origins.update(sub_origins)
    own = {k: v for k, v in doc.items() if k != "include"}
    merged = _deep_merge(merged, own)
    origins.update(dict.fromkeys(_key_paths(own), file))
    live = set(_key_paths(merged))  # drop origins of keys an override replaced wholesale
    return merged, {p: f for p, f in origins.items() if p in live}
