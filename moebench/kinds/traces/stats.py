"""Trace statistics: what a model's real routing looks like, per layer and across layers.

For layer experts x <int64>[N, k] (assignments = N·k):

- popularity: assignments per expert, sorted (shares sum to 1); ``zipf_s``: the exponent s of
  share ∝ rank^-s fitted by least squares on log share against log rank (experts with zero
  load left out); ``active``: share of experts with any load; ``hot_x_uniform``: the hottest
  expert's load over the uniform load N·k/E.
- temporal locality: share of tokens t >= 1 that share at least one expert with token t-1,
  beside the same for a seeded shuffle of the tokens (what popularity alone gives);
  ``top1_repeat``: share whose first choice equals the previous token's.
- token-id consistency: over ids seen at least twice, the share of occurrences whose first
  choice is that id's most frequent first choice (1.0: routing is a function of the id, as
  in hash routing), beside the same with first choices shuffled across tokens.
- cross-layer co-occurrence (consecutive recorded layers): the share of tokens whose first
  choice in layer j+1 is the most frequent partner of their first choice in layer j, beside
  always guessing layer j+1's most popular expert.
- replay_match: share of tokens whose experts the header's replay router picks, ties in the
  selection score counted as a match (`replay_exact`: the same expert set, ties not forgiven).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from moebench.kinds.traces.families import equivalent_choices, replay_layer, same_choices, selection_scores
from moebench.kinds.traces.format import Trace

SHAPE_FORMAT = "moebench-trace-shape"
SHUFFLE_SEED = 0


def zipf_exponent(counts: torch.Tensor) -> float:
    """s of share ∝ rank^-s fitted on the nonzero counts sorted descending (nan if < 2)."""
    c = np.sort(counts.double().numpy())[::-1]
    c = c[c > 0]
    if c.size < 2:
        return math.nan
    ranks = np.arange(1, c.size + 1, dtype=np.float64)
    slope = np.polyfit(np.log(ranks), np.log(c / c.sum()), 1)[0]
    return float(-slope)


def shares_overlap(x: torch.Tensor) -> float:
    """Share of rows t >= 1 of x <int64>[N, k] with an expert in common with row t-1."""
    if x.shape[0] < 2:
        return math.nan
    return float((x[1:, :, None] == x[:-1, None, :]).any(dim=2).any(dim=1).double().mean())


def _permutation(n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(SHUFFLE_SEED))


def id_consistency(token_ids: torch.Tensor, top1: torch.Tensor, num_experts: int) -> float:
    """Share of occurrences of ids seen >= 2 times whose top-1 is the id's modal top-1."""
    v = int(token_ids.max()) + 1
    joint = torch.bincount(token_ids * num_experts + top1, minlength=v * num_experts).view(v, num_experts)
    seen = joint.sum(1)
    repeated = seen >= 2
    if not bool(repeated.any()):
        return math.nan
    return float(joint.max(1).values[repeated].sum() / seen[repeated].sum())


def layer_stats(trace: Trace, j: int) -> dict:
    layer = trace.layer(j)
    x = layer.experts
    n, k = x.shape
    e = trace.num_experts
    counts = torch.bincount(x.reshape(-1), minlength=e)
    shares = (counts.double() / max(n * k, 1)).sort(descending=True).values
    out = {
        "layer": trace.header["layers"][j], "tokens": n, "zipf_s": zipf_exponent(counts),
        "active": float((counts > 0).double().mean()), "hot_x_uniform": float(counts.max()) / (n * k / e),
        "top_share": float(shares[0]), "locality": shares_overlap(x),
        "locality_shuffled": shares_overlap(x[_permutation(n)]),
        "top1_repeat": float((x[1:, 0] == x[:-1, 0]).double().mean()) if n > 1 else math.nan,
        "id_consistency": None, "id_consistency_shuffled": None, "replay_match": None, "replay_exact": None,
        "popularity": [round(float(s), 6) for s in shares],
    }
    if trace.token_ids is not None:
        out["id_consistency"] = id_consistency(trace.token_ids, x[:, 0], e)
        out["id_consistency_shuffled"] = id_consistency(trace.token_ids, x[_permutation(n), 0], e)
    if layer.logits is not None and trace.header.get("replay"):
        replayed = replay_layer(trace.header, layer.logits, layer.bias)
        if replayed is not None:
            scores = selection_scores(trace.header, layer.logits, layer.bias)
            out["replay_match"] = float(equivalent_choices(scores, replayed, x).double().mean())
            out["replay_exact"] = float(same_choices(replayed, x).double().mean())
    return out


