"""The report's "Trace statistics" section: for every trace a run replayed (a `trace` or
`trace_fit` workload whose ``path`` is a trace folder), the statistics of `moebench.kinds.traces.stats`.

The trace is read from its path as the suite gave it (relative to where the report is made);
a trace no longer there gets one line saying so instead of its tables.
"""

from __future__ import annotations

import json
from pathlib import Path

from moebench.core.errors import MoebenchError


def trace_paths(rows) -> list[str]:
    """Distinct trace paths of the rows' workloads, in order of appearance."""
    if "workload_params" not in getattr(rows, "columns", ()):
        return []
    found = []
    for text in rows["workload_params"].dropna().unique():
        try:
            params = json.loads(text)
        except (TypeError, json.JSONDecodeError):
            continue
        path = params.get("path") if isinstance(params, dict) else None
        if isinstance(path, str) and path not in found and not path.endswith(".json"):
            found.append(path)
    return found


def trace_section(data, out_dir: Path) -> str | None:
    """Markdown for every trace replayed by the runs; None when they replayed none."""
    paths = trace_paths(data.rows)
    if not paths:
        return None
    from moebench.kinds.traces.readers import open_trace
    from moebench.kinds.traces.stats import markdown, trace_stats

    experts = int(data.rows["experts"].iloc[0]) if "experts" in data.rows.columns and len(data.rows) else None
    body = ["## Trace statistics", "",
            "Per MoE layer of each replayed trace: `zipf_s` fitted Zipf exponent of expert popularity, "
            "`active` share of experts with load, `hot_x_uniform` hottest expert over the uniform load, "
            "`locality` share of tokens sharing an expert with the token before (`_shuffled`: the same "
            "after shuffling the tokens), `top1_repeat` first choice repeated, `id_consistency` share of "
            "a token id's occurrences routed to its usual first choice, `replay_match` share of tokens "
            "whose experts the matching moebench router reproduces (ties in the selection score counted; "
            "`replay_exact`: without). Cross-layer: `partner_share` "
            "(first choice in the next layer predicted from this one) against `popular_share` "
            "(always guessing the most popular). See docs/traces.md."]
    for path in paths:
        body += ["", f"### `{path}`", ""]
        try:
            body.append(markdown(trace_stats(open_trace(path, experts))))
        except MoebenchError as exc:
            body.append(f"(statistics unavailable: {exc})")
    return "\n".join(body)
