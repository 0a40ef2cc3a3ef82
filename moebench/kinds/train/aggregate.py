"""The final row of a trained router: end-of-training values, mean and 95% interval over seeds.

For every metric m of `FINAL` the row carries m (the mean over seeds of its value at the last
evaluation), m_ci_low and m_ci_high (Student-t 95% interval of that mean; null with one seed),
so `moebench compare` and the tables read trained routers like any other row. `maxvio_batch_worst`
is the largest MaxVio_batch at any evaluation of any seed (expert choice: 0 at every step).
"""

from __future__ import annotations

import math

from scipy import stats

from moebench.kinds.train.metrics import FINAL  # the end-of-training metrics (with their directions)



def mean_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float | None, float | None]:
    """(mean, low, high) with a Student-t interval; (nan, None, None) for no finite value and
    (mean, None, None) for one."""
    good = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not good:
        return math.nan, None, None
    n = len(good)
    mean = sum(good) / n
    if n == 1:
        return mean, None, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in good) / (n - 1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def final_row(per_seed: dict[int, list[dict]]) -> dict:
    """Row columns from {seed: eval records} (the last record of each seed is the end of training)."""
    out: dict = {"seeds_trained": len(per_seed)}
    last = [records[-1] for records in per_seed.values()]
    for metric in FINAL:
        mean, low, high = mean_ci([r.get(metric) for r in last])
        out[metric] = mean
        out[f"{metric}_ci_low"], out[f"{metric}_ci_high"] = low, high
    worst = [r.get("maxvio_batch") for records in per_seed.values() for r in records]
    worst = [v for v in worst if v is not None and math.isfinite(v)]
    out["maxvio_batch_worst"] = max(worst) if worst else math.nan
    out["train.step_ms"] = mean_ci([r.get("step_ms") for r in last])[0]
    return out
