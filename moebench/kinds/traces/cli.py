"""`moebench trace record | stats`: parse, call, print (the work is in recorder.py and stats.py)."""

from __future__ import annotations

import json
from pathlib import Path


def _cmd_record(args) -> int:
    from moebench.kinds.traces.format import read_trace
    from moebench.kinds.traces.recorder import record

    out = record(args.model, args.text, args.out, max_tokens=args.max_tokens, device=args.device,
                 dtype=args.dtype, tokenizer=args.tokenizer, context=args.context, progress=not args.quiet)
    h = read_trace(out).header
    print(f"trace: {out} ({h['family']}, {h['tokens']} tokens, {len(h['layers'])} MoE layers, "
          f"E={h['num_experts']}, k={h['top_k']})")
    return 0


def _cmd_stats(args) -> int:
    from moebench.kinds.traces.readers import open_trace
    from moebench.kinds.traces.stats import fit_shape, markdown, trace_stats

    trace = open_trace(args.trace, args.experts)
    stats = trace_stats(trace)
    print(markdown(stats))
    if args.json:
        Path(args.json).write_text(json.dumps(stats, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"stats: {args.json}")
    if args.shape:
        Path(args.shape).write_text(json.dumps(fit_shape(trace), indent=2) + "\n", encoding="utf-8")
        print(f"shape: {args.shape} (for the trace_fit workload)")
    return 0


def add_parser(sub) -> None:
    """Add `trace` with its `record` and `stats` subcommands to the main parser's subparsers."""
    trace = sub.add_parser("trace", help="record router traces from transformers MoE models; trace statistics")
    tsub = trace.add_subparsers(dest="trace_command", required=True)

    rec = tsub.add_parser("record", help="run text through a transformers MoE model and record its routing")
    rec.add_argument("model", metavar="MODEL", help="local model folder, or a hub id you have access to")
    rec.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text to run through the model")
    rec.add_argument("--out", required=True, metavar="DIR", help="trace folder to write")
    rec.add_argument("--max-tokens", type=int, metavar="N", help="record at most N tokens of the text")
    rec.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    rec.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                     help="model dtype (default: as saved)")
    rec.add_argument("--tokenizer", default="model", metavar="NAME",
                     help="model (its own, default), bytes (UTF-8 bytes as ids) or a tokenizer folder")
    rec.add_argument("--context", type=int, default=2048, metavar="N",
                     help="tokens per forward pass (independent windows; default 2048)")
    rec.add_argument("--quiet", action="store_true", help="no progress bar")
    rec.set_defaults(fn=_cmd_record)

    st = tsub.add_parser("stats", help="per-layer popularity, Zipf fit, locality, consistency, co-occurrence")
    st.add_argument("trace", metavar="DIR", help="moebench trace folder or Megatron-LM router_trace folder")
    st.add_argument("--experts", type=int, metavar="E", help="E for a Megatron trace without logits")
    st.add_argument("--json", metavar="FILE", help="also write every statistic as JSON")
    st.add_argument("--shape", metavar="FILE", help="write the fitted shape (popularity, locality) for trace_fit")
    st.set_defaults(fn=_cmd_stats)
