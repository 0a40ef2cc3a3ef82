"""moebench: benchmark Mixture-of-Experts routing algorithms.

Data flow (see docs/architecture.md): suite -> cases -> workload -> router -> Routing
-> metrics -> timed phases -> rows -> results -> report.
"""

__version__ = "0.1.0"
