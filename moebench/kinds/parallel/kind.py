"""The parallel kind (moebench/core/kinds.py): a suite with a ``parallel:`` block runs each case
as an expert-parallel MoE layer on torch.distributed ranks, or through the cost model
(docs/parallel.md). Under torchrun, rank 0 runs the session and the other ranks follow it.

Hooks import their modules when called: this module is loaded by every `moebench` command.
"""

from __future__ import annotations

from moebench.core.kinds import Block, Kind, Launch, Metric


def _parse(value, ctx):
    from moebench.kinds.parallel.spec import parse_parallel

    return parse_parallel(value, ctx.fail)


def _cases(spec, cases: list, fail) -> list:
    from moebench.kinds.parallel.spec import check_cases

    check_cases(spec, cases, fail)  # tokens and expert slots split evenly over the ranks
    return cases


def _rows(suite, case, timing, base_row: dict, skip: set[str], quick: bool = False):
    from moebench.kinds.parallel.rows import parallel_rows

    return parallel_rows(suite, case, timing, base_row, skip)


def _follow(suite) -> int | None:
    from moebench.kinds.parallel.launch import follow_if_torchrun

    return follow_if_torchrun(suite)


def _release(suite) -> None:
    from moebench.kinds.parallel.launch import release_followers

    release_followers()


def _section(data, out_dir):
    from moebench.kinds.parallel.section import parallel_section

    return parallel_section(data, out_dir)


_RANKS = "the ranks' experts"
METRICS = (
    # engine rows (mode: engine): the stream's last batch, as the ranks measured it (rows.py)
    Metric("rank_imbalance", "lower", True, f"max / mean of the rows {_RANKS} processed"),
    Metric("rank_imbalance_contiguous", "lower", True,
           "rank_imbalance of the same routing on the contiguous layout (the 'before' of EPLB)"),
    Metric("remote_fraction", "lower", True, "share of dispatched rows that leave their rank"),
    Metric("inter_node_fraction", "lower", True, "share of dispatched rows that leave their node"),
    Metric("straggler_ratio", "lower", False, "slowest rank's layer time / mean over ranks"),
    Metric("expert_straggler_ratio", "lower", False, "slowest rank's expert time / mean over ranks"),
    *(Metric(f"{phase}_ms", "lower", False, f"{what}: max over ranks of each rank's median (ms)")
      for phase, what in (("layer", "the whole layer"), ("a2a", "both all-to-alls"), ("expert", "the experts"),
                          ("permute", "permute"), ("dispatch", "the dispatch all-to-all"),
                          ("combine", "the combine all-to-all"), ("unpermute", "unpermute"))),
    # model rows (mode: model): ``model.ep<N>.<field>`` per EP size N, predicted by the cost
    # model from the routing and a profile (reproducible)
    *(Metric(f"model.ep[0-9]*.{field}", "lower", True, f"cost model at EP size N: {what}")
      for field, what in (("dispatch_ms", "dispatch time"), ("combine_ms", "combine time"),
                          ("expert_ms", "expert time"), ("layer_ms", "layer time"),
                          ("rank_imbalance", "max / mean of the rows each rank receives"),
                          ("straggler_ratio", "slowest rank's layer time / mean"),
                          ("remote_fraction", "share of rows that leave their rank"))),
)

KIND = Kind(
    name="parallel",
    description="an expert-parallel layer on torch.distributed ranks, or the cost model",
    block=Block("parallel", _parse, {"type": "object", "description": "expert-parallel settings (docs/parallel.md)"},
                cases=_cases),
    rows=_rows,
    launch=Launch(follow=_follow, release=_release),
    section=_section,
    metrics=METRICS,
)
