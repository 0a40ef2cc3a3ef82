"""#23: in a `parallel:` case one faulty router costs only its own row.

The faulty routers are a plugin (an entry point on PYTHONPATH, written here as a dist-info
folder, no pip needed) so that the spawned ranks load them as a user's plugin would. Each run
is one CLI subprocess on 2 gloo ranks (a few seconds per launch). ``FAULTY_OFF=1`` makes the
plugin healthy, which is how the resume test shows that error rows are run again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = '''
"""Routers that break the Routing contract, exit or kill their process (tests only)."""
import os
import signal
import sys
from dataclasses import dataclass, replace

import torch

from moebench.routers import TokenChoiceRouter, register


class _Faulty(TokenChoiceRouter):
    def good(self, inputs, ctx):
        probs = torch.softmax(inputs.logits.float(), dim=-1)
        top = torch.topk(probs, ctx.top_k, dim=-1)
        return self.finish(top.indices, top.values, probs, inputs.logits.float(), ctx)

    def route(self, inputs, ctx):
        routing = self.good(inputs, ctx)
        return routing if os.environ.get("FAULTY_OFF") else self.fault(routing)


@register("bad_ids")
@dataclass(frozen=True)
class BadIds(_Faulty):
    paper = "test"

    def fault(self, routing):
        return replace(routing, expert_index=routing.expert_index + 1000)


@register("nan_weights")
@dataclass(frozen=True)
class NanWeights(_Faulty):
    paper = "test"

    def fault(self, routing):
        return replace(routing, weight=torch.full_like(routing.weight, float("nan")))


@register("exits")
@dataclass(frozen=True)
class Exits(_Faulty):
    paper = "test"

    def fault(self, routing):
        sys.exit(3)


@register("sleeps")
@dataclass(frozen=True)
class Sleeps(_Faulty):
    """Writes its pid under $FAULTY_MARK, then sleeps (a case to kill moebench in)."""
    paper = "test"

    def fault(self, routing):
        mark = os.environ.get("FAULTY_MARK")
        if mark:
            with open(os.path.join(mark, str(os.getpid())), "w"):
                pass
        import time
        time.sleep(600)
        return routing


@register("kernel_sleeps")
@dataclass(frozen=True)
class KernelSleeps(_Faulty):
    """Runs a parallel numba kernel on the rank (numba starts its threading layer), then does
    what `sleeps` does."""
    paper = "test"

    def fault(self, routing):
        from moebench.core import kernels
        if kernels.available():
            rows = 2 * kernels.PARALLEL_MIN_WORK // 16  # T * E past the parallel threshold
            kernels.topk_select(torch.rand(rows, 16), 2)
        return Sleeps.fault(self, routing)


@register("segfaults")
@dataclass(frozen=True)
class Segfaults(_Faulty):
    paper = "test"

    def fault(self, routing):
        os.kill(os.getpid(), signal.SIGSEGV)
'''

SUITE = """
name: pfaults
version: 1
grid: {workload: uniform, tokens: 64, experts: 4, top_k: 2, hidden: 8}
routers: [bad_ids, topk, nan_weights, exits, segfaults]
parallel: {ep: 2, experts: identity, timeout_s: 30}
timing: {enabled: false}
"""


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("faulty_site")
    (site / "moebench_faulty_routers.py").write_text(PLUGIN)
    info = site / "moebench_faulty_routers-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: moebench-faulty-routers\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[moebench.routers]\nfaulty = moebench_faulty_routers\n")
    return site


def moebench(args, plugin: Path, cwd: Path, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "MOEBENCH"))}
    full.update(PYTHONPATH=os.pathsep.join([str(plugin), str(ROOT)]), **env)
    return subprocess.run([sys.executable, "-m", "moebench", *args], capture_output=True, text=True, env=full,
                          cwd=cwd, timeout=420)


def rows_of(run: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in (run / "rows.jsonl").read_text().splitlines() if line.strip()]
    return {r["router"]: r for r in rows}  # the last row of each router wins, as RunDir.rows does


def test_faulty_routers_cost_only_their_own_rows_and_resume_redoes_them(plugin, tmp_path):
    (tmp_path / "s.yaml").write_text(SUITE)
    done = moebench(["run", "s.yaml", "--results", "r", "--no-report"], plugin, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    (run,) = (tmp_path / "r" / "pfaults").iterdir()
    rows = rows_of(run)
    status = {k: r["status"] for k, r in rows.items()}
    assert status == {"topk": "ok", "bad_ids": "error", "nan_weights": "error",
                      "exits": "error", "segfaults": "error"}, {k: r["reason"] for k, r in rows.items()}
    assert "InvalidRouting" in rows["bad_ids"]["reason"] and "expert_index" in rows["bad_ids"]["reason"]
    assert "InvalidRouting" in rows["nan_weights"]["reason"] and "weight" in rows["nan_weights"]["reason"]
    assert "sys.exit(3)" in rows["exits"]["reason"]
    assert "signal" in rows["segfaults"]["reason"] or "SIGSEGV" in rows["segfaults"]["reason"]
    assert rows["topk"]["tokens_conserved"] and rows["topk"]["exchange_matches_routing"]
    # --resume runs the error rows again (here the plugin is healthy by then) and keeps the ok ones
    before = rows["topk"]
    again = moebench(["run", "s.yaml", "--results", "r", "--no-report", "--resume", str(run)], plugin, tmp_path,
                     FAULTY_OFF="1")
    assert again.returncode == 0, again.stderr[-3000:]
    rows = rows_of(run)
    assert {k: r["status"] for k, r in rows.items()} == dict.fromkeys(status, "ok")
    assert rows["topk"] == before  # not run again
    lines = (run / "rows.jsonl").read_text().splitlines()
    assert len(lines) == 5 + 4


MODEL_SUITE = """
name: mfaults
version: 1
grid: {workload: uniform, tokens: 64, experts: 4, top_k: 1, hidden: 8}
routers: [topk, exits, bad_ids, nan_weights, switch]
parallel: {mode: model, ep: [2, 4], profile: h800_deepep}
"""


def test_cost_model_suite_turns_exit_and_bad_routings_into_error_rows(plugin, tmp_path):
    (tmp_path / "m.yaml").write_text(MODEL_SUITE)
    done = moebench(["run", "m.yaml", "--results", "r", "--no-report"], plugin, tmp_path)
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    (run,) = (tmp_path / "r" / "mfaults").iterdir()
    rows = rows_of(run)
    assert {k: r["status"] for k, r in rows.items()} == {
        "topk": "ok", "switch": "ok", "exits": "error", "bad_ids": "error", "nan_weights": "error"}
    assert rows["exits"]["reason"] == "exited: the router called sys.exit(3)"
    assert "InvalidRouting" in rows["bad_ids"]["reason"] and "InvalidRouting" in rows["nan_weights"]["reason"]


def group_members(pgid: int) -> list[str]:
    """'pid command' of every live process in process group ``pgid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
        except OSError:
            continue
        fields = stat.rsplit(b")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            found.append(f"{entry.name} {cmd}")
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="lists processes from /proc")
def test_kill9_of_moebench_mid_case_leaves_no_process_behind(plugin, tmp_path):
    (tmp_path / "k.yaml").write_text(SUITE.replace("name: pfaults", "name: kill9").replace(
        "routers: [bad_ids, topk, nan_weights, exits, segfaults]", "routers: [sleeps]").replace(
        "timeout_s: 30", "timeout_s: 120"))
    mark = tmp_path / "mark"
    mark.mkdir()
    full = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "MOEBENCH"))}
    full.update(PYTHONPATH=os.pathsep.join([str(plugin), str(ROOT)]), FAULTY_MARK=str(mark))
    cli = subprocess.Popen([sys.executable, "-m", "moebench", "run", "k.yaml", "--results", "r", "--no-report"],
                           cwd=tmp_path, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)  # its own process group: everything it starts
    try:
        deadline = time.monotonic() + 240
        while len(list(mark.iterdir())) < 2:  # both ranks are inside the router
            assert cli.poll() is None, "moebench ended before the case started"
            assert time.monotonic() < deadline, "the ranks never started"
            time.sleep(0.2)
        ranks = sorted(int(p.name) for p in mark.iterdir())
        assert len(group_members(cli.pid)) >= 3  # moebench, its fork server, 2 ranks (and more)
        os.kill(cli.pid, signal.SIGKILL)
        time.sleep(10)  # not reaped yet on purpose: a zombie parent must not keep its ranks alive
        left = [m for m in group_members(cli.pid) if not m.startswith(f"{cli.pid} ")]
        assert left == [], left
        assert not any(Path(f"/proc/{pid}").exists() for pid in ranks)
    finally:
        cli.kill()
        cli.wait()
        for member in group_members(cli.pid):  # clean up after a failure: only this test's group
            os.kill(int(member.split()[0]), signal.SIGKILL)


