"""A training step of the moebench MoE layer against its compute floor, and what recording costs.

For each router: the median time of one full training step (`Trainer.step` on a batch drawn beforehand:
gate, the router's own route, experts, combine, losses, backward, Adam, bias update), the
compute floor timed in the same process (the same layer's expert matmuls alone, forward and
backward, on the very token counts per expert that router's routing gave: gather -> W1 -> ReLU
-> W2 per expert, then backward), their ratio, and the cost of recording: one evaluation
(`Trainer.evaluate`: the held-out set, MaxVio, NMI, fluctuation) divided by the eval interval,
as a share of a step. Run from the repository root:

    python benchmarks/bench_train_step.py                       # T=4096, d=256, f=512, E=8, 1 thread
    python benchmarks/bench_train_step.py --routers switch,topk --tokens 8192
    python benchmarks/bench_train_step.py --quick               # a smoke run

Each timing is the median of --rounds calls after --warmup untimed ones (moebench.run.timing.measure).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from moebench.core.case import Case, NamedSpec, TimingSpec  # noqa: E402
from moebench.routers.base import RouteContext  # noqa: E402
from moebench.routers.registry import ROUTERS  # noqa: E402
from moebench.run.timing import clock_for, measure, pinned_threads  # noqa: E402
from moebench.kinds.train.layer import sparse_groups  # noqa: E402
from moebench.kinds.train.loop import Trainer  # noqa: E402
from moebench.kinds.train.spec import TrainSpec  # noqa: E402


def floor_call(trainer: Trainer, data, ctx):
    """A zero-argument call: the experts' matmuls alone on the routing's token groups, fwd+bwd."""
    with torch.no_grad():
        _, routing = trainer.forward(data, ctx)
    experts = trainer.layer.experts
    x = data.x
    groups = [(e, x[tokens].clone()) for e, tokens, _ in sparse_groups(routing)]
    grads = [torch.randn(len(xe), experts.w2.shape[2]) for _, xe in groups]

    def call():
        experts.zero_grad(set_to_none=True)
        outs = [experts.one(e, xe) for e, xe in groups]
        torch.autograd.backward(outs, grads)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routers", default="switch,topk,expert_choice,deepseek,sinkhorn")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--expert-hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--eval-interval", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.hidden, args.expert_hidden, args.rounds, args.warmup = 512, 64, 128, 3, 1
    timing = TimingSpec(warmup_rounds=args.warmup, min_rounds=args.rounds, max_rounds=args.rounds, min_time_s=0.0)
    clock = clock_for("cpu")
    print(f"T={args.tokens} d={args.hidden} f={args.expert_hidden} E={args.experts} k={args.top_k} "
          f"threads={args.threads} eval every {args.eval_interval} steps; median ms of {args.rounds} calls")
    print(f"{'router':<14}{'step':>9}{'floor':>9}{'x floor':>9}{'eval':>9}{'record %':>10}")
    with pinned_threads(args.threads):
        for name in args.routers.split(","):
            router = ROUTERS.create(name, {})
            k = router.fixed_top_k or args.top_k
            case = Case(NamedSpec("teacher", {"experts": args.experts}), args.tokens, args.experts, k, 1.25,
                        hidden=args.hidden)
            spec = TrainSpec(steps=10_000, tasks=(case.workload,), expert_hidden=args.expert_hidden,
                             eval_tokens=2 * args.tokens, eval_interval=args.eval_interval, aux_loss_coeff=0.01)
            trainer = Trainer(case, spec, router, seed=0)
            pool = [trainer.batch() for _ in range(4)]  # drawn beforehand: data is not the step
            step_no = iter(range(1, 10**9))
            step = measure(lambda: (lambda i: trainer.step(i, pool[i % 4]))(next(step_no)), timing, clock).median
            data = trainer.task.sample(args.tokens, trainer.data_rng)
            ctx = RouteContext(k, trainer.capacity_train, case.drop_policy, trainer.router_rng, trainer.state)
            floor = measure(floor_call(trainer, data, ctx), timing, clock).median
            evaluate = measure(lambda: trainer.evaluate(1), TimingSpec(1, 3, 3, 0.0), clock).median
            record = 100 * evaluate / args.eval_interval / step
            print(f"{name:<14}{step:>9.2f}{floor:>9.2f}{step / floor:>9.2f}{evaluate:>9.2f}{record:>9.1f}%", flush=True)


if __name__ == "__main__":
    main()
