"""The batches of a case's stream, made when they are read, not all up front.

Every router of a case routes the same stream, so batches are worth keeping between routers,
but a long stream of large batches held at once exhausts memory (1000 batches of
T=65536, E=64, d=1024 in float32 are 280 GB). `Batches` keeps batch 0 (timed, and used by
the memcopy bounds) and as many later batches as fit in ``cache_bytes``; the rest are made
again when read. A workload's batch b depends only on (seed, b) (workloads.py), so a batch
made again is the same batch. Router state is carried by the runner across batches, not here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from moebench.core.routing import RouteInputs
from moebench.core.workloads import BatchShape


def _nbytes(inputs: RouteInputs) -> int:
    total = 0
    for x in (inputs.logits, inputs.hidden, inputs.token_ids, inputs.vocab_freq):
        if x is not None:
            total += x.numel() * x.element_size()
    return total


class Batches(Sequence):
    """``count`` batches of ``workload`` at ``shape`` and ``seed``: batches[b] is batch b
    (RouteInputs: logits <dtype>[T, E], hidden <dtype>[T, d], ...), made on first read and
    kept while the kept batches total at most ``cache_bytes`` (batch 0 always)."""

    def __init__(self, workload, shape: BatchShape, seed: int, count: int, cache_bytes: int):
        self.workload = workload
        self.shape = shape
        self.seed = seed
        self.count = count
        self.cache_bytes = cache_bytes
        self._kept: dict[int, RouteInputs] = {}
        self._kept_bytes = 0
        self.made = 0  # batches generated so far (a regenerated batch counts again)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, b: int) -> RouteInputs:
        if isinstance(b, slice):
            raise TypeError("Batches does not slice; read batches one at a time")
        if b < 0:
            b += self.count
        if not 0 <= b < self.count:
            raise IndexError(f"batch {b} of a stream of {self.count}")
        if b in self._kept:
            return self._kept[b]
        inputs = self.workload.batch(self.shape, self.seed, b)
        self.made += 1
        size = _nbytes(inputs)
        if b == 0 or self._kept_bytes + size <= self.cache_bytes:
            self._kept[b] = inputs
            self._kept_bytes += size
        return inputs

    def __iter__(self) -> Iterator[RouteInputs]:
        for b in range(self.count):
            yield self[b]
