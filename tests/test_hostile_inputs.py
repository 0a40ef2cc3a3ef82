"""Hostile input never gives a traceback, a slow refusal or a write outside the results roots.

A corpus of malformed suites, runs, baselines and flags is GENERATED below (every suite field
x wrong type / below its minimum / above its maximum / oversize; broken, cyclic, binary and
secret-holding includes; huge, binary, deeply nested and alias-bomb files; devices, FIFOs and
directories; bad meta.json, rows.jsonl and baselines for report/compare/export; bad flags).
Each entry goes through the real CLI (`moebench.cli.main` in-process, a sample through
`python -m moebench`) and must be refused with exit code 2, exactly one line on stderr, no
"Traceback", in under 2 s, without a file written anywhere but where it already was.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from moebench.cli import main
from moebench.suite.load import AXES, MAX_CASES, TIMING, Rule
from moebench.suite.files import MAX_DEPTH, MAX_FILE_BYTES, MAX_INCLUDES, MAX_NODES

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_RUN = ROOT / "tests" / "fixtures" / "runs" / "base"
SECRET = "s3cr3t-TOKEN-7f3a9"  # planted in included files; must never reach an error message
LIMIT_S = 2.0

GOOD = {
    "name": "hostile",
    "version": 1,
    "grid": {"workload": "uniform", "tokens": 64, "experts": 4, "top_k": 1},
    "routers": ["topk"],
    "timing": {"warmup_rounds": 0, "min_rounds": 1, "max_rounds": 1, "min_time_s": 0.0, "isolate": False},
}


def dump(doc) -> str:
    return yaml.safe_dump(doc, sort_keys=False)


def with_field(section: str | None, key: str, value) -> str:
    doc = json.loads(json.dumps(GOOD))
    (doc.setdefault(section, {}) if section else doc)[key] = value
    return dump(doc)


# ---------------------------------------------------------------------------------------------
# The corpus: (id, make) where make(dir) writes what it needs under dir and returns the argv.

CORPUS: list[tuple[str, object]] = []


def probe(pid: str):
    def register(make):
        CORPUS.append((pid, make))
        return make
    return register


def suite_text(pid: str, text: str | bytes, *extra: str) -> None:
    """A probe validating one suite file (written as text, or bytes when binary)."""
    def make(d: Path) -> list[str]:
        path = d / f"{pid}.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["validate", str(path), *extra]
    CORPUS.append((pid, make))


def bad_values(rule: Rule) -> dict[str, object]:
    """Values ``rule`` must refuse: wrong types, out of range and oversize."""
    if rule.kind == "workload":
        return {"int": 3, "name-int": {"name": 3}, "unknown": "no_such_workload", "label-slash": {"name": "zipf", "label": "a/b"},
                "label-long": {"name": "zipf", "label": "x" * 300}, "param-type": {"name": "zipf", "params": {"s": "big"}},
                "param-unknown": {"name": "zipf", "params": {"no_such_option": 1}}, "params-list": {"name": "zipf", "params": [1]}}
    if rule.kind == "choice":
        return {"unknown": "no_such_choice", "int": 3, "mapping": {"a": 1}, "long": "y" * 100_000}
    if rule.kind == "bool":
        return {"string": "yes", "int": 1, "list-of-lists": [[True]]}
    out = {"string": "many", "bool": True, "mapping": {"a": 1}, "list-of-lists": [[1]], "int-400-digits": 10**400}
    if rule.maximum is not None:  # timing.timeout_s has none: any finite number of seconds is allowed
        out["huge"] = 10**40
    if rule.kind == "int":
        out["float"] = 1.5
    else:
        out["nan"] = math.nan
        out["inf"] = math.inf
    if rule.minimum is not None:
        out["below-min"] = rule.minimum if rule.exclusive else rule.minimum - 1
    if rule.maximum is not None:
        out["above-max"] = int(rule.maximum) + 1 if rule.kind == "int" else rule.maximum * 2
    return out


# every axis in grid (lists allowed) and in defaults (single values), every timing field
for _axis, _rule in AXES.items():
    for _what, _value in bad_values(_rule).items():
        suite_text(f"grid.{_axis}.{_what}", with_field("grid", _axis, _value))
        if not isinstance(_value, list):
            suite_text(f"defaults.{_axis}.{_what}", with_field("defaults", _axis, _value))
    suite_text(f"grid.{_axis}.empty-list", with_field("grid", _axis, []))
    suite_text(f"defaults.{_axis}.list", with_field("defaults", _axis, [1, 2]))
for _key, _rule in TIMING.items():
    for _what, _value in bad_values(_rule).items():
        suite_text(f"timing.{_key}.{_what}", with_field("timing", _key, _value))

# top-level fields
for _what, _value in {"dotdot": "..", "dot": ".", "slash": "a/b", "backslash": "a\\b", "long": "n" * 300,
                      "dash": "-rf", "hidden": ".git", "empty": "", "int": 3, "null": None, "list": ["a"],
                      "nul": "a\x00b", "newline": "a\nb", "unicode": "süite"}.items():
    suite_text(f"name.{_what}", with_field(None, "name", _value))
for _what, _value in {"zero": 0, "string": "1", "float": 1.5, "huge": 2**40, "bool": True}.items():
    suite_text(f"version.{_what}", with_field(None, "version", _value))
for _what, _value in {"int": 3, "list": ["a"], "huge": "d" * 20_000}.items():
    suite_text(f"description.{_what}", with_field(None, "description", _value))
for _what, _value in {"empty": [], "string": "topk", "int-item": [3], "unknown": ["no_such_router"],
                      "label-slash": [{"name": "topk", "label": "a/b"}], "label-long": [{"name": "topk", "label": "l" * 300}],
                      "param-type": [{"name": "topk", "params": {"renormalize": "yes"}}],
                      "param-huge-string": [{"name": "topk", "params": {"score": "z" * 100_000}}],
                      "duplicate": ["topk", "topk"], "mapping": {"name": "topk"}, "no-name": [{"params": {}}]}.items():
    suite_text(f"routers.{_what}", with_field(None, "routers", _value))
for _what, _value in {"int": 7, "empty-list": [], "int-items": [1, 2], "unknown-axis": {"tokns": 1}}.items():
    suite_text(f"grid.{_what}", with_field(None, "grid", _value))
suite_text("top.unknown-key", with_field(None, "gird", 1))
suite_text("top.list", "- a\n- b\n")
suite_text("top.scalar", "just a string\n")
suite_text("top.empty", "")
suite_text("top.comments-only", "# nothing\n" * 10)
suite_text("include.int", with_field(None, "include", 3))
suite_text("include.empty-string", with_field(None, "include", ""))
suite_text("include.missing", with_field(None, "include", "nope.yaml"))
suite_text("include.long-path", with_field(None, "include", "p" * 10_000))

# file-level hostility
suite_text("file.nul-byte", b"name: x\x00\nversion: 1\n")
suite_text("file.not-utf8", b"name: \xff\xfe caf\xe9\n")
suite_text("file.control-char", "name: a\x01b\n")
suite_text("file.over-limit", "#" * (MAX_FILE_BYTES + 1))
suite_text("file.max-size-plain-scalar", "description: " + ("word " * (MAX_FILE_BYTES // 5 - 10)) + "\n")
suite_text("file.max-size-comment-lines", ("#" * 99 + "\n") * (MAX_FILE_BYTES // 100))
suite_text("file.deep-flow", "a: " + "[" * 100_000 + "]" * 100_000)
suite_text("file.deep-flow-mappings", "a: " + "{b: " * 5_000 + "1" + "}" * 5_000)
suite_text("file.deep-block", "".join(" " * i + f"k{i}:\n" for i in range(MAX_DEPTH + 5)))
suite_text("file.too-many-values", "description: x\ngrid: {tokens: [" + ", ".join(["1"] * (MAX_NODES + 1)) + "]}\n")
_BOMB = "".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else "1"] * 10) + "]\n" for i in range(9))
suite_text("file.alias-bomb", _BOMB)
suite_text("file.alias-bomb-in-params", _BOMB + dump({**GOOD, "routers": [{"name": "topk", "params": {"score": "@@"}}]})
           .replace("'@@'", "*l8"))
suite_text("file.recursive-alias", "a: &a [1, *a]\n" + dump(GOOD))
suite_text("file.undefined-alias", "name: *nope\n")
suite_text("file.merge-recursive", "a: &a {<<: *a}\n")
suite_text("file.int-5000-digits", dump(GOOD).replace("tokens: 64", "tokens: " + "9" * 5000))
suite_text("file.python-tag", "name: !!python/object/apply:os.system ['true']\n")
suite_text("file.custom-tag", "name: !custom x\n")
suite_text("file.duplicate-key", "name: a\nname: b\n")
suite_text("file.two-documents", dump(GOOD) + "---\n" + dump(GOOD))
suite_text("file.tab-indent", "grid:\n\ttokens: 1\n")
suite_text("file.unhashable-key", "? [a]\n: 1\n")
# each grid is 100 x 100 cases, well under MAX_CASES; the list of aliases to it is not
_GRID = json.dumps({"workload": "uniform", "tokens": list(range(1, 101)), "experts": list(range(2, 102)), "top_k": 1})
suite_text("grid.list-of-aliases-over-max-cases", dump({k: v for k, v in GOOD.items() if k != "grid"})
           + f"grid: [&g {_GRID}" + ", *g" * (MAX_CASES // 10_000) + "]\n")
suite_text("grid.product-over-max-cases", with_field("grid", "tokens", list(range(1, 1001))).replace(
    "experts: 4", "experts: " + json.dumps(list(range(2, 1002)))))


@probe("file.dev-zero")
def _(d):
    return ["validate", "/dev/zero"]


@probe("file.dev-urandom")
def _(d):
    return ["validate", "/dev/urandom"]


@probe("file.directory")
def _(d):
    return ["validate", str(d)]


@probe("file.fifo")
def _(d):
    path = d / "fifo.yaml"
    if not path.exists():
        os.mkfifo(path)
    return ["validate", str(path)]


@probe("file.socket")
def _(d):
    path = d / "sock.yaml"
    if not path.exists():
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    return ["validate", str(path)]


@probe("file.symlink-to-dev-zero")
def _(d):
    path = d / "zero-link.yaml"
    if not path.is_symlink():
        path.symlink_to("/dev/zero")
    return ["validate", str(path)]


@probe("file.sparse-50MB")
def _(d):
    path = d / "huge.yaml"
    with open(path, "wb") as fh:
        fh.truncate(50 << 20)  # sparse: no disk used, but a 50 MB suite to the reader
    return ["validate", str(path)]


@probe("file.nul-in-path")
def _(d):
    return ["validate", str(d / "a\x00b.yaml")]


@probe("file.parent-is-a-file")
def _(d):
    (d / "plain.txt").write_text("x")
    return ["validate", str(d / "plain.txt" / "s.yaml")]


def include_probe(pid: str, write_target, include: str | None = None) -> None:
    """A suite including a target that write_target(dir) makes (returns its file name)."""
    def make(d: Path) -> list[str]:
        sub = d / f"inc-{pid}"
        sub.mkdir(exist_ok=True)
        target = write_target(sub)
        doc = {"include": include or target, **GOOD}
        (sub / "suite.yaml").write_text(dump(doc))
        return ["validate", str(sub / "suite.yaml")]
    CORPUS.append((pid, make))


def _write(name: str, content: str | bytes):
    def write(sub: Path) -> str:
        (sub / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        return name
    return write


include_probe("include.non-yaml-secret", _write("id_rsa", f"-----BEGIN KEY-----\n\t{SECRET}: x: y\n"))
include_probe("include.secret-first-line", _write("creds.txt", f"{SECRET}\nline two\n"))
include_probe("include.secret-as-key", _write("cfg.yaml", f"{SECRET}: 1\n"))
include_probe("include.secret-in-list", _write("list.yaml", f"- {SECRET}\n"))
include_probe("include.secret-tag", _write("tag.yaml", f"a: !{SECRET} 1\n"))
include_probe("include.secret-alias", _write("alias.yaml", f"a: *{SECRET}\n"))
include_probe("include.secret-duplicate-key", _write("dup.yaml", f"{SECRET}: 1\n{SECRET}: 2\n"))
include_probe("include.secret-quoted-error", _write("q.yaml", f'a: "{SECRET}\\q"\n'))
include_probe("include.binary", _write("bin.yaml", b"\x00\x01" + SECRET.encode()))
include_probe("include.not-utf8", _write("latin1.yaml", f"a: {SECRET}\xe9".encode("latin-1")))
include_probe("include.dev-zero", lambda sub: "/dev/zero")
include_probe("include.directory", lambda sub: ".")
include_probe("include.self-cycle", lambda sub: "suite.yaml")


@probe("include.two-cycle")
def _(d):
    (d / "cyc_a.yaml").write_text(dump({"include": "cyc_b.yaml", **GOOD}))
    (d / "cyc_b.yaml").write_text(dump({"include": "cyc_a.yaml"}))
    return ["validate", str(d / "cyc_a.yaml")]


@probe("include.fan-out-over-max-includes")
def _(d):
    (d / "leaf.yaml").write_text("version: 1\n")
    (d / "fan.yaml").write_text(dump({"include": ["leaf.yaml"] * (MAX_INCLUDES + 1), **GOOD}))
    return ["validate", str(d / "fan.yaml")]


@probe("include.total-bytes-over-budget")
def _(d):
    parts = []
    for i in range(3):
        (d / f"part{i}.yaml").write_text("#" * (MAX_FILE_BYTES // 2) + "\nversion: 1\n")
        parts.append(f"part{i}.yaml")
    (d / "parts.yaml").write_text(dump({"include": parts, **GOOD}))
    return ["validate", str(d / "parts.yaml")]


# runs, baselines and flags for report / compare / export / run


def run_folder(d: Path, name: str, meta: bytes | str | None = None, rows: bytes | str | None = None,
               meta_dir: bool = False, rows_dir: bool = False) -> Path:
    run = d / "runs" / name
    run.mkdir(parents=True, exist_ok=True)
    good_meta = (FIXTURE_RUN / "meta.json").read_bytes()
    good_rows = (FIXTURE_RUN / "rows.jsonl").read_bytes()
    if meta_dir:
        (run / "meta.json").mkdir(exist_ok=True)
    elif meta is not None or not (run / "meta.json").exists():
        (run / "meta.json").write_bytes((meta.encode() if isinstance(meta, str) else meta) if meta is not None else good_meta)
    if rows_dir:
        (run / "rows.jsonl").mkdir(exist_ok=True)
    elif rows is not None or not (run / "rows.jsonl").exists():
        (run / "rows.jsonl").write_bytes((rows.encode() if isinstance(rows, str) else rows) if rows is not None else good_rows)
    return run


def meta_with(**fields) -> str:
    meta = json.loads((FIXTURE_RUN / "meta.json").read_text())
    meta.update(fields)
    return json.dumps(meta)


BAD_META = {"truncated": '{"run_id": "x", "suite": ', "list": "[1, 2]", "string": '"meta"', "binary": b"\x00\xff\x13",
            "empty": "", "deep": "[" * 100_000 + "]" * 100_000}
for _what, _meta in BAD_META.items():
    for _cmd in ("report", "compare", "export"):
        def _make(d, what=_what, meta=_meta, cmd=_cmd):
            run = run_folder(d, f"meta-{what}", meta=meta)
            return {"report": ["report", str(run), "--reports", str(d / "reports")],
                    "compare": ["compare", str(FIXTURE_RUN), str(run)], "export": ["export", str(run)]}[cmd]
        CORPUS.append((f"{_cmd}.meta-{_what}", _make))
for _what, _fields in {"suite-dotdot": {"suite": ".."}, "suite-escape": {"suite": "../../escaped"},
                       "run-id-escape": {"run_id": "../../../escaped"}, "run-id-slash": {"run_id": "a/b"},
                       "suite-long": {"suite": "s" * 300}}.items():
    def _make(d, what=_what, fields=_fields):
        run = run_folder(d, f"meta-{what}", meta=meta_with(**fields))
        return ["report", str(run), "--reports", str(d / "reports")]
    CORPUS.append((f"report.meta-{_what}", _make))


@probe("report.meta-is-a-directory")
def _(d):
    return ["report", str(run_folder(d, "meta-dir", meta_dir=True)), "--reports", str(d / "reports")]


@probe("export.rows-is-a-directory")
def _(d):
    return ["export", str(run_folder(d, "rows-dir", rows_dir=True))]


@probe("report.not-a-run")
def _(d):
    (d / "empty-run").mkdir(exist_ok=True)
    return ["report", str(d / "empty-run"), "--reports", str(d / "reports")]


@probe("report.a-file")
def _(d):
    return ["report", str(FIXTURE_RUN / "rows.jsonl"), "--reports", str(d / "reports")]


BAD_BASELINES = {"rows-ints": '{"meta": {}, "rows": [1, 2]}', "rows-int": '{"meta": {}, "rows": 3}',
                 "rows-strings": '{"meta": {}, "rows": ["a"]}', "rows-no-case-id": '{"meta": {}, "rows": [{"router": "x"}]}',
                 "rows-case-id-list": '{"meta": {}, "rows": [{"case_id": [1], "router": "x"}]}',
                 "meta-int": '{"meta": 3, "rows": []}', "meta-list": '{"meta": [], "rows": []}',
                 "top-list": "[1]", "invalid": "{rows: ", "binary": b"\x00\x81\xff", "empty": "",
                 "deep": '{"rows": ' + "[" * 100_000 + "]" * 100_000 + "}", "not-utf8": b'{"meta": "\xe9"}'}
for _what, _text in BAD_BASELINES.items():
    def _make(d, what=_what, text=_text):
        path = d / f"baseline-{what}.json"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["compare", str(path), str(FIXTURE_RUN)]
    CORPUS.append((f"compare.baseline-{_what}", _make))


@probe("compare.baseline-sparse-300MB")
def _(d):
    path = d / "huge-baseline.json"
    with open(path, "wb") as fh:
        fh.truncate(300 << 20)
    return ["compare", str(path), str(FIXTURE_RUN)]


@probe("compare.dev-zero")
def _(d):
    return ["compare", "/dev/zero", str(FIXTURE_RUN)]


@probe("compare.folder-without-runs")
def _(d):
    (d / "no-runs").mkdir(exist_ok=True)
    return ["compare", str(d / "no-runs"), str(FIXTURE_RUN)]


def flag_probe(pid: str, *argv: str) -> None:
    def make(d: Path) -> list[str]:
        return [a.format(d=d, run=FIXTURE_RUN, suite=d / "good.yaml") for a in argv]
    CORPUS.append((pid, make))


for _what, _args in {"threshold-word": ("--threshold", "abc"), "threshold-negative": ("--threshold", "-5"),
                     "threshold-nan": ("--threshold", "nan"), "min-diff-nan": ("--min-diff-ms", "nan"),
                     "min-diff-negative": ("--min-diff-ms", "-1"), "min-diff-word": ("--min-diff-ms", "x"),
                     "consistency-2": ("--consistency", "2"), "consistency-inf": ("--consistency", "inf"),
                     "fail-on-no-colon": ("--fail-on", "drop_rate"), "fail-on-unknown": ("--fail-on", "nope:1"),
                     "fail-on-word": ("--fail-on", "drop_rate:lots"), "fail-on-long": ("--fail-on", "m" * 5000 + ":1"),
                     "metrics-choice": ("--metrics", "some"), "json-directory": ("--json", "{d}"),
                     "json-missing-folder": ("--json", "{d}/no/such/folder/x.json"),
                     "json-parent-is-file": ("--json", "{run}/rows.jsonl/x.json"),
                     "json-sysfs": ("--json", "/sys/moebench.json"), "absolute-and-relative": ("--absolute", "--relative"),
                     "unknown-flag": ("--fast",)}.items():
    flag_probe(f"flags.compare.{_what}", "compare", "{run}", "{run}", *_args)
flag_probe("flags.compare.json-disk-full", "compare", "{run}", "{run}", "--json", "/dev/full")
flag_probe("flags.export.out-disk-full", "export", "{run}", "--out", "/dev/full")
flag_probe("flags.schema.out-disk-full", "schema", "--out", "/dev/full")
flag_probe("flags.report.reports-read-only", "report", "{run}", "--reports", "/sys/moebench-reports")
flag_probe("flags.report.reports-is-a-file", "report", "{run}", "--reports", "{suite}")
flag_probe("flags.export.format", "export", "{run}", "--format", "csv")
flag_probe("flags.export.out-directory", "export", "{run}", "--out", "{d}")
flag_probe("flags.export.out-parent-is-file", "export", "{run}", "--out", "{run}/rows.jsonl/x.json")
flag_probe("flags.export.out-sysfs", "export", "{run}", "--out", "/sys/moebench/x.json")
flag_probe("flags.schema.out-directory", "schema", "--out", "{d}")
flag_probe("flags.schema.out-missing-folder", "schema", "--out", "{d}/no/such/x.json")
flag_probe("flags.no-command")
flag_probe("flags.unknown-command", "frobnicate")
flag_probe("flags.run.device", "run", "{suite}", "--device", "gpu")
flag_probe("flags.run.missing-suite", "run", "{d}/nope.yaml", "--results", "{d}/results")
flag_probe("flags.run.dev-zero", "run", "/dev/zero", "--results", "{d}/results")
flag_probe("flags.run.resume-not-a-run", "run", "{suite}", "--resume", "{d}", "--results", "{d}/results")
flag_probe("flags.run.results-is-a-file", "run", "{suite}", "--results", "{suite}", "--no-report")
flag_probe("flags.run.results-read-only", "run", "{suite}", "--results", "/sys/moebench-results", "--no-report")
flag_probe("flags.report.no-runs", "report")
flag_probe("flags.validate.no-suites", "validate")


# ---------------------------------------------------------------------------------------------
# Running the corpus


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hostile")
    (d / "good.yaml").write_text(dump(GOOD))
    return d


@pytest.fixture(scope="module", autouse=True)
def warm(corpus_dir):
    """Import what the commands import once, so that each refusal is timed, not the imports."""
    import moebench.compare.verdicts  # noqa: F401
    import moebench.compare.export  # noqa: F401
    import moebench.report.build  # noqa: F401
    import moebench.run.session  # noqa: F401
    import moebench.suite.load  # noqa: F401

    assert main(["validate", str(corpus_dir / "good.yaml")]) == 0


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                out[p] = (st.st_size, st.st_mtime_ns)
    return out


def cli(argv: list[str], capsys) -> tuple[int, str, str, float]:
    capsys.readouterr()
    start = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    elapsed = time.perf_counter() - start
    out, err = capsys.readouterr()
    return code, out, err, elapsed


def test_the_corpus_is_big_enough():
    assert len(CORPUS) >= 100
    assert len({pid for pid, _ in CORPUS}) == len(CORPUS)  # ids are unique


@pytest.mark.parametrize("make", [m for _, m in CORPUS], ids=[pid for pid, _ in CORPUS])
def test_refused_with_one_line(make, corpus_dir, tmp_path, monkeypatch, capsys):
    argv = make(corpus_dir)
    monkeypatch.chdir(tmp_path)  # a command that defaults to results/ or reports/ would write here
    before = snapshot(corpus_dir)
    code, out, err, elapsed = cli(argv, capsys)
    lines = err.splitlines()
    assert "Traceback" not in err + out
    assert code == 2, (code, err, out[:300])
    assert len(lines) == 1, err
    assert "unexpected" not in err, err  # a message of its own, not the CLI's last backstop
    assert SECRET not in err + out
    assert elapsed < LIMIT_S, f"refused after {elapsed:.2f} s"
    assert snapshot(corpus_dir) == before  # nothing written
    assert list(tmp_path.iterdir()) == []
    # the escape probes aim at ../../escaped and ../../../escaped from corpus_dir/reports
    assert not any((p / "escaped").exists() for p in (corpus_dir, corpus_dir.parent, corpus_dir.parent.parent))


# Inputs that are damaged but readable: the command goes on, says so in one line per problem,
# and never shows a traceback.
TOLERATED = {
    "rows-binary": b"\x00\xff\xfe garbage\n",
    "rows-not-objects": "[1, 2]\n3\n\"row\"\nnull\n",
    "rows-wrong-types": json.dumps({"case_id": "c", "router": "r", "tokens": "many", "status": 3,
                                    "route.median_ms": "fast", "imbalance": [1]}) + "\n",
}


@pytest.mark.parametrize("cmd", ["report", "compare", "export"])
@pytest.mark.parametrize("what", list(TOLERATED) + ["meta-wrong-types"])
def test_damaged_runs_never_give_a_traceback(what, cmd, corpus_dir, tmp_path, capsys):
    if what == "meta-wrong-types":
        run = run_folder(tmp_path, what, meta=meta_with(environment=3, reference="x", timing=[], devices="cpu"))
    else:
        good = (FIXTURE_RUN / "rows.jsonl").read_bytes()
        rows = TOLERATED[what]
        run = run_folder(tmp_path, what, rows=good + (rows if isinstance(rows, bytes) else rows.encode()))
    argv = {"report": ["report", str(run), "--reports", str(tmp_path / "reports")],
            "compare": ["compare", str(FIXTURE_RUN), str(run)], "export": ["export", str(run)]}[cmd]
    code, out, err, elapsed = cli(argv, capsys)
    assert "Traceback" not in err + out
    assert code in (0, 1, 2), err
    assert all(line.startswith("moebench: ") for line in err.splitlines()), err
    errors = [line for line in err.splitlines() if line.startswith("moebench: error:")]
    assert len(errors) == (1 if code == 2 else 0), err
    assert elapsed < 30  # a report renders plots; a hang would be the failure


def test_report_writes_only_under_its_root(tmp_path, capsys):
    run = run_folder(tmp_path, "ok", meta=meta_with(suite="fixture", run_id="r1"))
    code, out, err, _ = cli(["report", str(run), "--reports", str(tmp_path / "reports")], capsys)
    assert code == 0, err
    written = Path(out.split("report: ", 1)[1].strip())
    assert written.resolve().is_relative_to((tmp_path / "reports").resolve())


# A sample through the real entry point: the same one line from `python -m moebench`, fast
# (validate reads the file before importing the validator and torch).
SUBPROCESS_SAMPLE = ["file.dev-zero", "file.nul-byte", "file.alias-bomb", "file.sparse-50MB", "file.deep-flow",
                     "include.non-yaml-secret", "name.dotdot", "flags.unknown-command"]


@pytest.mark.parametrize("pid", SUBPROCESS_SAMPLE)
def test_subprocess_sample(pid, corpus_dir):
    argv = dict(CORPUS)[pid](corpus_dir)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "moebench", *argv], capture_output=True, text=True, timeout=120,
                          cwd=corpus_dir, env={**os.environ, "PYTHONPATH": str(ROOT)})
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert SECRET not in proc.stderr + proc.stdout
    if pid.startswith("file.") or pid.startswith("flags."):  # refused before torch is imported
        assert elapsed < LIMIT_S + 1.0, f"{elapsed:.2f} s"  # + interpreter start-up


def test_a_reader_that_stops_early_is_not_an_error():
    # `moebench list | head -1`: the pipe closes under the listing
    proc = subprocess.Popen([sys.executable, "-m", "moebench", "list"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, bufsize=0)
    proc.stdout.read(10)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == "", err
