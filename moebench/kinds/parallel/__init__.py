"""Expert parallelism (docs/parallel.md): a suite's ``parallel:`` block runs each case as an
expert-parallel MoE layer on torch.distributed ranks, or through a cost model.

kind.py       the parallel Kind: its block, rows, torchrun hooks, section and metrics
spec.py       the ``parallel:`` block and its validation
placement.py  contiguous, round-robin and EPLB placements (pure tensor functions)
plan.py       a rank's dispatch plan and the layer's byte matrix, from a Routing
layer.py      sharding, per-rank routing, experts, and the single-process reference layer
engine.py     what every rank runs (all_to_all_single dispatch and combine, timed phases)
launch.py     starting the ranks: the elastic launcher, or torchrun
costmodel.py  predicted all-to-all and layer times from byte matrices and a profile
profiles.py   hardware profiles with their sources; DeepEP's published tables
published.py  the cost model beside DeepEP's tables
pingpong.py   the gloo_local profile, fitted by a ping-pong on this machine
rows.py       rows of parallel cases (engine and model); the session's hook
section.py    the report's "Expert parallelism" section
shards.py     ``run --shard I/N`` and ``merge``
"""
