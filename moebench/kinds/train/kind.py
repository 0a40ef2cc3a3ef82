"""The train kind (moebench/core/kinds.py): a suite with a ``train:`` block trains a small MoE
layer per case x router x seed (docs/training.md) instead of routing workload batches.

Its block's tasks stand in for the workload axis (and ``tokens_per_step`` for tokens); the
cases it trains carry the training capacity factor (spec.py). Hooks import their modules
when called: this module is loaded by every `moebench` command.
"""

from __future__ import annotations

from moebench.core.kinds import Block, Kind
from moebench.kinds.train.metrics import TRAIN_METRICS


def _parse(value, ctx):
    from moebench.kinds.train.spec import parse_train
    from moebench.kinds.train.task_registry import TASKS  # names without torch (#23)

    return parse_train(value, ctx.fail, lambda item, field: ctx.named(item, field, TASKS),
                       [r.display for r in ctx.routers])


def _axes(spec, document: dict, fail) -> dict:
    from moebench.kinds.train.spec import train_axes

    return train_axes(document, spec, fail)


def _cases(spec, cases: list, fail) -> list:
    return spec.trained_cases(cases)  # named by their training capacity factor (spec.py)


def _rows(suite, case, timing, base_row: dict, skip: set[str], quick: bool = False):
    from moebench.kinds.train.loop import train_rows

    return train_rows(suite, case, timing, base_row, skip, quick)


def _meta(suite, cases: list) -> dict:
    # a variant trains only its own routers (else the report's default: cases x routers)
    return {"planned_rows": suite.blocks["train"].planned_rows(cases, suite.routers)}


def _section(data, out_dir):
    from moebench.kinds.train.section import training_section

    return training_section(data, out_dir)


KIND = Kind(
    name="train",
    description="a small MoE layer trained per router: balance, collapse and specialisation while it learns",
    block=Block("train", _parse, {"type": "object", "description": "training settings (docs/training.md)"},
                axes=_axes, cases=_cases, supplies=("workload", "tokens")),
    rows=_rows,
    meta=_meta,
    section=_section,
    metrics=TRAIN_METRICS,
)
