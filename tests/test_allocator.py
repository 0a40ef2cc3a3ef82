"""timing.cpu_allocator: glibc's defaults, or large blocks kept for reuse between calls."""

from __future__ import annotations

import os

import pytest
import torch

from moebench.run.allocator import allocator_problem, cpu_allocator
from moebench.suite.load import validate_document

glibc = pytest.mark.skipif(allocator_problem("reuse") is not None, reason="needs glibc's mallopt")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _touch_and_free(nbytes: int) -> int:
    """RSS growth that stays after a tensor of nbytes is written and freed."""
    before = _rss_bytes()
    x = torch.ones(nbytes // 4)
    del x
    return _rss_bytes() - before


@glibc
def test_reuse_keeps_large_blocks_and_system_returns_them():
    big = 96 * 2**20  # above glibc's largest mmap threshold (32 MiB)
    assert _touch_and_free(big) < big // 4  # mmap'd, unmapped on free
    with cpu_allocator("reuse") as mode:
        assert mode == "reuse"
        assert _touch_and_free(big) > big // 2  # from the heap, kept for the next call
    # restored: a new large block is mmap'd and given back again
    assert _touch_and_free(2 * big) < big // 4


def test_system_is_a_no_op_and_bad_names_are_refused():
    with cpu_allocator("system") as mode:
        assert mode == "system"
    assert "one of system, reuse" in allocator_problem("jemalloc")
    with pytest.raises(ValueError, match="one of system, reuse"):
        with cpu_allocator("jemalloc"):
            pass


def test_suite_field_is_validated(tmp_path):
    doc = {"name": "s", "version": 1, "grid": {"workload": "uniform", "tokens": 64, "experts": 4, "top_k": 1,
                                                "capacity_factor": 1.0},
           "routers": ["topk"], "timing": {"cpu_allocator": "reuse"}}
    assert validate_document(doc, "s.yaml").timing.cpu_allocator == "reuse"
    doc["timing"]["cpu_allocator"] = "resue"
    with pytest.raises(Exception, match=r"s\.yaml.*timing\.cpu_allocator.*reuse"):
        validate_document(doc, "s.yaml")


@glibc
def test_rows_record_the_allocator_and_keep_the_metrics(tmp_path):
    from moebench.run.session import RunOptions, execute
    from moebench.suite.load import load_suite

    rows = {}
    for mode in ("system", "reuse"):
        path = tmp_path / f"{mode}.yaml"
        path.write_text(
            "name: alloc\nversion: 1\n"
            "grid: {workload: zipf, tokens: 256, experts: 8, top_k: 2, capacity_factor: 1.0}\n"
            "routers: [topk]\n"
            f"timing: {{warmup_rounds: 1, min_rounds: 2, max_rounds: 3, min_time_s: 0.0, threads: 1, cpu_allocator: {mode}}}\n")
        (rows[mode],) = execute(load_suite(path), RunOptions(results_root=tmp_path / mode)).rows()
    assert (rows["system"]["cpu_allocator"], rows["reuse"]["cpu_allocator"]) == ("system", "reuse")
    for metric in ("imbalance", "drop_rate", "aux_loss"):
        assert rows["system"][metric] == rows["reuse"][metric]
    assert rows["reuse"]["route.median_ms"] > 0
