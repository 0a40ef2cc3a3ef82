"""The columns a trained router's final row adds, with their directions (moebench/core/kinds.py
`Metric`): what `moebench compare` and the report read. One list: aggregate.py builds the
final row from `FINAL`, kind.py hands `TRAIN_METRICS` to `moebench.core.metrics`.
"""

from __future__ import annotations

from moebench.core.kinds import Metric

# the end-of-training metrics of a final row: each has <name>_ci_low / _ci_high beside it
FINAL = (
    "train_loss", "eval_loss", "perplexity", "maxvio_batch", "maxvio_global", "train_maxvio_batch",
    "imbalance", "drop_rate", "dead_experts", "gate_entropy", "aux_loss", "z_loss", "nmi",
    "fluctuation", "settle_step", "bias_flip_rate",
)

# end of training, mean over seeds (moebench/kinds/train/aggregate.py)
_OWN = (
    Metric("train_loss", "lower", True, "task loss on the training batches of the last eval interval"),
    Metric("eval_loss", "lower", True, "task loss on the held-out set"),
    Metric("perplexity", "lower", True, "exp(eval_loss) on a language task"),
    Metric("maxvio_batch", "lower", True, "(max c - mean c)/mean c per held-out batch, mean over batches"),
    Metric("maxvio_global", "lower", True, "(max c - mean c)/mean c over the whole held-out set"),
    Metric("maxvio_batch_worst", "lower", True, "largest maxvio_batch at any evaluation of any seed"),
    Metric("train_maxvio_batch", "lower", True, "maxvio of the training batches of the last eval interval"),
    Metric("dead_experts", "lower", True, "experts receiving no token over the held-out set"),
    Metric("nmi", "higher", True, "normalised mutual information of ground-truth group and chosen expert"),
    Metric("fluctuation", "lower", True, "share of probe tokens whose top-1 expert changed in the last interval"),
    Metric("settle_step", "lower", True, "mean over probe tokens of the last step their top-1 expert changed"),
    Metric("bias_flip_rate", "none", True,
           "share of experts whose expert-bias update reversed direction from one step to the next (last interval)"),
    Metric("maxvio_global_floor", "none", True,
           "expected maxvio_global of an ideal balanced token-choice router: each held-out token on k uniform random experts"),
    Metric("maxvio_batch_floor", "none", True, "the same floor for one batch of the case's tokens"),
    Metric("seeds_trained", "none", True, "training seeds aggregated in the row"),
    Metric("train.step_ms", "lower", False, "median wall time of one training step (last interval)"),
)

TRAIN_METRICS: tuple[Metric, ...] = _OWN + tuple(
    Metric(f"{name}_{end}", "none", True, f"95% interval over seeds of {name}: {end}")
    for name in FINAL for end in ("ci_low", "ci_high"))
