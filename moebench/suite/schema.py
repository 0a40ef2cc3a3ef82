"""A JSON Schema (draft 2020-12) of the suite format, for editors and CI.

Built from the validator's own tables (`suite.AXES`, `suite.TIMING`), the registries and the
kinds' blocks (moebench/core/kinds.py `Block.schema`), so a suite that `load_suite` accepts
always validates against it. The schema is looser than the
validator where JSON Schema cannot say more: cross-field rules (top_k <= experts,
max_rounds >= min_rounds), unique labels, router/workload ``check()`` constraints, and the
file-level view (it checks one file; a file with ``include:`` may leave required fields to
the files it includes).
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from moebench.core import kinds
from moebench.core.registry import Registry, options_of
from moebench.routers.registry import ROUTERS
from moebench.suite.load import AXES, LABEL_PATTERN, MAX_DESCRIPTION_CHARS, NAME_PATTERN, TIMING
from moebench.suite.rules import Rule
from moebench.core.workloads import WORKLOADS

DRAFT = "https://json-schema.org/draft/2020-12/schema"
_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}


def type_schema(tp: Any) -> dict:
    """The schema of an option annotation: bool, int, float, str, Literal, unions, Optional."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [type_schema(a) for a in typing.get_args(tp)]}
    if tp in _JSON_TYPES:
        return {"type": _JSON_TYPES[tp]}
    return {}  # an annotation JSON cannot express: accept anything, the validator decides


def rule_schema(rule: Rule) -> dict:
    """The schema of one scalar field of the validator's tables (not a workload)."""
    if rule.kind == "choice":
        return {"enum": list(rule.choices) + ([None] if rule.nullable else [])}
    base = {"int": "integer", "number": "number", "bool": "boolean"}[rule.kind]
    out: dict[str, Any] = {"type": [base, "null"] if rule.nullable else base}
    if rule.minimum is not None:
        out["exclusiveMinimum" if rule.exclusive else "minimum"] = rule.minimum
    if rule.maximum is not None:
        out["maximum"] = rule.maximum
    return out


def params_schema(cls: type) -> dict:
    """``params`` of one registered class: its options as properties, nothing else."""
    props = {}
    for name, spec in options_of(cls).items():
        prop = type_schema(spec.type)
        if isinstance(spec.default, (bool, int, float, str, type(None))):
            prop["default"] = spec.default
        props[name] = prop
    return {"type": ["object", "null"], "additionalProperties": False, "properties": props}


def named_schema(registry: Registry) -> dict:
    """A name of ``registry``, or a {name, params, label} mapping with per-name params."""
    classes = registry.classes()
    names = list(classes)
    return {
        "anyOf": [
            {"type": "string", "enum": names},
            {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {
                    "name": {"enum": names},
                    "params": {"type": ["object", "null"]},
                    "label": {"type": "string", "pattern": f"^{LABEL_PATTERN}$"},
                },
                "allOf": [
                    {
                        "if": {"required": ["name"], "properties": {"name": {"const": name}}},
                        "then": {"properties": {"params": params_schema(cls)}},
                    }
                    for name, cls in classes.items()
                ],
            },
        ],
        "description": f"a {registry.kind} by name, or a mapping of name, params and label",
    }


def _axis_schema(rule: Rule) -> dict:
    return {"$ref": "#/$defs/workload"} if rule.kind == "workload" else rule_schema(rule)


def suite_json_schema() -> dict:
    """The JSON Schema of one suite file (draft 2020-12)."""
    axes = {name: _axis_schema(rule) for name, rule in AXES.items()}
    grid = {
        name: {"anyOf": [schema, {"type": "array", "minItems": 1, "items": schema}]} for name, schema in axes.items()
    }
    required_axes = [name for name, rule in AXES.items() if rule.required]
    blocks = kinds.blocks()
    complete = {
        "required": ["name", "version", "routers"],
        # each required axis in grid or defaults, unless a kind's block supplies it (a training
        # suite's tasks stand in for the workload axis: moebench/kinds/train/spec.py)
        "allOf": [
            {
                "anyOf": [
                    {"required": ["grid"], "properties": {"grid": {"required": [axis]}}},
                    {"required": ["defaults"], "properties": {"defaults": {"required": [axis]}}},
                    *({"required": [key]} for key, kind in blocks.items() if axis in kind.block.supplies),
                ]
            }
            for axis in required_axes
        ],
    }
    return {
        "$schema": DRAFT,
        "title": "moebench suite",
        "description": "A benchmark suite of MoE routers: a grid of cases and the routers to run on each.",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "pattern": f"^{NAME_PATTERN}$"},
            "version": {"type": "integer", "minimum": 1, "maximum": 2**31},
            "description": {"type": "string", "maxLength": MAX_DESCRIPTION_CHARS},
            "include": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
            "defaults": {"type": "object", "additionalProperties": False, "properties": axes},
            "grid": {
                "anyOf": [
                    {"$ref": "#/$defs/grid"},
                    {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/grid"}, "description": "a union of grids"},
                ]
            },
            "routers": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/router"}},
            # each kind's block (train:, parallel:, a plugin's): its own schema, checked by the validator
            **{key: kind.block.schema for key, kind in blocks.items()},
            "timing": {
                "type": "object",
                "additionalProperties": False,
                "properties": {name: rule_schema(rule) for name, rule in TIMING.items()},
            },
        },
        # a file that includes others may leave required fields to them
        "if": {"required": ["include"]},
        "else": complete,
        "$defs": {
            "workload": named_schema(WORKLOADS),
            "router": named_schema(ROUTERS),
            "grid": {"type": "object", "additionalProperties": False, "properties": grid},
        },
    }
