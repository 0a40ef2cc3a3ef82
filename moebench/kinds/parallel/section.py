"""The report's "Expert parallelism" section: per-rank load, the byte matrix, the placement
before and after EPLB, and the cost model's layer time against EP size per router.

Figures go to ``parallel/*.png`` beside report.md (not ``plots/``, which the plots section
clears and redraws).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from moebench.core.rows import ok_only

FIG_DIR = "parallel"


def _json(value):
    return json.loads(value) if isinstance(value, str) else None


def _num(x, digits=3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def parallel_section(data, out_dir: Path) -> str | None:
    rows = data.rows
    if rows.empty or "parallel_mode" not in rows.columns:
        return None
    rows = ok_only(rows)
    rows = rows[rows["parallel_mode"].notna()]
    if rows.empty:
        return None
    fig_dir = out_dir / FIG_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    for stale in fig_dir.glob("*.png"):
        stale.unlink()
    body = ["## Expert parallelism"]
    engine = rows[rows["parallel_mode"] == "engine"]
    model = rows[rows["parallel_mode"] == "model"]
    if not engine.empty:
        body += _engine(engine, data.loads, fig_dir, out_dir)
    if not model.empty:
        body += _model(model, fig_dir, out_dir)
    return "\n".join(body)


def _engine(rows: pd.DataFrame, loads: pd.DataFrame, fig_dir: Path, out_dir: Path) -> list[str]:
    lines = ["", "### Ranks (torch.distributed)", "",
             "One MoE layer on `ep` ranks, timed on the stream's last batch: the slowest rank's median "
             "per phase. Rank imbalance is max / mean of the rows each rank's experts process; "
             "*contiguous* is the same routing on Megatron-Core's layout (before EPLB). *remote*: share of "
             "the dispatched rows that leave their rank; *inter-node*: that leave their node.", "",
             "| workload | router | backend | ep | placement | rank imbalance contiguous → used | straggler | "
             "a2a ms | expert ms | layer ms | remote | inter-node | tokens per rank |",
             "|---|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for _, r in rows.iterrows():
        lines.append(
            f"| {r['workload']} | {r['router']} | {r['backend']} | {int(r['ep'])} | {r['placement_policy']} | "
            f"{_num(r.get('rank_imbalance_contiguous'))} → **{_num(r['rank_imbalance'])}** | "
            f"{_num(r['straggler_ratio'])} | {_num(r['a2a_ms'])} | {_num(r['expert_ms'])} | {_num(r['layer_ms'])} | "
            f"{_num(r['remote_fraction'], 2)} | {_num(r.get('inter_node_fraction'), 2)} | {r['tokens_per_rank']} |")
    checks = rows["exchange_matches_routing"].astype(bool).all() and rows["tokens_conserved"].astype(bool).all()
    lines += ["", "Exchanged counts equal the ones recomputed from the Routings and tokens are conserved: "
              + ("**yes** for every row." if checks else "**NO** for some row (see rows.jsonl).")]
    for name, draw, title in (("rank_load", _draw_rank_load, "Per-rank load"),
                              ("byte_matrix", _draw_byte_matrices, "Dispatch byte matrix (rank i sends to rank j)")):
        path = fig_dir / f"{name}.png"
        draw(rows, path)
        lines += ["", f"#### {title}", "", f"![{title}]({path.relative_to(out_dir).as_posix()})"]
    lines += ["", "#### Placement before and after EPLB", ""] + _placement_table(rows, loads)
    return lines


def _placement_table(rows: pd.DataFrame, loads: pd.DataFrame) -> list[str]:
    """Per rank: the experts it holds contiguously and under the placement used (first row)."""
    r = rows.iloc[0]
    slots = _json(r["slot_expert"])
    ep, experts = int(r["ep"]), int(r["experts"])
    per = len(slots) // ep
    tokens = _json(r["tokens_per_rank"])
    out = [f"{r['workload']}, {r['router']} ({r['placement_policy']}; the last batch's loads):", "",
           "| rank | contiguous experts | experts held | rows |", "|---:|---|---|---:|"]
    for rank in range(ep):
        cont = list(range(rank * experts // ep, (rank + 1) * experts // ep)) if experts % ep == 0 else "-"
        out.append(f"| {rank} | {cont} | {slots[rank * per:(rank + 1) * per]} | {tokens[rank]} |")
    return out


def _draw_rank_load(rows: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / max(len(rows), 1)
    for i, (_, r) in enumerate(rows.iterrows()):
        tokens = _json(r["tokens_per_rank"])
        ax.bar([x + i * width for x in range(len(tokens))], tokens, width, label=f"{r['router']} ({r['workload']})")
    ax.set_xlabel("rank")
    ax.set_ylabel("rows processed")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _draw_byte_matrices(rows: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n + 0.6, 2.8), squeeze=False)
    for ax, (_, r) in zip(axes[0], rows.iterrows()):
        m = _json(r["byte_matrix"])
        im = ax.imshow([[v / 1e3 for v in row] for row in m], cmap="viridis")
        ax.set_title(f"{r['router']}", fontsize=8)
        ax.set_xlabel("to rank", fontsize=7)
        ax.set_ylabel("from rank", fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046, label="kB")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _model(rows: pd.DataFrame, fig_dir: Path, out_dir: Path) -> list[str]:
    sizes = sorted({int(c.split(".")[1][2:]) for c in rows.columns if c.startswith("model.ep") and c.endswith(".layer_ms")})
    profile = rows["profile"].dropna().iloc[0] if "profile" in rows.columns else "?"
    source = rows["profile_source"].dropna().iloc[0] if "profile_source" in rows.columns else ""
    lines = ["", "### Cost model", "", f"Predicted layer time (dispatch + experts + combine, each its slowest "
             f"rank) on profile `{profile}` ({source}). Milliseconds; in brackets the rank imbalance.", "",
             "| workload | router | " + " | ".join(f"EP {s}" for s in sizes) + " |",
             "|---|---|" + "---:|" * len(sizes)]
    for _, r in rows.iterrows():
        cells = [f"{_num(r.get(f'model.ep{s}.layer_ms'))} ({_num(r.get(f'model.ep{s}.rank_imbalance'))})" for s in sizes]
        lines.append(f"| {r['workload']} | {r['router']} | " + " | ".join(cells) + " |")
    path = fig_dir / "model_layer_time.png"
    _draw_model(rows, sizes, path)
    lines += ["", "#### Predicted layer time against EP size", "",
              f"![Predicted layer time against EP size]({path.relative_to(out_dir).as_posix()})"]
    return lines


def _draw_model(rows: pd.DataFrame, sizes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for _, r in rows.iterrows():
        ys = [r.get(f"model.ep{s}.layer_ms") for s in sizes]
        ax.plot(sizes, ys, marker="o", label=f"{r['router']} ({r['workload']})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("EP size (ranks)")
    ax.set_ylabel("predicted layer ms")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
