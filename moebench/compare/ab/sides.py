"""The two sides of `moebench ab`: a git revision checked out into a temporary worktree, the
working tree itself, or an interpreter that brings its own moebench.

A side is importable when its tree goes first on its worker's sys.path: the worker then
imports ``moebench`` from the side's tree if the tree holds a ``moebench/`` package (else from
the interpreter's environment), and the user's router package likewise, with its entry points
read from the ``<name>.dist-info/entry_points.txt`` that sits at the tree's root (the first
distribution of a name on sys.path wins, so the side's own version shadows an installed one).
An editable install of moebench does not get in the way: its finder comes after sys.path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from moebench.core.errors import MoebenchError

GIT_TIMEOUT_S = 120


@dataclass
class Side:
    """One side: ``label`` (A or B), what the user named (``ref``: a git revision, or None for
    the working tree), the tree its worker imports from (None: the interpreter's own
    environment), the interpreter, and the commit (with ``dirty`` for a working tree)."""

    label: str
    ref: str | None
    tree: Path | None
    python: str = sys.executable
    commit: str | None = None
    dirty: bool = False
    worktree: Path | None = field(default=None, repr=False)  # a temporary worktree to remove
    temporary: bool = False  # the tree is a temporary worktree (removed once the command ends)

    def describe(self) -> str:
        where = self.ref if self.ref else ("working tree" if self.tree is not None else "interpreter")
        commit = f" ({self.commit[:10]}{', dirty' if self.dirty else ''})" if self.commit else ""
        python = "" if self.python == sys.executable else f" with {self.python}"
        return f"{where}{commit}{python}"

    def record(self) -> dict:
        return {"side": self.label, "ref": self.ref, "commit": self.commit, "dirty": self.dirty,
                "tree": str(self.tree) if self.tree else None, "python": self.python,
                "worktree": self.temporary}


def git(repo: Path, *args: str) -> str:
    """Output of ``git -C repo args`` (stripped); MoebenchError naming the command on failure."""
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise MoebenchError("ab: git is not installed (a side given as a revision needs git)") from None
    except subprocess.TimeoutExpired:
        raise MoebenchError(f"ab: git {' '.join(args)} took more than {GIT_TIMEOUT_S} s") from None
    if done.returncode != 0:
        why = " ".join((done.stderr or done.stdout).split())[:300]
        raise MoebenchError(f"ab: git {' '.join(args)}: {why}")
    return done.stdout.strip()


def repository(start: Path) -> Path:
    """The root of the git working tree that holds ``start``."""
    try:
        return Path(git(start, "rev-parse", "--show-toplevel"))
    except MoebenchError:
        raise MoebenchError(f"ab: {start} is not inside a git repository (--base/--head name git revisions)") from None


def _check_python(python: str, flag: str) -> str:
    found = shutil.which(python)
    if found is None:
        raise MoebenchError(f"ab: {flag} {python}: no such interpreter")
    return found


def open_side(label: str, repo: Path | None, ref: str | None, python: str | None, flag: str) -> Side:
    """A side: ``ref`` checked out with ``git worktree add --detach`` into a temporary folder,
    or the working tree of ``repo`` (ref None, no python), or an interpreter alone (ref None,
    python given). Close it with `close_side`."""
    py = _check_python(python, f"--{flag}-python") if python else sys.executable
    if ref is None:
        if python:  # the interpreter brings its own moebench and routers
            return Side(label, None, None, py)
        assert repo is not None
        commit = _try(lambda: git(repo, "rev-parse", "HEAD"))
        dirty = bool(_try(lambda: git(repo, "status", "--porcelain", "--untracked-files=no")))
        return Side(label, None, repo, py, commit, dirty)
    if repo is None:
        raise MoebenchError(f"ab: --{flag} {ref}: not inside a git repository")
    if ref.startswith("-"):
        raise MoebenchError(f"ab: --{flag} {ref}: expected a git revision")
    commit = git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}") if _exists(repo, ref) else None
    if not commit:
        raise MoebenchError(f"ab: --{flag} {ref}: no such revision in {repo}")
    folder = Path(tempfile.mkdtemp(prefix=f"moebench-ab-{label}-"))
    try:
        git(repo, "worktree", "add", "--detach", str(folder), commit)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return Side(label, ref, folder, py, commit, False, worktree=folder, temporary=True)


def _exists(repo: Path, ref: str) -> bool:
    try:
        return bool(git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"))
    except MoebenchError:
        return False


def _try(fn):
    try:
        return fn()
    except MoebenchError:
        return None


def close_side(side: Side, repo: Path | None) -> None:
    """Remove the side's temporary worktree (if any); never raises."""
    folder, side.worktree = side.worktree, None
    if folder is None:
        return
    try:
        if repo is not None:
            git(repo, "worktree", "remove", "--force", str(folder))
    except MoebenchError:
        pass
    shutil.rmtree(folder, ignore_errors=True)
    if repo is not None:
        _try(lambda: git(repo, "worktree", "prune"))


def side_paths(side: Side) -> list[str]:
    """What goes first on the side's worker's sys.path: its tree, if any."""
    return [str(side.tree)] if side.tree is not None else []


def assert_distinct(a: Side, b: Side) -> None:
    if a.tree is not None and b.tree is not None and os.path.samefile(a.tree, b.tree) and a.python == b.python:
        raise MoebenchError("ab: both sides are the same tree with the same interpreter")
