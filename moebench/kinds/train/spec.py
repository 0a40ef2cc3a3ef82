"""The `train:` block of a suite: parsed into a `TrainSpec`, every problem a one-line SuiteError.

A suite with a `train:` block trains, for every case x router x seed, a small MoE layer on the
block's task(s) instead of routing workload logits. The task stands in the case's `workload`
slot (a train suite names no workload), so case ids, rows and reports name it like one.

    train:
      steps: 300               # optimizer steps (required)
      tokens_per_step: 256     # tokens per step (else the grid's `tokens` axis)
      optimizer: adam          # sgd | adam | adamw
      lr: 0.003
      weight_decay: 0.0
      aux_loss_coeff: 0.01     # E * sum_e f_e P_e (Switch); 0 = none
      z_loss_coeff: 0.0        # mean_t logsumexp(x_t)^2 (ST-MoE)
      eval_interval: 25        # steps between held-out evaluations (step 0 is always evaluated)
      eval_tokens: 2048        # held-out examples (fixed per seed)
      probe_tokens: 256        # fixed probe set for routing fluctuation
      seeds: [0, 1, 2]         # training seeds (init, batches, noise); the case seed draws the task
      task: {name: local_experts, params: {regions: 4}}   # or a list of tasks
      capacity_factor: {train: 1.25, eval: 2.0}           # else the case's factor for both; `train`
                               # becomes the case's capacity_factor (its id and rows say it)
      gate_noise: 0.0          # std of N(0, 1) noise added to the gate logits while training
      gate_init: {std: 1.0, skew: 0.0, favoured: 1}        # W_gate ~ N(0, std^2/d); logit bias
                               # +skew on the first `favoured` experts (a gate that starts skewed)
      bias_update_rate: null   # u for routers carrying an expert bias (null: the router's own)
      bias_update: sign        # sign: b += u sign(mean c - c_e); magnitude: b += u (mean c - c_e)/mean c
      expert_hidden: 64        # width f of each expert MLP (d -> f -> out)
      loss: blend              # regression tasks: blend = MSE of the combined output;
                               # competitive = Jacobs et al. 1991 (each expert fits alone)
      combine: router          # router: the router's combine weights (the gate learns through
                               # them); ones: every kept assignment weighted 1 and the gate
                               # frozen at its initialisation (moe-routing-bench's top1 and
                               # topk_hard, whose gates are None)
      variants:                # optional: the same suite trained under other settings
        aux0: {aux_loss_coeff: 0.0}
        bias: {aux_loss_coeff: 0.0, routers: [deepseek], tasks: [teacher]}

Each variant overrides any setting but tokens_per_step, seeds, task and the eval set sizes;
`routers` / `tasks` (labels) and `top_k` (a list) restrict which routers, tasks and cases it
trains (the others give no row).
With variants, each task x variant is one workload labelled `<task>+<variant>`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, NoReturn

from moebench.core.case import NamedSpec
from moebench.core.errors import did_you_mean
from moebench.suite.files import show
from moebench.suite.rules import Rule

OPTIMIZERS = ("sgd", "adam", "adamw")
BIAS_UPDATES = ("sign", "magnitude")
KEYS = (
    "steps", "tokens_per_step", "optimizer", "lr", "weight_decay", "aux_loss_coeff", "z_loss_coeff",
    "eval_interval", "eval_tokens", "probe_tokens", "seeds", "task", "capacity_factor", "gate_noise",
    "gate_init", "bias_update_rate", "bias_update", "expert_hidden", "variants", "loss", "combine",
)
LOSSES = ("blend", "competitive")
COMBINES = ("router", "ones")
VARIANT_KEYS = ("steps", "eval_interval", "optimizer", "lr", "weight_decay", "aux_loss_coeff", "z_loss_coeff",
                "capacity_factor", "gate_noise", "gate_init", "bias_update_rate", "bias_update", "expert_hidden", "loss",
                "combine", "routers", "tasks", "top_k")
GATE_INIT_KEYS = ("std", "skew", "favoured")
CF_KEYS = ("train", "eval")
UNSET = "case"  # capacity factor taken from the case


@dataclass(frozen=True)
class TrainSpec:
    """A validated `train:` block (see the module docstring for each field).

    capacity_train / capacity_eval: a factor, None (dropless), or "case" (the case's factor).
    tasks: the task specs; each becomes the `workload` of the cases it expands to.
    """

    steps: int
    tasks: tuple[NamedSpec, ...]
    tokens_per_step: int | None = None
    optimizer: str = "adam"
    lr: float = 3e-3
    weight_decay: float = 0.0
    aux_loss_coeff: float = 0.0
    z_loss_coeff: float = 0.0
    eval_interval: int | None = None
    eval_tokens: int = 2048
    probe_tokens: int = 256
    seeds: tuple[int, ...] = (0,)
    capacity_train: float | None | str = UNSET
    capacity_eval: float | None | str = UNSET
    gate_noise: float = 0.0
    gate_std: float = 1.0
    gate_skew: float = 0.0
    gate_favoured: int = 1
    bias_update_rate: float | None = None
    bias_update: str = "sign"
    expert_hidden: int = 64
    loss: str = "blend"
    combine: str = "router"
    # workload label -> (the TrainSpec it trains under, router labels it trains or None: all)
    workloads: dict = field(default_factory=dict)

    top_ks: dict = field(default_factory=dict)  # workload label -> top_k values it trains (absent: all)

    def for_workload(self, label: str) -> tuple["TrainSpec", tuple[str, ...] | None]:
        return self.workloads.get(label, (self, None))

    def keeps(self, case) -> bool:
        """Whether the expanded case is trained (a variant may restrict top_k)."""
        allowed = self.top_ks.get(case.workload.display)
        return allowed is None or case.top_k in allowed

    def trained_cases(self, cases) -> list:
        """The expanded cases this suite trains (`keeps`), each with its capacity_factor axis set
        to the factor training uses where the (variant's) block gives one, so the case id and
        the row's capacity_factor say what training does; the evaluation factor shows in the
        row's eval_capacity. Cases that become equal are one case (the suite dedups by id)."""
        out = []
        for case in cases:
            if not self.keeps(case):
                continue
            spec, _ = self.for_workload(case.workload.display)
            if spec.capacity_train != UNSET and spec.capacity_train != case.capacity_factor:
                case = replace(case, capacity_factor=spec.capacity_train)
            out.append(case)
        return out

    def planned_rows(self, cases, routers) -> int:
        """How many (case, router) rows the train runner writes for ``cases``: a variant
        trains only its own routers (train_rows skips the others)."""
        total = 0
        for case in cases:
            _, allowed = self.for_workload(case.workload.display)
            total += sum(1 for r in routers if allowed is None or r.display in allowed)
        return total

    @property
    def interval(self) -> int:
        return self.eval_interval or max(1, self.steps // 10)

    def eval_steps(self) -> list[int]:
        """Steps after which the model is evaluated: 0 (before training), every interval, the last."""
        return sorted({0, self.steps, *range(self.interval, self.steps + 1, self.interval)})

    def as_row(self) -> dict:
        """The knobs as flat row columns (train.*), so tables and compare can tell runs apart."""
        return {
            "train.steps": self.steps, "train.optimizer": self.optimizer, "train.lr": self.lr,
            "train.aux_loss_coeff": self.aux_loss_coeff, "train.z_loss_coeff": self.z_loss_coeff,
            "train.seeds": json.dumps(list(self.seeds)), "train.gate_noise": self.gate_noise,
            "train.gate_skew": self.gate_skew, "train.bias_update": self.bias_update,
            "train.bias_update_rate": self.bias_update_rate, "train.loss": self.loss,
            "train.combine": self.combine,
        }


Fail = Callable[[str, str], NoReturn]


def parse_train(value: Any, fail: Fail, named: Callable[[Any, str], NamedSpec],
                routers: list[str] | None = None) -> TrainSpec:
    """The TrainSpec of a `train:` mapping. fail(field, message) raises the suite's SuiteError;
    named(item, field) validates a task spec against the task registry; routers: the suite's
    router labels (what a variant's `routers` may name)."""
    if not isinstance(value, dict):
        fail("train", f"expected a mapping of training settings, got {show(value)}")
    for key in value:
        if key not in KEYS:
            fail(f"train.{key}", f"unknown key {show(key)}{did_you_mean(str(key), list(KEYS))}")
    if "steps" not in value:
        fail("train.steps", "missing required field (how many optimizer steps to train)")
    if "task" not in value:
        fail("train.task", "missing required field (a task name or {name, params, label})")

    def scalar(key: str, rule: Rule, path: str | None = None, source: dict | None = None) -> Any:
        problem, out = rule.check((source if source is not None else value)[key])
        if problem:
            fail(path or f"train.{key}", problem)
        return out

    out: dict[str, Any] = {"steps": scalar("steps", Rule("int", 1, maximum=1_000_000))}  # 10^12 ran forever (#23)
    rules = {
        "tokens_per_step": Rule("int", 0, exclusive=True, maximum=2**26), "lr": Rule("number", 0, exclusive=True, maximum=100),  # 1e300 overflowed (#23)
        "weight_decay": Rule("number", 0), "aux_loss_coeff": Rule("number", 0), "z_loss_coeff": Rule("number", 0),
        # token counts: the grid's own bound on `tokens` (10^12 per step was accepted, #23)
        "eval_interval": Rule("int", 1), "eval_tokens": Rule("int", 1, maximum=2**26),
        "probe_tokens": Rule("int", 1, maximum=2**26),
        "gate_noise": Rule("number", 0), "bias_update_rate": Rule("number", 0, nullable=True, what="the router's own"),
        "expert_hidden": Rule("int", 1, maximum=1 << 18),  # as parallel.ffn_hidden
        "optimizer": Rule("choice", choices=OPTIMIZERS, what="optimizer"),
        "bias_update": Rule("choice", choices=BIAS_UPDATES, what="bias update"),
        "loss": Rule("choice", choices=LOSSES, what="loss"),
        "combine": Rule("choice", choices=COMBINES, what="combine weights"),
    }
    for key, rule in rules.items():
        if key in value:
            out[key] = scalar(key, rule)
    if "seeds" in value:
        seeds = value["seeds"]
        if not isinstance(seeds, list) or not seeds:
            fail("train.seeds", f"expected a non-empty list of integer seeds, got {show(seeds)}")
        for i, _ in enumerate(seeds):
            scalar(i, Rule("int", 0), f"train.seeds[{i}]", dict(enumerate(seeds)))
        if len(set(seeds)) != len(seeds):
            fail("train.seeds", f"duplicate seeds in {show(seeds)}; give each seed once")
        out["seeds"] = tuple(seeds)
    tasks = value["task"] if isinstance(value["task"], list) else [value["task"]]
    if not tasks:
        fail("train.task", "empty list: give at least one task")
    specs, seen = [], {}
    for i, item in enumerate(tasks):
        path = f"train.task[{i}]" if isinstance(value["task"], list) else "train.task"
        spec = named(item, path)
        if spec.display in seen:
            fail(path, f"duplicate task label {spec.display!r} (also {seen[spec.display]}); give each a distinct label")
        seen[spec.display] = path
        specs.append(spec)
    out["tasks"] = tuple(specs)
    if "capacity_factor" in value:
        cf = _sub_mapping(value["capacity_factor"], "train.capacity_factor", CF_KEYS, "of factors", fail)
        rule = Rule("number", 0, exclusive=True, nullable=True, what="dropless")
        for key in CF_KEYS:
            if key in cf:
                out[f"capacity_{key}"] = scalar(key, rule, f"train.capacity_factor.{key}", cf)
    if "gate_init" in value:
        gi = _sub_mapping(value["gate_init"], "train.gate_init", GATE_INIT_KEYS, "", fail)
        gi_rules = {"std": Rule("number", 0, exclusive=True), "skew": Rule("number"), "favoured": Rule("int", 1)}
        for key, rule in gi_rules.items():
            if key in gi:
                out[f"gate_{key}"] = scalar(key, rule, f"train.gate_init.{key}", gi)
    spec = TrainSpec(**out)
    if "variants" in value:
        spec = _with_variants(spec, value, fail, named, routers or [])
    return spec


def _sub_mapping(value: Any, field: str, keys, what: str, fail: Fail) -> dict:
    """``value`` checked as a mapping with keys among ``keys`` (one-line errors via ``fail``)."""
    if not isinstance(value, dict):
        fail(field, f"expected a mapping {{{', '.join(keys)}}}{' ' + what if what else ''}, got {show(value)}")
    for key in value:
        if key not in keys:
            fail(f"{field}.{key}", f"unknown key {show(key)}; expected one of: {', '.join(keys)}")
    return value


def _with_variants(base: TrainSpec, value: dict, fail: Fail, named, routers: list[str]) -> TrainSpec:
    variants = value["variants"]
    if not isinstance(variants, dict) or not variants:
        fail("train.variants", f"expected a non-empty mapping of variant name -> settings, got {show(variants)}")
    tasks = [t.display for t in base.tasks]
    workloads: dict = {}
    top_ks: dict = {}
    for name, over in variants.items():
        where = f"train.variants.{name}"
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.=-]+", name):
            fail(where, "expected a variant name of letters, digits and _.=-")
        if not isinstance(over, dict):
            fail(where, f"expected a mapping of settings, got {show(over)}")
        for key in over:
            if key not in VARIANT_KEYS:
                fail(f"{where}.{key}", f"cannot vary {show(key)}{did_you_mean(str(key), list(VARIANT_KEYS))}")
        picked = {}
        if "top_k" in over:
            ks = over["top_k"]
            whole = lambda k: isinstance(k, int) and not isinstance(k, bool) and k >= 1  # noqa: E731
            if not isinstance(ks, list) or not ks or not all(whole(k) for k in ks):
                fail(f"{where}.top_k", f"expected a non-empty list of integers >= 1, got {show(ks)}")
            picked["top_k"] = tuple(ks)
        for key, known in (("routers", routers), ("tasks", tasks)):
            if key in over:
                labels = over[key]
                if not isinstance(labels, list) or not labels:
                    fail(f"{where}.{key}", f"expected a non-empty list of {key[:-1]} labels, got {show(labels)}")
                for i, label in enumerate(labels):
                    if label not in known:
                        fail(f"{where}.{key}[{i}]",
                             f"unknown {key[:-1]} label {show(label)}{did_you_mean(str(label), known)}")
                picked[key] = tuple(labels)
        merged = {k: v for k, v in value.items() if k != "variants"}
        merged.update({k: v for k, v in over.items() if k not in ("routers", "tasks", "top_k")})

        def fail_here(field: str, message: str, over=over, where=where) -> NoReturn:
            key = field.split(".")[1].split("[")[0] if field.count(".") else ""
            fail(where + field[len("train"):] if key in over else field, message)

        spec = parse_train(merged, fail_here, named)
        for task in spec.tasks:
            if task.display in picked.get("tasks", tasks):
                workloads[f"{task.display}+{name}"] = (spec, picked.get("routers"))
                if "top_k" in picked:
                    top_ks[f"{task.display}+{name}"] = picked["top_k"]
    return replace(base, workloads=workloads, top_ks=top_ks)


def train_axes(doc: dict, train: TrainSpec, fail: Fail) -> dict[str, list[tuple[Any, str]]]:
    """Axes a train suite sets for every grid: `workload` = its tasks, and `tokens` =
    tokens_per_step when given. Naming a workload, or tokens twice, is an error."""
    grids = doc.get("grid", {})
    grids = grids if isinstance(grids, list) else [grids]
    places = [("defaults", doc.get("defaults"))] + [
        (f"grid[{i}]" if isinstance(doc.get("grid"), list) else "grid", g) for i, g in enumerate(grids)]
    for where, block in places:
        if isinstance(block, dict) and "workload" in block:
            fail(f"{where}.workload", "a train suite takes its data from train.task; remove the workload axis")
        if isinstance(block, dict) and "tokens" in block and train.tokens_per_step is not None:
            fail(f"{where}.tokens", "tokens per step is given twice (also train.tokens_per_step); give it once")
    if train.workloads:
        axes = {"workload": [(NamedSpec(t.name, t.params, label), "train.variants") for t in train.tasks
                             for label in train.workloads if label.rsplit("+", 1)[0] == t.display]}
    else:
        axes = {"workload": [(spec, "train.task") for spec in train.tasks]}
    if train.tokens_per_step is not None:
        axes["tokens"] = [(train.tokens_per_step, "train.tokens_per_step")]
    return axes
