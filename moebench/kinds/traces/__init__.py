"""Router traces: record routing from real MoE models, read other tools' traces, replay them.

- format.py: the moebench trace (trace.json header + trace.safetensors tensors), reader/writer.
- megatron.py: Megatron-LM's ``router_trace_rank*.jsonl`` (+ ``logits_rank*.bin``) reader.
- readers.py: ``open_trace``, either format, told apart by its files.
- families.py: which transformers modules are routers, and the moebench router that matches each.
- recorder.py: forward hooks on a transformers model's routers (imports transformers lazily).
- workload.py: the ``trace`` and ``trace_fit`` workloads;  router.py: the ``recorded`` router.
- stats.py: popularity, Zipf fit, locality, consistency, cross-layer co-occurrence.
- section.py / cli.py: the report section and ``moebench trace``;  kind.py: the traces Kind.

Nothing here imports transformers at import time (docs/traces.md).
"""
