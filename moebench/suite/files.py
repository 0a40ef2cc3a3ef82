"""Reading suite files: YAML with duplicate keys rejected, `include:` chains merged, and the
file each key came from remembered (so errors name the file that set a bad field).

Hostile files are refused before they cost anything: only regular files of at most
`MAX_FILE_BYTES` are read (a FIFO, /dev/zero or a 50 MB file never is), binary and non-UTF-8
files are refused, and the YAML composer stops at `MAX_DEPTH` levels of nesting and at
`MAX_NODES` values, aliases counted as the values they expand to (so an alias bomb is refused
before anything is expanded). Errors in an included file give its path, line and column and
what was expected, never its text.

Validation of the merged document is `moebench.suite.load`'s job.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Iterator

import yaml

from moebench.core.errors import SuiteError

# Refusals must take well under 2 s: the pure-Python YAML parser needs ~1 s a MiB and ~70 us a value.
MAX_FILE_BYTES = 128 << 10  # suites are a few KiB (the largest shipped: 2 KiB, 280 values)
MAX_DEPTH = 32  # mapping/list nesting; a suite needs 5
MAX_NODES = 4_000  # values after alias expansion; a suite needs hundreds
MAX_INCLUDES = 64  # files read for one suite, includes of includes counted
MAX_PATH_CHARS = 4096
MAX_PROBLEM_CHARS = 200


class Budget:
    """What reading one suite and its includes may still spend: bytes, values and files."""

    def __init__(self):
        self.bytes = MAX_FILE_BYTES
        self.nodes = MAX_NODES
        self.files = MAX_INCLUDES + 1


def show(value: Any) -> str:
    """A value as the user wrote it in YAML, shortened to fit one line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and len(value) > 100:
        value = value[:100]  # the repr below is cut to 60 characters anyway
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"an integer of {int(value.bit_length() * 0.30103) + 1} digits"  # str() refuses > 4300 digits
    text = repr(value) if isinstance(value, (str, int, float)) else json.dumps(value, default=str)
    text = " ".join(text.split())
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------------
# Loading: YAML, includes, deep merge


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (plain PyYAML silently keeps the last one), nesting
    deeper than MAX_DEPTH, more than MAX_NODES values (aliases expanded) and recursive aliases."""

    def __init__(self, stream, max_nodes: int = MAX_NODES):
        super().__init__(stream)
        self._depth = 0
        self._max_nodes = max_nodes
        self._nodes = 0  # values composed so far, each alias counted as the size of its target
        self._sizes: dict[int, int] = {}  # id(node) -> its size with aliases expanded

    def fetch_flow_collection_start(self, TokenClass):
        # stop `[[[[...` in the scanner, whose cost grows with the flow depth
        if self.flow_level >= MAX_DEPTH:
            raise yaml.scanner.ScannerError(
                None, None, f"nested deeper than {MAX_DEPTH} levels; a suite needs far fewer", self.get_mark()
            )
        super().fetch_flow_collection_start(TokenClass)

    def compose_node(self, parent, index):
        mark = self.peek_event().start_mark
        alias = self.check_event(yaml.AliasEvent)
        if self._depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
        self._depth += 1
        start = self._nodes
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if alias:
            if id(node) not in self._sizes:  # PyYAML allows an alias inside its own anchor
                raise yaml.composer.ComposerError(None, None, "an alias refers to a value that contains it", mark)
            self._nodes += self._sizes[id(node)]
        else:
            self._nodes += 1
            self._sizes[id(node)] = self._nodes - start
        if self._nodes > self._max_nodes:
            raise yaml.composer.ComposerError(
                None, None, f"more than {MAX_NODES} values in the suite and its includes (aliases counted "
                "as what they expand to); a suite needs far fewer", mark,
            )
        return node

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

    def construct_sexagesimal_free(self, node):
        """YAML 1.1 reads ``1:04`` as 64 (base 60): almost always a typo in a suite (#23)."""
        if ":" in str(node.value):
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value!r} is a base-60 number in YAML 1.1 (it would read as "
                f"{yaml.SafeLoader.yaml_constructors[node.tag](self, node)}); quote it or write the number",
                node.start_mark)
        return yaml.SafeLoader.yaml_constructors[node.tag](self, node)


