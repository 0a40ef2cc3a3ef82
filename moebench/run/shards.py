"""Sweeps split over jobs: ``moebench run --shard I/N`` and ``moebench merge``.

Shard I of N (0 <= I < N) runs the suite's cases I, I+N, I+2N, ... (in the suite's order), so
any scheduler (a Slurm array, a CI matrix) can start N independent jobs; each writes its own
run folder with ``shard: "I/N"`` in meta.json. `merge_runs` joins the folders of one suite
into a new run folder: rows, batches and loads concatenated, checked to come from the same
suite file, to be distinct shards of one N, and to repeat no (case, router) pair.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from dataclasses import replace
from pathlib import Path

from moebench.core.case import Suite
from moebench.core.errors import MoebenchError
from moebench.core.paths import inside, under
from moebench.store.environment import git as git_of
from moebench.store.runs import RunDir, load_run, new_run_id, utc_now


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N); raises MoebenchError naming --shard."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise MoebenchError(f"--shard: expected I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
    return int(m.group(1)), int(m.group(2))


log = logging.getLogger("moebench.run.shards")


def shard_suite(suite: Suite, index: int, count: int) -> Suite:
    """The suite with only shard ``index`` of ``count`` of its cases (sha256 unchanged: the
    shards of one suite file are one suite)."""
    return replace(suite, cases=tuple(c for i, c in enumerate(suite.cases) if i % count == index))


RUN_FILES = ("meta.json", "rows.jsonl", "batches.jsonl", "loads.jsonl", "steps.jsonl", "suite.yaml")
SUITE_COPY_MAX_BYTES = 16 << 20  # a suite file is a few KB; anything this large is not one


def _no_symlinks(path: Path) -> None:
    """Refuse a run folder whose files are symlinks: a crafted folder must not make merge read
    (and copy into the merged run) a file outside it."""
    for name in RUN_FILES:
        if (path / name).is_symlink():
            raise MoebenchError(f"{path / name}: is a symlink; merge reads only regular files in a run folder")


def _shard_of(path: Path, meta: dict) -> tuple[int, int] | None:
    """meta's ``shard`` as (I, N), None for an unsharded run; a MoebenchError if it is not I/N."""
    shard = meta.get("shard")
    if shard is None:
        return None
    m = re.fullmatch(r"(\d{1,9})/(\d{1,9})", shard) if isinstance(shard, str) else None
    if not m or int(m.group(1)) >= int(m.group(2)):
        shown = repr(shard)[:60]
        raise MoebenchError(f"{path}/meta.json: shard is {shown}; expected I/N with 0 <= I < N (e.g. \"0/4\")")
    return int(m.group(1)), int(m.group(2))


def code_identity(meta: dict) -> tuple[str, str]:
    """(moebench version, git commit or '?') of the code that made a run (from its meta.json)."""
    return str(meta.get("moebench_version") or "?")[:40], str(git_of(meta)["commit"] or "?")[:40]


def _suite_copy(run: RunDir) -> str:
    """The first shard's suite.yaml (a regular file of bounded size), else ''."""
    path = run.path / "suite.yaml"
    try:
        st = os.lstat(path)
    except OSError:
        return ""
    if not stat.S_ISREG(st.st_mode) or st.st_size > SUITE_COPY_MAX_BYTES:
        raise MoebenchError(f"{path}: expected a regular file of at most {SUITE_COPY_MAX_BYTES >> 20} MiB")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MoebenchError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None


def check_resume_shard(resume: Path, shard: tuple[int, int] | None) -> None:
    """``--resume`` continues a run only as the same shard it was started as (or unsharded as
    unsharded): shard 1/2 resumed into a run of shard 0/2 would mix the two."""
    meta = load_run(resume).meta()
    have = _shard_of(resume, meta)
    if have != (tuple(shard) if shard else None):
        was = f"shard {have[0]}/{have[1]}" if have else "not sharded"
        now = f"--shard {shard[0]}/{shard[1]}" if shard else "no --shard"
        raise MoebenchError(f"--resume {resume}: that run is {was}, this command has {now}; resume with the same --shard")