def cross_layer(trace: Trace) -> list[dict]:
    """Co-occurrence of first choices between consecutive recorded layers."""
    e, out = trace.num_experts, []
    for j in range(trace.num_layers - 1):
        a, b = trace.layer(j).experts[:, 0], trace.layer(j + 1).experts[:, 0]
        joint = torch.bincount(a * e + b, minlength=e * e).view(e, e)
        n = max(a.numel(), 1)
        out.append({
            "from_layer": trace.header["layers"][j], "to_layer": trace.header["layers"][j + 1],
            "partner_share": float(joint.max(1).values.sum()) / n,
            "popular_share": float(torch.bincount(b, minlength=e).max()) / n,
        })
    return out


def trace_stats(trace: Trace) -> dict:
    """{"header": ..., "layers": [layer_stats], "cross_layer": [...]}."""
    return {"header": trace.header, "layers": [layer_stats(trace, j) for j in range(trace.num_layers)],
            "cross_layer": cross_layer(trace)}


def fit_shape(trace: Trace) -> dict:
    """What `trace_fit` needs, and no token ids or logits: per layer the first-choice shares
    p <[E]> and the copy probability rho of a first-order chain whose top-1 repeat rate is
    the trace's r: r = rho + (1 - rho)·q with q = Σ p², so rho = (r - q) / (1 - q), in [0, 1]."""
    e, layers = trace.num_experts, []
    for j in range(trace.num_layers):
        x = trace.layer(j).experts
        top1 = torch.bincount(x[:, 0], minlength=e).double()
        p = top1 / top1.sum()
        r = float((x[1:, 0] == x[:-1, 0]).double().mean()) if x.shape[0] > 1 else 0.0
        q = float((p * p).sum())
        rho = 0.0 if q >= 1 else min(max((r - q) / (1 - q), 0.0), 1.0)
        layers.append({"layer": trace.header["layers"][j], "top1_share": [float(v) for v in p],
                       "top1_repeat": r, "copy": rho})
    return {"format": SHAPE_FORMAT, "format_version": 1, "model": trace.header.get("model"),
            "family": trace.header.get("family"), "num_experts": e, "top_k": trace.top_k,
            "tokens": trace.tokens, "layers": layers}


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


LAYER_COLUMNS = ("layer", "tokens", "zipf_s", "active", "hot_x_uniform", "locality", "locality_shuffled",
                 "top1_repeat", "id_consistency", "id_consistency_shuffled", "replay_match", "replay_exact")


def markdown(stats: dict) -> str:
    """The statistics as Markdown tables (per layer, then cross-layer)."""
    h = stats["header"]
    lines = [f"Trace of `{h.get('model')}` ({h.get('family')}, {h.get('source')}): {h['tokens']} tokens, "
             f"{len(h['layers'])} MoE layers, E={h['num_experts']}, k={h['top_k']}, "
             f"{'logits ' + str(h.get('dtype')) if h.get('logits') else 'index-only'}"
             + (f", replay router `{h['replay']['name']}` {h['replay'].get('params', {})}" if h.get("replay") else ""),
             "", "| " + " | ".join(LAYER_COLUMNS) + " |", "|" + "---|" * len(LAYER_COLUMNS)]
    for row in stats["layers"]:
        lines.append("| " + " | ".join(_fmt(row[c]) for c in LAYER_COLUMNS) + " |")
    if stats["cross_layer"]:
        lines += ["", "| from_layer | to_layer | partner_share | popular_share |", "|---|---|---|---|"]
        for row in stats["cross_layer"]:
            lines.append(f"| {row['from_layer']} | {row['to_layer']} | {_fmt(row['partner_share'])} | "
                         f"{_fmt(row['popular_share'])} |")
    top = stats["layers"][0]["popularity"][:8]
    lines += ["", f"Layer {stats['layers'][0]['layer']} popularity (largest shares first): "
              + ", ".join(f"{s:.3f}" for s in top) + (" ..." if len(stats["layers"][0]["popularity"]) > 8 else "")]
    return "\n".join(lines)
