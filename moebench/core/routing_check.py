"""One check of every `Routing` a router returns, before metrics or any kernel reads it.

A router is user code (a plugin, a peer adapter, a new algorithm): a Routing whose indices
point outside [0, T) or [0, E) would be read by the numba dispatch/capacity kernels without
bounds checks (a segfault or silent memory corruption), and NaN weights would turn every
metric of the row into null while the row still says `ok`. `check_routing` raises
`InvalidRouting` naming what is wrong; the runner turns it into an error row.

Cost: one min/max reduction over each of the [A] assignment arrays and over probs and logits
<float32>[T, E] (each read once, nothing allocated; the logits are skipped when they are the
batch's own, already checked), and one device-to-host transfer of the results, so a CUDA
case syncs once per batch. Only the untimed route call of each batch is checked, so timings
never include it (benchmarks/bench_isolation.py measures it).
"""

from __future__ import annotations

import math

import torch

from moebench.core.errors import MoebenchError
from moebench.core.routing import Routing

# Combine weights are gate values (softmax, sigmoid, normalised or renormalised top-k, scaled by
# a routed_scaling_factor at most a few units): anything beyond this magnitude is a bug, and
# it would overflow bfloat16/float16 hidden states in combine.
MAX_WEIGHT = 1e4

ASSIGNMENT_FIELDS = ("token_index", "expert_index", "choice", "weight", "kept")


class InvalidRouting(MoebenchError):
    """A router returned a Routing that breaks the `Routing` contract (routing.py)."""


def routing_problems(routing: Routing, finite: tuple[torch.Tensor, ...] = ()) -> list[str]:
    """Everything wrong with ``routing`` (empty when it keeps the contract), one phrase each.

    Checks, in order (later checks assume the earlier ones passed):
    types: tensors where tensors belong, top_k an int >= 1, capacity None or an int >= 0.
    shapes: probs and logits [T, E], the five assignment arrays 1-D of one length A.
    dtypes: token_index, expert_index, choice int64; kept bool; weight, probs, logits floating.
    devices: every tensor on probs' device.
    ranges: 0 <= token_index < T, 0 <= expert_index < E, 0 <= choice < max(T, E, top_k)
        (token choice ranks < k, dense ranks < E, expert choice ranks < C <= T).
    values: weight finite with |weight| <= MAX_WEIGHT; probs and logits finite.
    soft slots (Soft MoE): dispatch and combine [T, E*S] floating and finite, sequence_length
        dividing T.
    finite: tensors the caller already knows to be finite (the batch's logits, which routers
        usually return as they are): a field that *is* one of them is not read again.
    """
    tensors = {name: getattr(routing, name) for name in (*ASSIGNMENT_FIELDS, "probs", "logits")}
    wrong = [f"{name} is {type(x).__name__}, not a tensor" for name, x in tensors.items() if not isinstance(x, torch.Tensor)]
    if not _is_int(routing.top_k) or routing.top_k < 1:
        wrong.append(f"top_k is {routing.top_k!r}, expected an int >= 1")
    if routing.capacity is not None and (not _is_int(routing.capacity) or routing.capacity < 0):
        wrong.append(f"capacity is {routing.capacity!r}, expected None or an int >= 0")
    if wrong:
        return wrong
    probs, logits = routing.probs, routing.logits
    if probs.dim() != 2:
        return [f"probs has shape {list(probs.shape)}, expected [T, E]"]
    t, e = probs.shape
    if logits.shape != probs.shape:
        wrong.append(f"logits has shape {list(logits.shape)}, expected [T, E] = {[t, e]} like probs")
    lengths = {name: tensors[name].shape for name in ASSIGNMENT_FIELDS}
    if any(len(s) != 1 for s in lengths.values()) or len({s[0] for s in lengths.values()}) != 1:
        shown = ", ".join(f"{name} {list(s)}" for name, s in lengths.items())
        wrong.append(f"the assignment arrays must be 1-D of one length A, got {shown}")
    wrong += _dtype_problems(tensors)
    devices = {name: x.device for name, x in tensors.items() if x.device != probs.device}
    wrong += [f"{name} is on {dev}, probs on {probs.device}" for name, dev in devices.items()]
    if wrong:
        return wrong
    wrong += _value_problems(routing, t, e, finite)
    if routing.soft is not None:
        wrong += _soft_problems(routing, t, e)
    return wrong


