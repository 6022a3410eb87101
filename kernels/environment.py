"""The environment a kernel starts with: an allow-list, never a copy of the server's.

The server's environment holds its secrets (Redis passwords, S3 keys, CELLGATE_*), so
a kernel gets only the few variables below, plus what makes it work in its own
working directory.
"""

from __future__ import annotations

import os
import re

ALLOWED = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TERM")
# Belt and braces: even an allowed name is dropped if it looks like a secret.
SECRET = re.compile(r"CELLGATE|AWS|REDIS|SECRET|TOKEN|PASSWORD|KEY", re.IGNORECASE)


def _allowed() -> dict[str, str]:
    env = {name: os.environ[name] for name in ALLOWED if name in os.environ and not SECRET.search(name)}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return env


def server_environment() -> dict[str, str]:
    """The fork server's own environment: it is the parent of every kernel, so it holds
    no secret either. It finds our packages through PYTHONPATH."""
    env = _allowed()
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONNOUSERSITE"] = "1"
    return env


def python_runtime(shared_cache: str) -> dict[str, str]:
    """How the Python stack is set up in a kernel, and so in the fork server, which
    imports it first: the inline plot backend, matplotlib's font cache shared so that a
    new kernel's first plot is not slow, one BLAS thread (a pool of them would not
    survive the fork, and on a small node kernels should not each spread over every
    core), no debugger file validation."""
    return {
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "MPLCONFIGDIR": shared_cache,
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    }


def kernel_environment(workdir: str, statedir: str, shared_cache: str) -> dict[str, str]:
    """`workdir` is the kernel's cwd and HOME: what it writes there is reported as files.
    IPython's profile and history go to `statedir`, which is not reported."""
    env = _allowed()
    env.update(python_runtime(shared_cache))
    env.update({"HOME": workdir, "TMPDIR": workdir, "PYTHONNOUSERSITE": "1", "IPYTHONDIR": statedir})
    return {k: v for k, v in env.items() if k in ("PATH",) or not SECRET.search(k)}