def merge_runs(paths: list[Path], results_root: Path, allow_mixed: bool = False) -> RunDir:
    """A new run folder under ``results_root/<suite>/`` holding every row of the shard runs.

    Refused: a symlinked file in a shard's folder, a suite name that would lead out of
    ``results_root`` (the check `run` uses, moebench/core/paths.py), a malformed ``shard``,
    shards of different suites or N, and shards made by different code (moebench version or
    git commit) unless ``allow_mixed`` (then one warning)."""
    for path in paths:
        _no_symlinks(Path(path))
    runs = [load_run(p) for p in paths]
    metas = [r.meta() for r in runs]
    first = metas[0]
    out_parent = under(results_root, first.get("suite"), what=f"{paths[0]}/meta.json: suite")
    for path, meta in zip(paths, metas):
        if meta.get("suite_sha256") != first.get("suite_sha256"):
            raise MoebenchError(f"{path}: comes from a different suite file than {paths[0]}; merge needs one suite")
        if bool(meta.get("quick")) != bool(first.get("quick")):
            raise MoebenchError(f"{path}: quick={meta.get('quick')}, {paths[0]}: quick={first.get('quick')}")
        if code_identity(meta) != code_identity(first):
            (v1, c1), (v2, c2) = code_identity(first), code_identity(meta)
            what = (f"{path} was made by moebench {v2} (commit {c2[:12]}), {paths[0]} by moebench {v1} "
                    f"(commit {c1[:12]})")
            if not allow_mixed:
                raise MoebenchError(f"merge: {what}; shards of different code may not be comparable "
                                    "(pass --allow-mixed to merge them anyway)")
            log.warning("merge --allow-mixed: %s", what)
    parsed = [_shard_of(p, m) for p, m in zip(paths, metas)]
    shards = [m.get("shard") for m in metas]
    if all(parsed):
        counts = {n for _, n in parsed}
        if len(counts) > 1 or len(set(parsed)) != len(parsed):
            raise MoebenchError(f"merge: expected distinct shards of one N, got {', '.join(shards)}")
    seen: dict[tuple[str, str], Path] = {}
    rows, batches, loads, steps = [], [], [], []
    for path, run in zip(paths, runs):
        for row in run.rows():
            key = (row["case_id"], row["router"])
            if key in seen:
                raise MoebenchError(f"{path}: case {key[0]} router {key[1]} is also in {seen[key]}")
            seen[key] = path
            rows.append(row)
        batches += run.batches()
        loads += run.loads()
        steps += run.steps() if hasattr(run, "steps") else []
    run_id = new_run_id()
    out = RunDir(inside(results_root, out_parent / run_id))
    statuses = {m.get("status") for m in metas}
    meta = {**first, "run_id": run_id, "shard": None, "merged_from": [str(p) for p in paths],
            "merged_shards": shards, "cases": sum(_count(m.get("cases")) for m in metas),
            "started_at": min(str(m.get("started_at")) for m in metas), "ended_at": utc_now(),
            "status": "complete" if statuses == {"complete"} else "interrupted"}
    if allow_mixed and len({code_identity(m) for m in metas}) > 1:
        meta["merged_code"] = [list(code_identity(m)) for m in metas]
    out.create(meta, _suite_copy(runs[0]))
    for record in batches:
        record["run_id"] = run_id
    out.append_batches(batches)
    for record in loads:
        out.append_loads({**record, "run_id": run_id})
    if steps:
        out.append_steps([{**record, "run_id": run_id} for record in steps])
    for row in rows:  # rows last, as a run writes them
        out.append_row({**row, "run_id": run_id})
    return out


