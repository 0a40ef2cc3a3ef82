"""Kinds of case beyond plain routing: training, expert parallelism, traces.

Each folder is one kind, whose ``kind.py`` holds its `moebench.core.kinds.Kind` (``KIND``): the
seam through which the suite loader, the run loop, the report and the command line reach it.
A kind never imports another kind, run.session or cli (docs/architecture.md).
"""
