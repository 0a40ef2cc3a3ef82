"""The traces kind (moebench/core/kinds.py): recorded routing replayed through every router
(docs/traces.md). No suite block of its own: a suite replays a trace through the ``trace`` and
``trace_fit`` workloads and the ``recorded`` router, which this kind registers; it brings the
report's trace statistics and ``moebench trace record | stats``.
"""

from __future__ import annotations

from moebench.core.kinds import Kind


def _section(data, out_dir):
    from moebench.kinds.traces.section import trace_section

    return trace_section(data, out_dir)


def _commands(sub) -> None:
    from moebench.kinds.traces.cli import add_parser  # argparse only; recording imports lazily

    add_parser(sub)


KIND = Kind(
    name="traces",
    description="routing recorded from real MoE models, replayed through every router",
    section=_section,
    section_at="inputs",
    routers=("moebench.kinds.traces.router",),
    workloads=("moebench.kinds.traces.workload",),
    commands=_commands,
)