SIGTERM_SUITE = """
name: term
version: 1
grid: {workload: uniform, tokens: 64, experts: 4, top_k: 2, hidden: 8}
routers: [topk, kernel_sleeps]
parallel: {ep: 2, experts: identity, timeout_s: 120}
timing: {enabled: false}
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="lists processes from /proc")
def test_sigterm_of_a_parallel_run_leaks_no_semaphore_and_prints_no_traceback(plugin, tmp_path):
    """#23: SIGTERM at three moments of a 2-rank run: as soon as the run folder exists (the fork
    server is starting), 1.5 s later (the launch), and once both ranks sleep in a router after a
    parallel numba kernel (numba's init lock, registered with multiprocessing's resource tracker,
    made every such kill print "There appear to be 2 leaked semaphore objects"; a kill while the
    fork server imported torch printed a FileNotFoundError traceback from a rank born after
    moebench had unlinked the launcher's semaphores). Each ends with the one 'terminated' line
    and nothing else of note, leaves no process, and an interrupted run folder that --resume
    completes."""
    (tmp_path / "t.yaml").write_text(SIGTERM_SUITE)
    full = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "MOEBENCH"))}
    full.update(PYTHONPATH=os.pathsep.join([str(plugin), str(ROOT)]))
    for moment in ("folder", "folder+1.5s", "ranks_in_router"):
        mark = tmp_path / f"mark-{moment}"
        mark.mkdir()
        results = tmp_path / f"r-{moment}"
        cli = subprocess.Popen([sys.executable, "-m", "moebench", "run", "t.yaml", "--results", str(results),
                                "--no-report"], cwd=tmp_path, env=dict(full, FAULTY_MARK=str(mark)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while not (list(results.glob("term/*/meta.json")) if moment.startswith("folder")
                       else len(list(mark.iterdir())) >= 2):
                assert cli.poll() is None, (moment, cli.communicate()[1][-3000:])
                assert time.monotonic() < deadline, f"{moment}: never reached"
                time.sleep(0.05)
            if moment == "folder+1.5s":
                time.sleep(1.5)
            cli.send_signal(signal.SIGTERM)
            _, err = cli.communicate(timeout=120)  # EOF once every process holding stderr ended
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
            for member in group_members(cli.pid):  # clean up after a failure: only this group
                os.kill(int(member.split()[0]), signal.SIGKILL)
        assert cli.returncode == 143, (moment, err[-3000:])
        assert "leaked" not in err and "Traceback" not in err, (moment, err[-3000:])
        assert "moebench: terminated (SIGTERM); every finished row is on disk" in err, (moment, err[-3000:])
        assert group_members(cli.pid) == []
        (run,) = (results / "term").iterdir()
        meta = json.loads((run / "meta.json").read_text())
        assert meta["status"] == "interrupted" and meta["stopped_by"] == "SIGTERM" and meta["ended_at"], meta
        assert not (run / "rows.jsonl").exists() or rows_of(run) == {}  # the one case never finished
    done = moebench(["run", "t.yaml", "--results", str(results), "--no-report", "--resume", str(run)], plugin,
                    tmp_path, FAULTY_OFF="1")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert {k: r["status"] for k, r in rows_of(run).items()} == {"topk": "ok", "kernel_sleeps": "ok"}
