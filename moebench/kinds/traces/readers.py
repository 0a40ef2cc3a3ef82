"""Opening a trace of any supported format: a moebench trace folder (format.py) or a
Megatron-LM trace folder (megatron.py), told apart by their files.

Its own module because it knows both readers: format.py and megatron.py each know only their
own format (megatron.py builds on format.py's types), so neither imports the other back.
"""

from __future__ import annotations

from pathlib import Path

from moebench.kinds.traces.format import HEADER, Trace, read_trace
from moebench.kinds.traces.megatron import read_megatron


def open_trace(path: str | Path, num_experts: int | None = None) -> Trace:
    """A moebench trace folder or a Megatron-LM trace folder (router_trace_rank*.jsonl),
    told apart by their files. ``num_experts``: E for Megatron traces without logits."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    if not (folder / HEADER).exists() and folder.is_dir() and any(folder.glob("router_trace_rank*.jsonl")):
        return read_megatron(folder, num_experts)
    return read_trace(path)