def check_routing(routing: Routing, router: str, finite: tuple[torch.Tensor, ...] = ()) -> Routing:
    """``routing`` unchanged if it keeps the contract, else `InvalidRouting`:
    "router 'x': expert_index out of range [0, 4): min 0, max 7" (the row's reason starts with
    "InvalidRouting: ")."""
    if not isinstance(routing, Routing):
        raise InvalidRouting(f"router {router!r} returned {type(routing).__name__}, not a Routing")
    problems = routing_problems(routing, finite)
    if problems:
        raise InvalidRouting(f"router {router!r}: {'; '.join(problems)}")
    return routing


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _dtype_problems(tensors: dict) -> list[str]:
    out = []
    for name in ("token_index", "expert_index", "choice"):
        if tensors[name].dtype != torch.int64:
            out.append(f"{name} is {tensors[name].dtype}, expected torch.int64")
    if tensors["kept"].dtype != torch.bool:
        out.append(f"kept is {tensors['kept'].dtype}, expected torch.bool")
    for name in ("weight", "probs", "logits"):
        if not tensors[name].is_floating_point():
            out.append(f"{name} is {tensors[name].dtype}, expected a floating dtype")
    return out


def _value_problems(routing: Routing, t: int, e: int, finite: tuple[torch.Tensor, ...]) -> list[str]:
    """Range and finiteness checks from one `torch.aminmax` per tensor (one read, no [T, E]
    temporaries; NaN propagates into both ends, an infinity shows at one), moved to the host
    in one transfer. Counts of bad values are taken only once something is wrong."""
    choice_bound = max(t, e, routing.top_k)
    bounds = {"token_index": t, "expert_index": e, "choice": choice_bound}
    known = [n for n in ("probs", "logits") if any(getattr(routing, n) is x for x in finite)]
    names = [n for n in (*bounds, "weight", "probs", "logits") if getattr(routing, n).numel() and n not in known]
    if not names:
        return []
    ends = torch.stack([v.double() for n in names for v in torch.aminmax(getattr(routing, n))]).tolist()
    low, high = dict(zip(names, ends[0::2])), dict(zip(names, ends[1::2]))
    out = []
    for name, bound in bounds.items():
        if name in low and (low[name] < 0 or high[name] >= bound):
            out.append(f"{name} out of range [0, {bound}): min {int(low[name])}, max {int(high[name])}")
    for name in ("weight", "probs", "logits"):
        if name not in low:
            continue
        x = getattr(routing, name)
        if not (math.isfinite(low[name]) and math.isfinite(high[name])):
            bad = int((~torch.isfinite(x)).sum())
            out.append(f"{name} has {bad} NaN or infinite values of {x.numel()}")
        elif name == "weight" and max(-low[name], high[name]) > MAX_WEIGHT:
            out.append(f"weight has |value| up to {max(-low[name], high[name]):.3g}, beyond the sane {MAX_WEIGHT:g}")
    return out


def _soft_problems(routing: Routing, t: int, e: int) -> list[str]:
    soft = routing.soft
    s, n = soft.slots_per_expert, soft.sequence_length
    if not _is_int(s) or s < 1:
        return [f"soft.slots_per_expert is {s!r}, expected an int >= 1"]
    if n is not None and (not _is_int(n) or n < 1 or t % n):
        return [f"soft.sequence_length is {n!r}, expected None or an int >= 1 dividing T={t}"]
    out = []
    for name in ("dispatch", "combine"):
        m = getattr(soft, name)
        if not isinstance(m, torch.Tensor):
            out.append(f"soft.{name} is {type(m).__name__}, not a tensor")
        elif list(m.shape) != [t, e * s]:
            out.append(f"soft.{name} has shape {list(m.shape)}, expected [T, E*S] = {[t, e * s]}")
        elif not m.is_floating_point():
            out.append(f"soft.{name} is {m.dtype}, expected a floating dtype")
        elif m.device != routing.probs.device:
            out.append(f"soft.{name} is on {m.device}, probs on {routing.probs.device}")
        elif not bool(torch.isfinite(m).all()):
            out.append(f"soft.{name} has NaN or infinite values")
    return out
