"""Sweeps split over jobs: ``moebench run --shard I/N`` and ``moebench merge``.

Shard I of N (0 <= I < N) runs the suite's cases I, I+N, I+2N, ... (in the suite's order), so
any scheduler (a Slurm array, a CI matrix) can start N independent jobs; each writes its own
run folder with ``shard: "I/N"`` in meta.json. `merge_runs` joins the folders of one suite
into a new run folder: rows, batches and loads concatenated, checked to come from the same
suite file, to be distinct shards of one N, and to repeat no (case, router) pair.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from moebench.core.case import Suite
from moebench.core.errors import MoebenchError
from moebench.store.runs import RunDir, load_run, new_run_id, utc_now


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N); raises MoebenchError naming --shard."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise MoebenchError(f"--shard: expected I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def shard_suite(suite: Suite, index: int, count: int) -> Suite:
    """The suite with only shard ``index`` of ``count`` of its cases (sha256 unchanged: the
    shards of one suite file are one suite)."""
    return replace(suite, cases=tuple(c for i, c in enumerate(suite.cases) if i % count == index))


def merge_runs(paths: list[Path], results_root: Path) -> RunDir:
    """A new run folder under ``results_root/<suite>/`` holding every row of the shard runs."""
    runs = [load_run(p) for p in paths]
    metas = [r.meta() for r in runs]
    first = metas[0]
    for path, meta in zip(paths, metas):
        if meta.get("suite_sha256") != first.get("suite_sha256"):
            raise MoebenchError(f"{path}: comes from a different suite file than {paths[0]}; merge needs one suite")
        if bool(meta.get("quick")) != bool(first.get("quick")):
            raise MoebenchError(f"{path}: quick={meta.get('quick')}, {paths[0]}: quick={first.get('quick')}")
    shards = [m.get("shard") for m in metas]
    if all(shards):
        counts = {s.split("/")[1] for s in shards}
        if len(counts) > 1 or len(set(shards)) != len(shards):
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
    out = RunDir(Path(results_root) / str(first.get("suite")) / run_id)
    statuses = {m.get("status") for m in metas}
    meta = {**first, "run_id": run_id, "shard": None, "merged_from": [str(p) for p in paths],
            "merged_shards": shards, "cases": sum(int(m.get("cases") or 0) for m in metas),
            "started_at": min(str(m.get("started_at")) for m in metas), "ended_at": utc_now(),
            "status": "complete" if statuses == {"complete"} else "interrupted"}
    suite_copy = (runs[0].path / "suite.yaml")
    out.create(meta, suite_copy.read_text(encoding="utf-8") if suite_copy.exists() else "")
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
    dist.init_process_group("gloo", timeout=dt.timedelta(days=7))  # ranks finish at their own pace
    rank, world = dist.get_rank(), dist.get_world_size()
    box = [new_run_id()]
    dist.broadcast_object_list(box, src=0)
    root = Path(options.results_root) / ".shards" / box[0]
    mine = replace(options, results_root=root / f"rank{rank}")
    run = execute(shard_suite(suite, rank, world), mine,
                  on_open=lambda r: r.update_meta(shard=f"{rank}/{world}"))
    paths: list = [None] * world
    dist.all_gather_object(paths, str(run.path))
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
    dist.barrier()
    dist.destroy_process_group()
    return code
