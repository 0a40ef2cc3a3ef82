"""Make the small committed trace that suites/trace_replay.yaml replays (needs transformers).

A tiny randomly initialised Qwen3-MoE (E=16, k=2, 3 MoE layers, hidden 32, bfloat16) built
from a config, fed the UTF-8 bytes of docs/architecture.md and README.md as token ids, recorded
through `moebench.kinds.traces.recorder.record_model`. Deterministic for a given transformers version
and text:  .venv/bin/python scripts/make_tiny_trace.py [OUT]
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moebench.kinds.traces.format import write_trace  # noqa: E402
from moebench.kinds.traces.recorder import record_model  # noqa: E402
from moebench.kinds.traces.tiny import tiny_model  # noqa: E402

TOKENS = 4096


def main(out: str = "tests/data/traces/tiny_qwen3_moe") -> None:
    text = "\n\n".join((ROOT / p).read_text(encoding="utf-8") for p in ("docs/architecture.md", "README.md"))
    data = text.encode("utf-8")[:TOKENS]
    model = tiny_model("qwen3_moe", seed=0, num_experts=16, num_hidden_layers=3).to(torch.bfloat16)
    header, layers, ids = record_model(
        model, torch.tensor(list(data), dtype=torch.int64), context=512, progress=False,
        model_name="tiny-qwen3-moe (random init, E=16, k=2, d=32)", tokenizer="bytes",
        text_sha256=hashlib.sha256(data).hexdigest(),
    )
    print(write_trace(ROOT / out, header, layers, ids))


if __name__ == "__main__":
    main(*sys.argv[1:])
