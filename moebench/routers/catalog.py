"""Imports every built-in router module so their ``@register`` decorators run."""

from moebench.routers import baselines, dense, expert_choice, token_choice  # noqa: F401
