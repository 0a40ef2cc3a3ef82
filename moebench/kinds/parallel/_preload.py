"""Imported once by the launcher's fork server, so every launched rank forks with torch, the
engine and numba (through moebench.core.kernels, which picks its threading layer) ready: numba's
typing and target contexts are built by compiling one serial function (seconds per process
otherwise). No parallel kernel runs and no thread starts here, so forking stays safe."""

from moebench.core import kernels
from moebench.kinds.parallel.launch import die_with_parent
from moebench.kinds.parallel import engine  # noqa: F401
from moebench.routers import registry  # noqa: F401

if kernels.available():
    import numba

    numba.njit(lambda x: x + 1)(1)

die_with_parent()  # the fork server ends with the moebench process that started it (#23)
