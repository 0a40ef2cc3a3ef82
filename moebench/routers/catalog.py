"""Imports every built-in router module so their ``@register`` decorators run."""

from moebench.routers import base_layers, baselines, dense, expert_choice, hashing, sinkhorn, soft_moe, token_choice  # noqa: F401
