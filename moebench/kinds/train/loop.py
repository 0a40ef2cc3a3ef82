"""Train one MoE layer per case x router x seed and record it (steps.jsonl, one final row).

`Trainer` owns one run: the task instance (drawn from the case seed), the model (drawn from the
training seed), the optimizer, the held-out set and the probe set. `train_rows` is what
`session.case_rows` calls for a suite with a `train:` block; it yields one `TrainRowResult` per
router with the per-eval step records of every seed and a final row aggregated over seeds.
"""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from moebench.core.capacity import CapacitySpec, expert_capacity
from moebench.core.case import Case, NamedSpec
from moebench.core.errors import WorkloadMismatchError
from moebench.core.metrics import routing_metrics
from moebench.routers.base import RouteContext, Router
from moebench.routers.registry import ROUTERS
from moebench.routers.soft_moe import SoftMoE, make_phi
from moebench.run.runner import RowResult, exit_reason
from moebench.kinds.train import measures
from moebench.kinds.train.aggregate import final_row
from moebench.kinds.train.memory import memory_problem as train_memory_problem
from moebench.kinds.train.layer import MoELayer, aux_loss, competitive_loss, learns, trainable, z_loss
from moebench.kinds.train.spec import UNSET, TrainSpec
from moebench.kinds.train.tasks import TASKS, TaskData

# random streams of one (case seed, training seed)
INIT, DATA, EVAL_DATA, ROUTER_RNG, EVAL_ROUTER_RNG, NOISE = range(1, 7)


def rng(case_seed: int, seed: int, stream: int) -> torch.Generator:
    """A CPU generator for one stream of one training run."""
    return torch.Generator().manual_seed((case_seed * 1_000_003 + seed * 10_007 + stream) % (2**62))


class CannotLearn(Exception):
    """The router's combine weights carry no gradient to the gate: a skipped row."""


@dataclass(frozen=True)
class TrainRowResult(RowResult):
    """A RowResult plus the step records (steps.jsonl) of every seed."""

    steps: list[dict] = field(default_factory=list)


def bias_update(bias: torch.Tensor, load: torch.Tensor, rate: float, mode: str) -> None:
    """In place. sign: b_e += u sign(mean c - c_e) (Wang et al. 2024, as
    TokenChoiceRouter.update_state); magnitude: b_e += u (mean c - c_e) / mean c."""
    load = load.float()
    mean = load.mean()
    if mode == "sign":
        bias += rate * torch.sign(mean - load)
    else:
        bias += rate * (mean - load) / mean.clamp_min(1e-12)


def capacity_factor(setting, case: Case) -> float | None:
    return case.capacity_factor if setting == UNSET else setting


