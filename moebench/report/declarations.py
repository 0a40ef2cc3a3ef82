"""What routers declare about themselves, as the report reads it: baseline flags and case notes.

Routers declare (class attributes in moebench/routers/, docs/spec.md §2) ``baseline`` (a
reference point: never ranked best) and ``case_notes`` (condition -> one sentence, said where a
case axis does not apply to the router). The run records both per router label in meta.json
``router_declarations``; the report reads them from there and never imports the routers
(dependency rule: report never imports moebench.routers).

Runs recorded before meta carried declarations fall back to :data:`LEGACY`, keyed on the
registry name (row ``router_name``); tests/test_report_summary.py checks it equals what the
router classes declare.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

# The conditions a case note may name, and what in a case makes them hold.
CONDITIONS = {  # condition -> where it holds, as the report says it
    "dropless": "in dropless cases",
    "capacity": "in cases with a capacity factor",
    "single_batch": "in one-batch cases (batches: 1)",
    "always": "in every case",
}

LEGACY: dict[str, dict] = {
    "softmax_dense": {"baseline": True, "case_notes": {
        "capacity": "dense softmax sends every token to every expert: top_k and the capacity factor do "
                    "not apply, it never drops, and its balance is that of the uniform split"}},
    "random": {"baseline": True, "case_notes": {}},
    "round_robin": {"baseline": True, "case_notes": {}},
    "expert_choice": {"baseline": False, "case_notes": {
        "dropless": "expert choice has its own capacity (each expert takes ceil(k*T/E) tokens when the "
                    "case is dropless): tokens no expert picks are dropped, so 'dropless' does not apply"}},
    "deepseek": {"baseline": False, "case_notes": {
        "single_batch": "its expert bias starts at zero and updates only after a batch: with batches: 1 it "
                        "never updates, so the aux-loss-free balancing plays no part (without a group "
                        "limit it picks the same experts as topk)"}},
}


@dataclass
class Declarations:
    """baseline: router labels that are reference points.  notes: label -> {condition: text}."""

    baseline: set[str] = field(default_factory=set)
    notes: dict[str, dict[str, str]] = field(default_factory=dict)

    def is_baseline(self, router: str) -> bool:
        return str(router) in self.baseline


def _one(declared) -> tuple[bool, dict[str, str]]:
    if not isinstance(declared, dict):
        return False, {}
    notes = declared.get("case_notes") if isinstance(declared.get("case_notes"), dict) else {}
    return bool(declared.get("baseline")), {str(k): str(v) for k, v in notes.items() if k in CONDITIONS}


def declarations(metas: list[dict], rows: pd.DataFrame) -> Declarations:
    """The declarations of every router label in ``rows``: from each meta's
    ``router_declarations``, else :data:`LEGACY` by the row's ``router_name``."""
    out = Declarations()
    recorded: dict[str, dict] = {}
    for meta in metas:
        found = meta.get("router_declarations") if isinstance(meta, dict) else None
        if isinstance(found, dict):
            recorded.update({str(k): v for k, v in found.items()})
    names = {}
    if not rows.empty and "router" in rows.columns:
        name_col = rows["router_name"] if "router_name" in rows.columns else rows["router"]
        names = dict(zip(rows["router"].astype(str), name_col.astype(str)))
    labels = set(names) | set(recorded)
    for label in labels:
        declared = recorded.get(label, LEGACY.get(names.get(label, label), LEGACY.get(label)))
        baseline, notes = _one(declared)
        if baseline:
            out.baseline.add(label)
        if notes:
            out.notes[label] = notes
    return out
