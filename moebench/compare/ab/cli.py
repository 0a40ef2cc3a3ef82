"""The `moebench ab` parser (argparse only: imports nothing heavy)."""

from __future__ import annotations

from moebench.compare.ab import DEFAULT_BUDGET_S


def add_parser(sub, fn) -> None:
    ab = sub.add_parser("ab", help="interleaved A/B speed gate of two git revisions (exit 1 on a slowdown)")
    ab.add_argument("suite", help="suite YAML file (the same file for both sides)")
    ab.add_argument("--base", metavar="REF", help="side A: a git revision (a temporary worktree), e.g. origin/main")
    ab.add_argument("--head", metavar="REF", help="side B: a git revision (default: the working tree)")
    ab.add_argument("--base-python", metavar="PY", help="interpreter of side A (without --base: its own moebench)")
    ab.add_argument("--head-python", metavar="PY", help="interpreter of side B (without --head: its own moebench)")
    ab.add_argument("--budget-s", type=float, metavar="S",
                    help=f"wall time of the whole command in seconds (default {DEFAULT_BUDGET_S:g})")
    ab.add_argument("--min-effect", type=float, metavar="F",
                    help="smallest change that counts, as a fraction (default 0.02: slower means > 2%% slower)")
    ab.add_argument("--alpha", type=float, help="false-alarm rate of the whole comparison (default 0.05)")
    ab.add_argument("--mode", choices=("interleaved", "duet"),
                    help="interleaved blocks (default) or duet: both sides at once, one core each")
    ab.add_argument("--block-ms", type=float, metavar="MS", help="target time of one block of calls (default 5)")
    ab.add_argument("--block-stat", choices=("median", "min"),
                    help="a block's value: its median call (default) or its fastest (less noise, blind to rare stalls)")
    ab.add_argument("--phases", metavar="LIST",
                    help="comma-separated timed phases to gate (default route,dispatch,combine); fewer phases, "
                         "fewer router-phases to share the budget and alpha: more power for the rest")
    ab.add_argument("--rotate", choices=("auto", "on", "off"),
                    help="time one case per router-phase and round, cycling (default auto: when full rounds "
                         "over every case would not fit three looks in the budget)")
    ab.add_argument("--no-relayout", dest="relayout", action="store_false", default=None,
                    help="keep each cell's buffers for the whole run (default: built again for every block)")
    ab.add_argument("--fail-fast", action="store_true", help="stop at the first look that finds a router-phase slower")
    ab.add_argument("--quick", action="store_true", help="smoke sizes (as moebench run --quick)")
    ab.add_argument("--device", choices=("cpu", "cuda", "all"), help="override the suite's devices")
    ab.add_argument("--threads", type=int, help="override the suite's timing.threads")
    ab.add_argument("--seed", type=int, help="seed of the block order (default: random)")
    ab.add_argument("--results", metavar="DIR", help="results root: DIR/ab/<suite>/<id>/{A,B,ab.json} (default results)")
    ab.add_argument("--json", metavar="FILE", help="also write the whole result (ab.json) here")
    ab.add_argument("--details", action="store_true", help="also print every case's interval and all regressions")
    ab.set_defaults(fn=fn)
