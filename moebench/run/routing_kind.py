"""Plain routing: the kind of every suite without another kind's block (moebench/core/kinds.py).

Each router routes the case's workload batches, timed phase by phase, in a worker process
(``timing.isolate``, moebench/run/isolation.py) or in this one (moebench/run/runner.py). Its
metrics (routing balance, drops, losses and phase times) are core's own (moebench/core/metrics.py).
It brings the router catalog (moebench/routers/catalog.py) and the peers (moebench/peers/:
other systems' routers, by name ``peer:<system>.<fn>``), which every kind of case can name.
"""

from __future__ import annotations

from moebench.core.kinds import Kind


def routing_rows(suite, case, timing, base_row: dict, skip: set[str], quick: bool = False):
    """The RowResults of a plain case, one per router not in ``skip``. With ``timing.isolate``
    a router that segfaults, hangs past ``timing.timeout_s`` or exits gives an error row."""
    if timing.isolate:
        from moebench.run.isolation import isolated_rows

        return isolated_rows(case, timing, base_row, list(suite.routers), skip)
    from moebench.run.runner import CaseRunner

    return CaseRunner(case, timing, base_row).rows(list(suite.routers), skip)


KIND = Kind(
    name="routing",
    description="routers on workload batches: balance, drops and phase times",
    rows=routing_rows,
    routers=("moebench.routers.catalog", "moebench.peers"),
)