for _tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
    _Loader.add_constructor(_tag, _Loader.construct_sexagesimal_free)


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def _yaml_message(exc: yaml.YAMLError, redact: bool = False) -> str:
    """'line L, column C: problem (context)'; ``redact``: quoted fragments (which quote the
    file) removed, for files the user did not name (includes)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    text = problem + (f" ({context})" if context else "")
    text = " ".join(text.split())
    if redact:
        text = _QUOTED.sub("(not shown)", text)
    if len(text) > MAX_PROBLEM_CHARS:
        text = text[: MAX_PROBLEM_CHARS - 3] + "..."
    return (f"line {mark.line + 1}, column {mark.column + 1}: " if mark else "") + text


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a pipe"),
             (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _check_stat(st: os.stat_result, file: str, limit: int, rule: str) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise SuiteError(file, "<file>", "is a directory, not a suite file")
    if not stat.S_ISREG(st.st_mode):
        raise SuiteError(file, "<file>", f"is {_file_kind(st.st_mode)}, not a suite file")
    if st.st_size > limit:
        raise SuiteError(file, "<file>", f"is {st.st_size} bytes; {rule}")


def read_limited(path: Path, file: str, limit: int = MAX_FILE_BYTES) -> str:
    """The text of a suite file: a regular UTF-8 file of at most ``limit`` bytes; anything else
    is a SuiteError before more than ``limit + 1`` bytes are read."""
    if limit < MAX_FILE_BYTES:  # what is left of the budget of a suite and its includes
        return _read_checked(path, file, limit, f"the suite and its includes may have at most {MAX_FILE_BYTES} bytes")
    return _read_checked(path, file, limit, f"a suite file may have at most {MAX_FILE_BYTES} bytes")


def _read_checked(path: Path, file: str, limit: int, rule: str) -> str:
    try:
        _check_stat(os.stat(path), file, limit, rule)  # before opening: opening a FIFO or a device can block
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as fh:
            _check_stat(os.fstat(fh.fileno()), file, limit, rule)  # the file may have changed since the stat
            data = fh.read(limit + 1)
    except FileNotFoundError:
        raise SuiteError(file, "<file>", "file not found") from None
    except NotADirectoryError:
        raise SuiteError(file, "<file>", "file not found (a parent is not a directory)") from None
    except OSError as exc:
        raise SuiteError(file, "<file>", f"cannot read: {exc.strerror or exc}") from None
    except ValueError:  # a NUL in the path
        raise SuiteError(file, "<file>", "not a valid path") from None
    if len(data) > limit:
        raise SuiteError(file, "<file>", f"is over {limit} bytes; {rule}")
    nul = data.find(b"\0")
    if nul != -1:
        raise SuiteError(file, "<file>", f"a binary file (NUL byte at offset {nul}), not YAML text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SuiteError(file, "<file>", f"not UTF-8 text (invalid byte at offset {exc.start})") from None


def _read_yaml(path: Path, file: str, budget: Budget, included: bool = False) -> Any:
    budget.files -= 1
    if budget.files < 0:
        raise SuiteError(file, "<file>", f"more than {MAX_INCLUDES} included files in one suite")
    text = read_limited(path, file, budget.bytes)
    budget.bytes -= len(text.encode("utf-8"))
    loader = None
    try:
        loader = _Loader(text, budget.nodes)  # the reader checks every character here
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise SuiteError(file, "<yaml>", _yaml_message(exc, redact=included)) from None
    except (ValueError, OverflowError, RecursionError) as exc:  # e.g. an integer of 5000 digits
        detail = " ".join(str(exc).split(":")[0].split())[:120]
        what = "a value cannot be read" + ("" if included else f" ({detail})")
        raise SuiteError(file, "<yaml>", what) from None
    finally:
        if loader is not None:
            budget.nodes -= loader._nodes
            loader.dispose()


def kind_of(value: Any) -> str:
    """What a YAML value is, without its content: 'a string', 'a list', ..."""
    if value is None:
        return "an empty document"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "a mapping"}
    return names.get(type(value), f"a {type(value).__name__}")


def include_list(value: Any, file: str) -> list[tuple[str, str]]:
    """[(path, field)] of an `include:` value: one path or a list of paths."""
    if isinstance(value, str):
        items = [(value, "include")]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = [(v, f"include[{i}]") for i, v in enumerate(value)]
    else:
        raise SuiteError(file, "include", f"expected a path or a list of paths, got {show(value)}")
    for path, field in items:
        if not path or "\0" in path or len(path) > MAX_PATH_CHARS:
            raise SuiteError(file, field, f"expected a file path (1 to {MAX_PATH_CHARS} characters, no NUL), got {show(path)}")
    return items


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


def read_suite_file(path: Path, file: str, chain: tuple[tuple[str, str], ...] = (),
                    budget: Budget | None = None) -> tuple[Any, dict[str, str]]:
    """The document at ``path`` with its includes merged in, and the file each key path came from.

    file: the path as shown in errors.  chain: (real path, shown path) of the including files.
    budget: what the suite and its includes may still spend (a new one for the top file).
    """
    budget = budget or Budget()
    doc = _read_yaml(path, file, budget, included=bool(chain))
    if not isinstance(doc, dict):
        if chain:  # the top file's shape is reported by the validator; an include's content is not shown
            raise SuiteError(file, "", f"an included file must be a mapping of suite fields, got {kind_of(doc)}")
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
        if not target.exists():
            raise SuiteError(file, field, f"included file not found: {shown}")
        sub, sub_origins = read_suite_file(target, shown, chain, budget)
        merged = _deep_merge(merged, sub)
        origins.update(sub_origins)
    own = {k: v for k, v in doc.items() if k != "include"}
    merged = _deep_merge(merged, own)
    origins.update(dict.fromkeys(_key_paths(own), file))
    live = set(_key_paths(merged))  # drop origins of keys an override replaced wholesale
    return merged, {p: f for p, f in origins.items() if p in live}
