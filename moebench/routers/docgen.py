"""Generate docs/routers.md from the registry, so every router's options in the docs are the
options the code accepts. `python -m moebench.routers.docgen > docs/routers.md`; a test keeps it fresh.
"""

from __future__ import annotations

from moebench.core.metrics import METRICS
from moebench.core.registry import options_of
from moebench.routers.registry import ROUTERS
from moebench.core.workloads import WORKLOADS

# What each router does and what the metrics mean for it (docs/spec.md §3, in brief).
NOTES: dict[str, tuple[str, str]] = {
    "softmax_dense": (
        "Every token goes to every expert with weight softmax(x).",
        "Loads are all T: imbalance 1.0 and no drops by definition; its cost is E times the "
        "expert compute, which the dispatch/combine times show (T·E rows move).",
    ),
    "noisy_topk": (
        "Top-k of x + ε·σ (fixed σ, or softplus(h·W_noise) with `noise_gate`); weights are the "
        "softmax over the k kept noisy logits.",
        "Metrics depend on the noise draw (seeded). `load_cv2` uses hard demand counts, not "
        "Shazeer's smooth estimator.",
    ),
    "switch": (
        "Top-1 of softmax(x); capacity with k = 1; weight p of the chosen expert (not renormalised).",
        "Runs only at top_k 1 (other cases are skipped with the reason). drop_rate equals "
        "token_drop_rate since each token has one assignment.",
    ),
    "gshard": (
        "Top-2 of softmax(x), gates renormalised to sum 1; the 2nd expert is kept with probability "
        "min(1, 2·g2); first choices take capacity before second choices (position policy); as in "
        "GShard's Algorithm 1 a 2nd choice the coin declines still uses up a slot of its expert.",
        "A declined 2nd expert is not an assignment, so it is neither demand nor a drop (but an "
        "expert may drop once its slots are taken by declined choices); experts_per_token_mean shows "
        "how often the 2nd expert was kept. aux_loss counts 1st choices only (Algorithm 1): "
        "E²·mean(f·P), f_e = 1st choices of e / T, 1.0 at perfect balance.",
    ),
    "topk": (
        "General token choice: softmax or sigmoid scores, `softmax_after_topk` (Mixtral), "
        "`renormalize` (Qwen), `route_scale` (DeepSeek).",
        "For sigmoid scores the losses use row-normalised scores as p.",
    ),
    "deepseek": (
        "Sigmoid scores; selection on s + b with an optional group limit (groups ranked by the sum "
        "of their top-2); weights are the chosen s normalised, × route_scale. The bias b is on by "
        "default and follows b ← b + u·sign(mean(c) − c).",
        "Over a stream (batches > 1) the bias lowers imbalance batch after batch; the stream table "
        "shows first/last/mean/worst.",
    ),
    "expert_choice": (
        "Each expert takes its C highest-p tokens, p = softmax(x); C is the case's capacity "
        "(ceil(cf·k·T/E); dropless: ceil(k·T/E)).",
        "Every expert has exactly C tokens: imbalance 1.0 and drop_rate 0 by construction; "
        "token_drop_rate counts tokens no expert chose, and experts_per_token varies per token.",
    ),
    "base": (
        "Balanced assignment: every expert gets floor(T/E) or ceil(T/E) tokens, maximising Σ x[t, a(t)], "
        "solved exactly; `inference` uses greedy argmax. Weight sigmoid(x[t, a(t)]).",
        "Top-1 only. Loads differ by at most 1, so imbalance is ceil(T/E)/(T/E); nothing is dropped.",
    ),
    "sinkhorn": (
        "Top-k of the Sinkhorn-normalised exp(x) (uniform expert marginals; tolerance and iteration "
        "cap); weights are softmax(x) at the chosen experts (sigmoid for k = 1), as Megatron-Core.",
        "Selection is balanced before capacity, so drop_rate is usually far below plain top-k's.",
    ),
    "hash": (
        "A fixed seeded map of token id to k distinct experts; `balanced` assigns vocabulary ids to "
        "experts greedily by frequency. Weights 1/k. Needs token ids (the `tokens` workload); other "
        "workloads give a skipped row saying so.",
        "Ignores the logits: aux_loss uses uniform probabilities (1.0 when nothing is dropped), and "
        "z_loss/gate_entropy describe the workload's logits only.",
    ),
    "soft_moe": (
        "Slot logits h·Φ over E·S slots; dispatch = softmax over tokens per slot, combine = softmax "
        "over slots per token; nothing is dropped. With `sequence_length` n, each of the T/n sequences "
        "has its own E·S slots (the paper's per-sequence form; cost linear in T).",
        "Every expert processes S slots, so counts are balanced by construction; the load metrics use "
        "the combine-weight mass each expert receives instead. drop_rate and token_drop_rate are 0.",
    ),
    "random": (
        "k distinct experts uniformly at random per token (seeded); weights 1/k.",
        "A balance baseline: imbalance near 1 with binomial noise. aux_loss uses uniform probabilities.",
    ),
    "round_robin": (
        "Token t goes to experts (t·k + j) mod E: forced perfect balance; weights 1/k.",
        "Imbalance is exactly 1.0 when E divides T·k; the floor on what balance can buy.",
    ),
}


def _options(cls) -> str:
    rows = [f"`{o.name}` ({o.describe()}, default `{o.default!r}`)" for o in options_of(cls).values()]
    return "; ".join(rows) if rows else "none"


def render() -> str:
    """docs/routers.md as a string."""
    out = [
        "# Routers",
        "",
        "Generated by `python -m moebench.routers.docgen` from the router registry: the options listed are",
        "exactly what suites may set. Every token-choice router also takes `expert_bias`,",
        "`bias_update_rate` and `renormalize_after_drop` (and, where listed, `impl`).",
        "",
    ]
    for name, cls in ROUTERS.classes().items():
        if not cls.__module__.startswith("moebench.routers."):
            continue  # peers (docs/peers.md), plugins and test doubles are documented elsewhere
        what, metrics = NOTES.get(name, ("(no notes: a plugin router)", ""))
        out += [f"## `{name}`", "", f"Paper: {cls.paper or 'n/a'}", "", what, "", f"Options: {_options(cls)}.", ""]
        if metrics:
            out += [f"Metrics: {metrics}", ""]
    out += ["# Workloads", ""]
    for name, cls in WORKLOADS.classes().items():
        if not cls.__module__.startswith("moebench."):
            continue
        out += [f"- `{name}`: {(cls.__doc__ or '').strip().splitlines()[0]} Options: {_options(cls)}."]
    out += ["", "# Metrics", "", "| metric | better | meaning |", "|---|---|---|"]
    for name, metric in METRICS.items():
        if "." not in name:
            out.append(f"| `{name}` | {metric.direction} | {metric.description} |")
    out += [
        "",
        "Per phase (`route`, `dispatch`, `combine`): `median_ms`, `mean_ms`, `iqr_ms`, `min_ms`,",
        "`max_ms`, `ci_low_ms`/`ci_high_ms` (95% CI of the median; null with 5 rounds or fewer, where no",
        "order-statistic interval reaches 95%), `ci_coverage` (its actual coverage; without one, that of",
        "min-max), `rounds`, `tokens_per_s`,",
        "`peak_mem_bytes`, `x_memcopy` (median over the median of a clone of the phase's input, timed",
        "in the same case: logits for route, hidden states for dispatch and combine). Rows also carry",
        "those bounds as `memcopy_logits_ms` and `memcopy_hidden_ms`.",
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
