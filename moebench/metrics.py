"""Deprecated location: the metrics now live in `moebench.core.metrics`.

Kept so plugins that call `moebench.metrics.direction` keep working; importing it warns once.
"""
import warnings

from moebench.core.metrics import *  # noqa: F401,F403
from moebench.core.metrics import direction  # noqa: F401  (the public API plugins use)

warnings.warn("moebench.metrics moved to moebench.core.metrics; this alias will be removed",
              DeprecationWarning, stacklevel=2)
