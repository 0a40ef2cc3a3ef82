"""Names that become folders, and folders that must stay under their root.

A suite's name becomes ``results/<suite>/`` and ``reports/<suite>/``; a run id becomes the
folder below it. Both come from files a user (or a pull request) controls: a suite file, or a
run's meta.json read back by ``report``. `folder_name_problem` says what is wrong with one,
and `under` joins names to a root only when the result is still inside the root (checked on
the resolved paths, so a symlink or a `..` cannot lead out), for the writers.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from moebench.core.errors import MoebenchError

MAX_NAME_CHARS = 100
# starts with a letter, digit or '_': never '.', '..', a hidden folder or something like a flag
FOLDER_NAME = rf"[A-Za-z0-9_][A-Za-z0-9_.-]{{0,{MAX_NAME_CHARS - 1}}}"
FOLDER_NAME_RULE = (
    f"1 to {MAX_NAME_CHARS} letters, digits, '_', '.' or '-', starting with a letter, digit or '_'"
)


def folder_name_problem(name: object) -> str | None:
    """None if ``name`` is safe as one folder name, else what a name must be."""
    if isinstance(name, str) and re.fullmatch(FOLDER_NAME, name):
        return None
    return f"expected a name of {FOLDER_NAME_RULE}"


def under(root: str | Path, *names: str, what: str = "folder") -> Path:
    """``root / name / ...``, or a MoebenchError when a name is not a safe folder name or the
    resolved path would leave the resolved ``root``."""
    for name in names:
        problem = folder_name_problem(name)
        if problem:
            shown = name if isinstance(name, str) and len(name) <= 60 else f"{str(name)[:57]}..."
            raise MoebenchError(f"{what} name {shown!r}: {problem}")
    return inside(root, Path(root).joinpath(*names))


def inside(root: str | Path, path: str | Path) -> Path:
    """``path`` if it resolves to ``root`` or below it, else a MoebenchError."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if real == real_root or os.path.commonpath([real_root, real]) != real_root:
        raise MoebenchError(f"{path}: leads outside {root} (through '..' or a symlink?); refusing to write there")
    return Path(path)


def output_problem(path: str | Path, make_parents: bool = False) -> str | None:
    """Why a command cannot write its output file ``path`` (checked before the command does its
    work), else None. ``make_parents``: a missing folder will be created."""
    p = Path(path)
    if p.is_dir():
        return "is a directory; expected a file path"
    parent = p.parent
    while make_parents and not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.exists():
        return f"its folder {parent} does not exist"
    if not parent.is_dir():
        return f"{parent} is not a folder"
    if not p.exists() and not os.access(parent, os.W_OK):
        return f"cannot write in {parent}: permission denied"
    return None


def write_output(path: str | Path, text: str, what: str, make_parents: bool = False) -> None:
    """Write ``text`` to the output file ``path`` whole or not at all (a temporary file renamed
    over it; a device such as /dev/stdout is written directly); an OSError becomes one
    MoebenchError naming ``what`` (the flag) and the path."""
    p = Path(path)
    problem = output_problem(p, make_parents)
    if problem:
        raise MoebenchError(f"{what} {p}: {problem}")
    data = text.encode("utf-8")
    try:
        if make_parents:
            p.parent.mkdir(parents=True, exist_ok=True)
        if p.exists() and not p.is_file():  # /dev/stdout, a pipe: no rename possible
            with open(p, "wb") as fh:
                fh.write(data)
            return
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, p)
        except BaseException:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
    except OSError as exc:
        raise MoebenchError(f"{what} {p}: cannot write: {exc.strerror or exc}") from None