class Trainer:
    """One training run: case x router x training seed."""

    def __init__(self, case: Case, spec: TrainSpec, router: Router, seed: int, name: str = "router"):
        self.case, self.spec, self.seed, self.name = case, spec, seed, name
        self.device = torch.device(case.device)
        self.task = TASKS.create(case.workload.name, case.workload.params).build(case.hidden, case.seed)
        self.language = self.task.kind == "language"
        t, e, k = case.tokens, case.experts, case.top_k

        def cap(cf):
            return expert_capacity(CapacitySpec(cf, case.min_capacity, case.capacity_multiple), t, e, k)

        self.capacity_train = cap(capacity_factor(spec.capacity_train, case))
        self.capacity_eval = cap(capacity_factor(spec.capacity_eval, case))
        router = trainable(router)
        if spec.bias_update_rate is not None and hasattr(router, "bias_update_rate"):
            router = dataclasses.replace(router, bias_update_rate=spec.bias_update_rate)
        g = rng(case.seed, seed, INIT)
        d = case.hidden
        phi, slots = None, None
        if isinstance(router, SoftMoE):
            slots = router.slots(t, e, RouteContext(k, self.capacity_train))
            router = dataclasses.replace(router, slots_per_expert=slots)
            phi = make_phi(d, e * slots, router.phi_seed)
        self.router = router
        out = d if self.language else self.task.output_dim
        self.layer = MoELayer(d, spec.expert_hidden, out, e, g, spec.gate_std, spec.gate_skew,
                              spec.gate_favoured, slots, phi)
        self.ones = spec.combine == "ones"
        if self.ones:
            if isinstance(router, SoftMoE):
                raise CannotLearn("combine: ones needs a router that picks experts per token, not Soft MoE's slots")
            self.layer.freeze_gate()
        params = [p for p in self.layer.parameters() if p.requires_grad]
        if self.language:
            self.embed = torch.nn.Parameter(torch.randn(self.task.vocab, d, generator=g))
            self.head_w = torch.nn.Parameter(torch.randn(d, self.task.vocab, generator=g) / math.sqrt(d))
            self.head_b = torch.nn.Parameter(torch.zeros(self.task.vocab))
            params += [self.embed, self.head_w, self.head_b]
        for p in params:
            p.data = p.data.to(self.device)
        self.params = params
        opt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[spec.optimizer]
        self.opt = opt(params, lr=spec.lr, weight_decay=spec.weight_decay)
        self.state = router.init_state(e, self.device)
        self.data_rng, self.router_rng = rng(case.seed, seed, DATA), rng(case.seed, seed, ROUTER_RNG)
        self.noise_rng = rng(case.seed, seed, NOISE)
        chunks = max(1, spec.eval_tokens // t)
        self.eval_set = self.task.sample(chunks * t, rng(case.seed, seed, EVAL_DATA)).to(case.device)
        self.chunks = chunks
        self.probes = min(spec.probe_tokens, t)
        self.fluctuation = measures.Fluctuation()
        self.gate_learns: bool | None = None
        self.all_to_all = False  # set by evaluate(): loads are weight mass (dense, Soft MoE), not counts
        self._last_direction: torch.Tensor | None = None
        self._flips: list[float] = []
        self.vocab_freq = self.task.vocab_freq.to(self.device) if self.task.vocab_freq is not None else None

    # ------------------------------------------------------------------ model
    def forward(self, data: TaskData, ctx: RouteContext, noise: torch.Tensor | None = None):
        """(task loss, routing, output) of one batch."""
        h = self.embed[data.ids] if self.language else data.x
        y, routing = self.layer(h, self.router, ctx, token_ids=data.ids, vocab_freq=self.vocab_freq, noise=noise,
                                ones=self.ones, name=self.name)
        if self.language:
            logits = (h + y) @ self.head_w + self.head_b
            return F.cross_entropy(logits, data.y), routing
        if self.spec.loss == "competitive" and routing.soft is None:
            return competitive_loss(self.layer, h, routing, data.y), routing
        return F.mse_loss(y, data.y), routing

    def batch(self) -> TaskData:
        """The next training batch (the data stream of this seed)."""
        return self.task.sample(self.case.tokens, self.data_rng).to(self.case.device)

    def step(self, step: int, data: TaskData | None = None) -> tuple[float, torch.Tensor]:
        """One optimizer step on ``data`` (default: the next batch); returns (task loss,
        balance loads of the batch)."""
        c, spec = self.case, self.spec
        data = self.batch() if data is None else data
        noise = None
        if spec.gate_noise > 0:
            noise = spec.gate_noise * torch.randn(c.tokens, c.experts, generator=self.noise_rng).to(c.device)
        ctx = RouteContext(c.top_k, self.capacity_train, c.drop_policy, self.router_rng, self.state)
        loss, routing = self.forward(data, ctx, noise)
        if self.gate_learns is None and self.ones:
            self.gate_learns = False  # frozen by `combine: ones`
        if self.gate_learns is None:
            how = learns(routing)
            if how not in (None, "fixed"):
                raise CannotLearn(how)
            self.gate_learns = how is None
        total = loss
        if spec.aux_loss_coeff:
            total = total + spec.aux_loss_coeff * aux_loss(routing)
        if spec.z_loss_coeff:
            total = total + spec.z_loss_coeff * z_loss(routing)
        if not bool(torch.isfinite(total)):
            raise FloatingPointError(f"training diverged at step {step} (loss {float(total)})")
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        self.opt.step()
        with torch.no_grad():
            if self.state.bias is not None:
                before = self.state.bias.clone()
                if spec.bias_update == "sign":
                    self.router.update_state(self.state, routing)  # the benchmark's own update
                else:
                    bias_update(self.state.bias, routing.load(), self.router.bias_update_rate, "magnitude")
                self._track_flips(torch.sign(self.state.bias - before))
        return float(loss.detach()), measures.balance_loads(routing)

    def _track_flips(self, direction: torch.Tensor) -> None:
        """Share of experts whose bias moved the other way than at the previous step: how much
        the aux-loss-free bias oscillates (a too-large u overshoots and flips every step)."""
        if self._last_direction is not None:
            moved = (direction != 0) & (self._last_direction != 0)
            self._flips.append(float(((direction != self._last_direction) & moved).double().mean()))
        self._last_direction = direction

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, step: int, final: bool = False) -> dict:
        """Held-out metrics at ``step`` (see measures.py); ``final`` adds the contingency table
        and each probe token's last fluctuation step."""
        c, t, e = self.case, self.case.tokens, self.case.experts
        g = rng(c.seed, self.seed, EVAL_ROUTER_RNG)
        losses, per_chunk, vio, chosen = [], [], [], []
        total = torch.zeros(e, dtype=torch.float64)
        all_to_all = False
        for i in range(self.chunks):
            data = self.eval_set.slice(i * t, (i + 1) * t)
            ctx = RouteContext(c.top_k, self.capacity_eval, c.drop_policy, g, self.state)
            loss, routing = self.forward(data, ctx)
            losses.append(float(loss))
            m = routing_metrics(routing)
            per_chunk.append({k: m[k] for k in ("imbalance", "drop_rate", "gate_entropy", "aux_loss", "z_loss")})
            loads = measures.balance_loads(routing).cpu()
            all_to_all = self.all_to_all = measures.is_all_to_all(routing)
            vio.append(measures.maxvio(loads))
            total += loads
            chosen.append(measures.chosen_expert(routing).cpu())
            if i == 0:
                probe_top1 = measures.chosen_expert(routing, kept_only=False)[: self.probes]
        table = measures.contingency(self.eval_set.truth.cpu(), torch.cat(chosen), self.task.groups, e + 1)
        record = {
            "step": step,
            "eval_loss": sum(losses) / len(losses),
            "maxvio_batch": _mean(vio),
            "maxvio_global": measures.maxvio(total),
            "dead_experts": measures.dead_experts(total, all_to_all),
            "nmi": measures.nmi(table),
            "fluctuation": self.fluctuation.update(probe_top1, step),
        }
        record["perplexity"] = math.exp(min(record["eval_loss"], 700)) if self.language else None
        for key in per_chunk[0]:
            record[key] = _mean([m[key] for m in per_chunk])
        if final:
            record["contingency"] = table.tolist()
            record["probe_last_change"] = self.fluctuation.last_change.tolist()
            record["settle_step"] = float(self.fluctuation.last_change.double().mean())
        return record

    def run(self) -> list[dict]:
        """Train for spec.steps, evaluating at spec.eval_steps(); the per-eval records."""
        evals = set(self.spec.eval_steps())
        records = [self.evaluate(0)]
        losses, vio, times = [], [], []
        for step in range(1, self.spec.steps + 1):
            data = self.batch()  # drawing the data is not part of the step's time
            start = time.perf_counter()
            loss, loads = self.step(step, data)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            losses.append(loss)
            vio.append(measures.maxvio(loads))
            if step in evals:
                record = self.evaluate(step, final=step == self.spec.steps)
                record.update(train_loss=_mean(losses), train_maxvio_batch=_mean(vio),
                              step_ms=1e3 * sorted(times)[len(times) // 2],
                              bias_flip_rate=_mean(self._flips) if self.state.bias is not None else None)
                if self.state.bias is not None:
                    record["expert_bias"] = self.state.bias.tolist()
                records.append(record)
                losses, vio, times, self._flips = [], [], [], []
        records[0].update(train_loss=None, train_maxvio_batch=None, step_ms=None, bias_flip_rate=None)
        return records


def _mean(values) -> float:
    good = [v for v in values if v is not None and not math.isnan(v)]
    return sum(good) / len(good) if good else math.nan


QUICK_STEPS = 4


def train_rows(suite, case: Case, timing, base_row: dict, skip: set[str],
               quick: bool = False) -> Iterator[TrainRowResult]:
    """One TrainRowResult per router of the suite not in ``skip`` (see the module docstring);
    quick (`moebench run --quick`): a smoke run of a few steps of one seed."""
    from moebench.run.timing import pinned_threads

    spec, allowed = suite.train.for_workload(case.workload.display)
    if quick:
        spec = dataclasses.replace(spec, steps=min(spec.steps, QUICK_STEPS), eval_interval=QUICK_STEPS,
                                   seeds=spec.seeds[:1], eval_tokens=min(spec.eval_tokens, case.tokens))
    variant = case.workload.display.rsplit("+", 1)[1] if suite.train.workloads else None
    base = {**base_row, **case.axes(), "kind": "train", "train.variant": variant, **spec.as_row()}
    threads_wanted = timing.threads if case.device == "cpu" else None
    with pinned_threads(threads_wanted) as threads:
        for router_spec in suite.routers:
            if router_spec.display in skip or (allowed is not None and router_spec.display not in allowed):
                continue
            row = {**base, "router": router_spec.display, "router_name": router_spec.name,
                   "router_params": router_spec.params_json(), "threads": threads, "status": "ok", "reason": None}
            yield train_router(case, spec, router_spec, row)


def _problem(case: Case) -> str | None:
    if case.device.startswith("cuda") and not torch.cuda.is_available():
        return "CUDA is not available on this machine"
    if case.dtype != "float32":
        return f"training runs in float32; case has dtype {case.dtype}"
    return None


def train_router(case: Case, spec: TrainSpec, router_spec: NamedSpec, row: dict) -> TrainRowResult:
    """Every seed of one router on one case: its step records and final row (skipped/error rows
    say why)."""
    key = {"run_id": row.get("run_id"), "case_id": row["case_id"], "router": row["router"]}
    steps: list[dict] = []
    try:
        reason = _problem(case)
        router = ROUTERS.create(router_spec.name, router_spec.params)
        reason = reason or router.applicable(case.top_k, case.experts)
        # before the Trainer allocates anything: a case too big for the machine is a skipped
        # row, not an out-of-memory kill of the whole run (memory.py)
        reason = reason or train_memory_problem(case, spec, router_spec)
        if reason:
            row.update(status="skipped", reason=reason)
            return TrainRowResult(row, [])
        per_seed, learned = {}, None
        trainer = None
        for seed in spec.seeds:
            trainer = None  # let the previous seed's model, optimizer and eval set go first
            trainer = Trainer(case, spec, router, seed, router_spec.display)
            records = trainer.run()
            learned = trainer.gate_learns
            per_seed[seed] = records
            steps += [{**key, "seed": seed, **r} for r in records]
            row["capacity"], row["eval_capacity"] = trainer.capacity_train, trainer.capacity_eval
        row.update(final_row(per_seed), gate_learns=learned)
        if not trainer.all_to_all:  # loads are counts of assignments: what sampling noise alone gives
            k = min(case.top_k, case.experts)
            row["maxvio_global_floor"] = measures.maxvio_floor(trainer.chunks * case.tokens, case.experts, k)
            row["maxvio_batch_floor"] = measures.maxvio_floor(case.tokens, case.experts, k)
    except WorkloadMismatchError as exc:
        row.update(status="skipped", reason=f"{exc} (training: a task that provides them, e.g. language)")
        return TrainRowResult(row, [])
    except CannotLearn as exc:
        row.update(status="skipped", reason=f"cannot learn: {exc}")
        return TrainRowResult(row, [])
    except SystemExit as exc:  # a plugin's sys.exit must not end the run (Ctrl-C still does)
        frames = traceback.extract_tb(exc.__traceback__)
        row.update(status="error", reason=exit_reason(exc),
                   error_at=f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "")
        return TrainRowResult(row, [])
    except Exception as exc:  # any fault is recorded; the run goes on
        frames = traceback.extract_tb(exc.__traceback__)
        row.update(status="error", reason=f"{type(exc).__name__}: {exc}".strip(),
                   error_at=f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "")
        return TrainRowResult(row, [])
    return TrainRowResult(row, [], None, steps)
