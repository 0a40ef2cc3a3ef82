"""The `train:` block: parsing, expansion into cases, and one-line errors for malformed blocks."""

import pytest

from moebench.core.errors import SuiteError
from moebench.suite.load import validate_document


def doc(train=None, **top):
    base = {
        "name": "t", "version": 1, "routers": ["switch", "expert_choice"],
        "grid": {"experts": 4, "top_k": 1, "hidden": 8},
        "train": {"steps": 10, "tokens_per_step": 64, "task": "local_experts"} if train is None else train,
    }
    base.update(top)
    return base


def test_train_block_parses_and_tasks_become_workloads():
    suite = validate_document(doc({
        "steps": 10, "tokens_per_step": 64, "optimizer": "adamw", "lr": 0.01, "aux_loss_coeff": 0.01,
        "seeds": [0, 1, 2], "capacity_factor": {"train": 1.25, "eval": 2.0},
        "gate_init": {"skew": 2.0, "favoured": 2}, "bias_update": "magnitude",
        "task": [{"name": "local_experts", "params": {"regions": 2}}, {"name": "language", "label": "lang"}],
    }), "s.yaml")
    spec = suite.train
    assert (spec.steps, spec.optimizer, spec.lr, spec.seeds) == (10, "adamw", 0.01, (0, 1, 2))
    assert (spec.capacity_train, spec.capacity_eval, spec.gate_skew, spec.gate_favoured) == (1.25, 2.0, 2.0, 2)
    assert [c.workload.display for c in suite.cases] == ["local_experts", "lang"]
    assert {c.tokens for c in suite.cases} == {64}
    assert spec.eval_steps() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]


def test_eval_steps_always_include_start_and_end():
    suite = validate_document(doc({"steps": 25, "tokens_per_step": 8, "eval_interval": 10, "task": "teacher"}), "s.yaml")
    assert suite.train.eval_steps() == [0, 10, 20, 25]


def test_suite_without_train_block_has_none():
    plain = doc()
    del plain["train"]
    plain["grid"] = {"workload": "uniform", "tokens": 64, "experts": 4, "top_k": 1}
    assert validate_document(plain, "s.yaml").train is None


def test_variants_expand_to_labelled_workloads_with_their_settings():
    suite = validate_document(doc({
        "steps": 10, "tokens_per_step": 64, "task": "teacher",
        "variants": {"aux0": {"aux_loss_coeff": 0.0}, "aux2": {"aux_loss_coeff": 0.01, "routers": ["switch"]}},
    }), "s.yaml")
    labels = [c.workload.display for c in suite.cases]
    assert labels == ["teacher+aux0", "teacher+aux2"]
    spec, routers = suite.train.for_workload("teacher+aux2")
    assert spec.aux_loss_coeff == 0.01 and routers == ("switch",)
    assert suite.train.for_workload("teacher+aux0")[1] is None


BAD = [
    ("a list", [1], "train", "expected a mapping"),
    ({"steps": 10, "task": "teacher", "stpes": 3}, None, "train.stpes", "unknown key"),
    ({"task": "teacher"}, None, "train.steps", "missing required field"),
    ({"steps": 10}, None, "train.task", "missing required field"),
    ({"steps": 0, "task": "teacher"}, None, "train.steps", "expected an integer >= 1, got 0"),
    ({"steps": 5, "task": "teacher", "optimizer": "adagrad"}, None, "train.optimizer", "unknown optimizer"),
    ({"steps": 5, "task": "teacher", "lr": -1}, None, "train.lr", "expected a number > 0"),
    ({"steps": 5, "task": "teacher", "tokens_per_step": 10**12}, None, "train.tokens_per_step", "<= 67108864"),
    ({"steps": 5, "task": "teacher", "eval_tokens": 2**27}, None, "train.eval_tokens", "<= 67108864"),
    ({"steps": 5, "task": "teacher", "expert_hidden": 10**9}, None, "train.expert_hidden", "<= 262144"),
    ({"steps": 5, "task": "teacher", "seeds": []}, None, "train.seeds", "non-empty list"),
    ({"steps": 5, "task": "teacher", "seeds": [0, 0]}, None, "train.seeds", "duplicate seeds"),
    ({"steps": 5, "task": "teacher", "seeds": [0, -1]}, None, "train.seeds[1]", "expected an integer >= 0"),
    ({"steps": 5, "task": "teachr"}, None, "train.task", "did you mean 'teacher'"),
    ({"steps": 5, "task": {"name": "teacher", "params": {"expertz": 2}}}, None, "train.task.params", "no option 'expertz'"),
    ({"steps": 5, "task": {"name": "language", "params": {"mix": 2.0}}}, None, "train.task.params", "0 <= mix <= 1"),
    ({"steps": 5, "task": "teacher", "capacity_factor": {"training": 1.0}}, None, "train.capacity_factor.training", "unknown key"),
    ({"steps": 5, "task": "teacher", "capacity_factor": {"eval": 0}}, None, "train.capacity_factor.eval", "expected a number > 0"),
    ({"steps": 5, "task": "teacher", "gate_init": {"favoured": 0}}, None, "train.gate_init.favoured", ">= 1"),
    ({"steps": 5, "task": "teacher", "bias_update": "both"}, None, "train.bias_update", "unknown bias update"),
    ({"steps": 5, "task": "teacher", "combine": "uniform"}, None, "train.combine", "unknown combine weights"),
    ({"steps": 5, "task": "teacher", "variants": {"v": {"combine": 1}}}, None, "train.variants.v.combine",
     "combine weights"),
    ({"steps": 5, "task": "teacher", "variants": {"v": {"seeds": [3]}}}, None, "train.variants.v.seeds", "cannot vary"),
    ({"steps": 5, "task": "teacher", "variants": {"v": {"routers": ["swich"]}}}, None, "train.variants.v.routers[0]",
     "did you mean 'switch'"),
    ({"steps": 5, "task": "teacher", "variants": {"v": {"aux_loss_coeff": -1}}}, None, "train.variants.v.aux_loss_coeff",
     "expected a number >= 0"),
]


