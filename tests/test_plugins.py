"""Third-party routers join through the `moebench.routers` entry-point group.

A tiny package is built and pip-installed into a temporary folder during the test; a fresh
Python with that folder on its path must list the router and run a suite that names it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLUGIN_PYPROJECT = """
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "moebench-plugin-example"
version = "0.0.1"

[project.entry-points."moebench.routers"]
example = "moebench_plugin_example"
"""

PLUGIN_MODULE = '''
"""A user's router: top-k over temperature-scaled softmax, through moebench's capacity pipeline."""
from dataclasses import dataclass

import torch

from moebench.routers import TokenChoiceRouter, register


@register("tempered_topk")
@dataclass(frozen=True)
class TemperedTopK(TokenChoiceRouter):
    temperature: float = 2.0
    paper = "plugin example"

    def route(self, inputs, ctx):
        logits = inputs.logits.float()
        probs = torch.softmax(logits / self.temperature, dim=-1)
        top = torch.topk(probs, ctx.top_k, dim=-1)
        return self.finish(top.indices, top.values, probs, logits, ctx)
'''

SUITE = """
name: plugin_suite
version: 1
grid: {workload: zipf, tokens: 128, experts: 4, top_k: 1, capacity_factor: 1.0}
routers: [{name: tempered_topk, params: {temperature: 0.5}}]
timing: {warmup_rounds: 0, min_rounds: 1, max_rounds: 1, min_time_s: 0.0, threads: 1}
"""


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("plugin_src")
    (src / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    (src / "moebench_plugin_example.py").write_text(PLUGIN_MODULE)
    target = tmp_path_factory.mktemp("plugin_site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target), str(src)],
        check=True, capture_output=True, text=True,
    )
    return target


def moebench(args: list[str], plugin: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "moebench", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_installed_plugin_router_is_listed_and_runs(plugin_path, tmp_path):
    listed = moebench(["list"], plugin_path, tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "tempered_topk" in listed.stdout
    suite = tmp_path / "plugin_suite.yaml"
    suite.write_text(textwrap.dedent(SUITE))
    ran = moebench(["run", str(suite), "--results", "r", "--reports", "p"], plugin_path, tmp_path)
    assert ran.returncode == 0, ran.stderr
    rows = (next((tmp_path / "r" / "plugin_suite").iterdir()) / "rows.jsonl").read_text()
    assert '"router": "tempered_topk"' in rows and '"status": "ok"' in rows


def test_plugin_options_are_type_checked(plugin_path, tmp_path):
    suite = tmp_path / "bad.yaml"
    suite.write_text(textwrap.dedent(SUITE).replace("temperature: 0.5", "temperature: hot"))
    out = moebench(["validate", str(suite)], plugin_path, tmp_path)
    assert out.returncode == 2
    assert "routers[0].params" in out.stderr and "expected a number" in out.stderr


def test_without_the_plugin_the_router_is_unknown(tmp_path):
    suite = tmp_path / "s.yaml"
    suite.write_text(textwrap.dedent(SUITE))
    out = subprocess.run([sys.executable, "-m", "moebench", "validate", str(suite)], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown router 'tempered_topk'" in out.stderr
