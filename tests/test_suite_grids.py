"""`grid` as a list of grids: a union of cartesian products (e.g. a T sweep and an E sweep)."""

from __future__ import annotations

import jsonschema
import pytest

from moebench.core.errors import SuiteError
from moebench.suite.schema import suite_json_schema
from moebench.suite.load import load_suite

UNION = """
name: union
version: 1
defaults: {workload: uniform, top_k: 2, capacity_factor: 1.0}
grid:
  - {tokens: [64, 128, 256], experts: 8}
  - {tokens: 128, experts: [4, 8, 16]}
routers: [topk]
"""


def test_union_of_grids_expands_each_and_drops_repeats(tmp_path):
    path = tmp_path / "union.yaml"
    path.write_text(UNION)
    suite = load_suite(path)
    shapes = [(c.tokens, c.experts) for c in suite.cases]
    # (128, 8) is in both grids and appears once
    assert shapes == [(64, 8), (128, 8), (256, 8), (128, 4), (128, 16)]


def test_union_grid_errors_name_the_grid_index(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(UNION.replace("experts: [4, 8, 16]", "experts: [4, 1]"))
    with pytest.raises(SuiteError) as err:
        load_suite(path)
    assert err.value.field == "grid[1].experts[1]"


def test_union_grid_matches_the_schema(tmp_path):
    import yaml

    jsonschema.validate(yaml.safe_load(UNION), suite_json_schema())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(yaml.safe_load(UNION.replace("tokens: 128, experts", "tokenz: 128, experts")), suite_json_schema())