@pytest.mark.parametrize("train, _, field, message", BAD, ids=[b[2] for b in BAD])
def test_malformed_train_blocks_get_one_line_errors(train, _, field, message):
    with pytest.raises(SuiteError) as err:
        validate_document(doc(train, grid={"experts": 4, "top_k": 1, "tokens": 64}), "bad.yaml")
    text = str(err.value)
    assert "\n" not in text
    assert err.value.file == "bad.yaml" and err.value.field == field, text
    assert message in err.value.message, text


def test_a_train_suite_names_no_workload_and_tokens_once():
    with pytest.raises(SuiteError, match=r"grid.workload: a train suite takes its data from train.task"):
        validate_document(doc(grid={"workload": "uniform", "experts": 4, "top_k": 1}), "s.yaml")
    with pytest.raises(SuiteError, match=r"grid.tokens: tokens per step is given twice"):
        validate_document(doc(grid={"tokens": 64, "experts": 4, "top_k": 1}), "s.yaml")


def test_variant_top_k_restricts_the_cases():
    suite = validate_document(doc({
        "steps": 10, "tokens_per_step": 64, "task": "teacher",
        "variants": {"one": {"top_k": [1]}, "both": {}},
    }, grid={"experts": 4, "top_k": [1, 2], "hidden": 8}), "s.yaml")
    assert sorted((c.workload.display, c.top_k) for c in suite.cases) == [
        ("teacher+both", 1), ("teacher+both", 2), ("teacher+one", 1)]


def test_a_variants_training_capacity_names_its_case_and_planned_rows_count_its_routers():
    """The case axis (id, row) says the factor training uses, not the suite default; the
    planned row count is the (case, router) pairs the variants train, not cases x routers."""
    suite = validate_document(doc({
        "steps": 10, "tokens_per_step": 64, "task": "teacher",
        "variants": {"drops": {"capacity_factor": {"train": 1.25, "eval": 2.0}, "routers": ["switch"]},
                     "plain": {}},
    }, grid={"experts": 4, "top_k": 1, "hidden": 8, "capacity_factor": None}), "s.yaml")
    by_label = {c.workload.display: c for c in suite.cases}
    assert by_label["teacher+drops"].capacity_factor == 1.25
    assert "-cf1.25-" in by_label["teacher+drops"].case_id
    assert by_label["teacher+plain"].capacity_factor is None and "-dropless-" in by_label["teacher+plain"].case_id
    assert suite.train.planned_rows(suite.cases, suite.routers) == 1 + 2  # drops: switch; plain: both routers
    assert len(suite.cases) * len(suite.routers) == 4


def test_a_training_capacity_equal_to_the_case_keeps_the_case_id():
    grid = {"experts": 4, "top_k": 1, "hidden": 8, "capacity_factor": 1.25}
    plain = validate_document(doc(grid=grid), "s.yaml").cases[0]
    same = validate_document(doc({"steps": 10, "tokens_per_step": 64, "task": "local_experts",
                                  "capacity_factor": {"train": 1.25, "eval": 2.0}}, grid=grid), "s.yaml").cases[0]
    assert same.case_id == plain.case_id


def test_a_variant_run_records_its_planned_rows_and_the_report_counts_them(tmp_path):
    from moebench.report.build import write_report
    from moebench.run.session import RunOptions, execute

    suite = validate_document(doc({
        "steps": 2, "tokens_per_step": 16, "task": "teacher", "eval_tokens": 16, "probe_tokens": 8,
        "expert_hidden": 4, "variants": {"one": {"routers": ["switch"]}, "both": {}},
    }, timing={"threads": 1}), "s.yaml")
    run = execute(suite, RunOptions(results_root=tmp_path / "results"))
    assert len(run.rows()) == 3 and run.meta()["planned_rows"] == 3  # not 2 cases x 2 routers
    text = write_report([run.path], tmp_path / "reports").read_text()
    assert "3 rows of 3 planned" in text
