"""Capturable dispatch and combine: fixed output sizes, one slot per assignment.

The eager `moebench.core.dispatch.dispatch` returns N rows, N = the number of kept assignments,
a size only the data knows (``kept.nonzero()``, ``bincount``). Here the output has one slot
for each of the A assignments of the Routing: the N kept ones first, in the eager order
(expert-contiguous; within an expert, assignment order), then the A - N dropped ones, which
are marked invalid by the token index T. Rows [0, N) are the eager dispatch's rows bit for
bit; combine sends the invalid slots to a spare output row T that it then cuts off.

The A slots cost A - N extra row copies against eager (the drop rate's share of the rows);
an [E, C] padded layout would cost E*C >= A slots with a capacity and E*T when dropless.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moebench.core.dispatch import Dispatched, combine, dispatch
from moebench.core.routing import Routing


@dataclass(frozen=True)
class SlotDispatched(Dispatched):
    """`Dispatched` in A fixed slots (see the module docstring).

    rows        <dtype>[A, d]: kept rows in expert-contiguous order, then the dropped
                assignments' rows (unspecified content: the dropped token's hidden row).
    token_index <int64>[A]: the token of each slot; T marks an invalid slot.
    weight      <dtype>[A]: combine weights (unspecified in invalid slots).
    counts      <int64>[E]: kept rows per expert.
    num_kept    <int64>[]: N, the number of valid leading slots (a tensor: never read on the host).
    """

    num_kept: torch.Tensor


def dispatch_static(routing: Routing, hidden: torch.Tensor) -> Dispatched:
    """Gather hidden <dtype>[T, d] into the A slots of ``routing`` (a `SlotDispatched`); Soft MoE
    routings (whose eager dispatch is already two matrix products) as the eager `dispatch`."""
    if routing.soft is not None:
        return dispatch(routing, hidden, impl="torch")
    e, t = routing.num_experts, routing.num_tokens
    # dropped assignments go to a bucket E after every expert; a stable sort keeps
    # assignment order within each bucket, which is the eager order within an expert
    bucket = torch.where(routing.kept, routing.expert_index, e)
    sorted_bucket, order = torch.sort(bucket, stable=True)
    tokens = routing.token_index.gather(0, order)
    counts = torch.zeros(e + 1, dtype=torch.int64, device=bucket.device)
    counts.scatter_add_(0, bucket, torch.ones_like(bucket))
    return SlotDispatched(
        rows=hidden.index_select(0, tokens),
        token_index=torch.where(sorted_bucket < e, tokens, t),
        weight=routing.weight.gather(0, order).to(hidden.dtype),
        counts=counts[:e],
        num_kept=bucket.numel() - counts[e],
    )


def combine_static(routing: Routing, dispatched: Dispatched, expert_out: torch.Tensor) -> torch.Tensor:
    """<dtype>[T, d]: the eager `combine` of expert_out <dtype>[A, d] in the slots of
    ``dispatched`` (`dispatch_static`'s): weighted rows summed per token into T + 1 rows, the
    spare row T (the invalid slots' target) cut off. Soft MoE: the eager `combine`."""
    if routing.soft is not None:
        return combine(routing, dispatched, expert_out, impl="torch")
    t = routing.num_tokens
    out = torch.zeros(t + 1, expert_out.shape[1], dtype=expert_out.dtype, device=expert_out.device)
    out.index_add_(0, dispatched.token_index, expert_out * dispatched.weight[:, None])
    return out[:t]