def _count(value) -> int:
    """meta's ``cases`` as a count (0 when it is not a non-negative int)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


MAX_WORLD = 1 << 20
RENDEZVOUS_S = 60.0  # how long ranks wait for each other to start (MOEBENCH_RENDEZVOUS_S)


def _env_int(name: str, lo: int, hi: int, world: str = "") -> int:
    text = os.environ.get(name)
    if text is None:
        raise MoebenchError(f"torchrun environment: TORCHELASTIC_RUN_ID is set but {name} is not; "
                            "start moebench with torchrun (or unset TORCHELASTIC_RUN_ID)")
    try:
        value = int(text.strip())
    except ValueError:
        raise MoebenchError(f"torchrun environment: {name}={text[:40]!r}: expected an integer") from None
    if not lo <= value <= hi:
        raise MoebenchError(f"torchrun environment: {world}{name}={value}: expected {lo} <= {name} <= {hi}")
    return value


def torchrun_world() -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) when torchrun started this process as one of several, after checking
    torchrun's variables (each mistake is one MoebenchError line naming the variable: RANK
    outside [0, WORLD_SIZE), a non-integer, a missing MASTER_ADDR, a port outside 1-65535),
    before any process group starts. None outside torchrun, for one process, and in a rank
    moebench launched itself (MOEBENCH_LAUNCHED, moebench/kinds/parallel/launch.py)."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" not in env or "MOEBENCH_LAUNCHED" in env:
        return None
    world = _env_int("WORLD_SIZE", 1, MAX_WORLD)
    rank = _env_int("RANK", 0, world - 1, f"WORLD_SIZE={world} ")
    local_world = _env_int("LOCAL_WORLD_SIZE", 1, world, f"WORLD_SIZE={world} ") if "LOCAL_WORLD_SIZE" in env else world
    _env_int("LOCAL_RANK", 0, min(local_world, rank + 1) - 1, f"RANK={rank} LOCAL_WORLD_SIZE={local_world} ")
    if world == 1:
        return None
    if not env.get("MASTER_ADDR", "").strip():
        raise MoebenchError("torchrun environment: MASTER_ADDR is not set; start moebench with torchrun")
    _env_int("MASTER_PORT", 1, 65535)
    return rank, world


def under_torchrun() -> bool:
    """This process is one of several torchrun started (its rank and world in the environment,
    checked by `torchrun_world`)."""
    return torchrun_world() is not None


def rendezvous_s() -> float:
    """Seconds the ranks wait for each other to join (MOEBENCH_RENDEZVOUS_S, default 60): a rank
    whose peers never start ends with one line instead of waiting for days."""
    import math

    text = os.environ.get("MOEBENCH_RENDEZVOUS_S", str(RENDEZVOUS_S))
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 1 <= value <= 86400:
        raise MoebenchError(f"MOEBENCH_RENDEZVOUS_S={text[:40]!r}: expected seconds between 1 and 86400")
    return value


def join_torchrun_group(backend: str = "gloo") -> None:
    """init_process_group with the rendezvous timeout in seconds; a rendezvous that fails (peers
    that never start, a port in use) is one MoebenchError line."""
    import datetime as dt

    import torch.distributed as dist

    wait = rendezvous_s()
    try:
        dist.init_process_group(backend, timeout=dt.timedelta(seconds=wait))
    except RuntimeError as exc:  # DistStoreError, DistNetworkError: subclasses of RuntimeError
        first = " ".join((str(exc).strip().splitlines() or [""])[0].split())[:200]
        raise MoebenchError(
            f"torchrun: rank {os.environ.get('RANK')} of WORLD_SIZE={os.environ.get('WORLD_SIZE')} could not join "
            f"the others at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within {wait:g} s "
            f"(MOEBENCH_RENDEZVOUS_S): {first}") from None


def torchrun_sweep(suite: Suite, options, no_report: bool, reports_root: Path) -> int:
    """``torchrun --nproc-per-node N -m moebench run suite.yaml`` for a suite without a
    ``parallel:`` block: rank r runs shard r/N of the cases (on GPU r when there are several)
    into a folder of its own under ``<results>/.shards/``; when every rank is done, rank 0
    merges them into one run folder (and writes its report) and removes the shard folders."""
    import contextlib
    import datetime as dt
    import os
    import shutil

    import torch
    import torch.distributed as dist

    from moebench.run.session import execute

    if options.resume is not None:
        raise MoebenchError("--resume: not supported under torchrun; resume each shard with --shard I/N")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        torch.cuda.set_device(local)  # one GPU per rank
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", str(local))  # and for its isolated workers
    join_torchrun_group("gloo")  # the rendezvous waits seconds, not days
    rank, world = dist.get_rank(), dist.get_world_size()
    box = [new_run_id()]
    dist.broadcast_object_list(box, src=0)
    done_group = dist.new_group(backend="gloo", timeout=dt.timedelta(days=7))  # ranks finish at their own pace
    root = Path(options.results_root) / ".shards" / box[0]
    mine = replace(options, results_root=root / f"rank{rank}")
    run = execute(shard_suite(suite, rank, world), mine,
                  on_open=lambda r: r.update_meta(shard=f"{rank}/{world}"))
    paths: list = [None] * world
    dist.all_gather_object(paths, str(run.path), group=done_group)
    code = 0
    if rank == 0:
        merged = merge_runs([Path(p) for p in paths], Path(options.results_root))
        shutil.rmtree(root, ignore_errors=True)
        with contextlib.suppress(OSError):  # .shards/ itself, once no other sweep uses it
            root.parent.rmdir()
        print(f"results: {merged.path} ({len(merged.rows())} rows from {world} ranks)")
        if not no_report:
            from moebench.report.build import write_report

            print(f"report: {write_report([merged.path], reports_root)}")
    dist.barrier(group=done_group)
    dist.destroy_process_group()
    return code
