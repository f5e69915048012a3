"""Running a test file's ``interp_`` tests under Triton's interpreter (CPU).

The interpreter must be switched on before triton is imported, so each Triton test file has one
driver test that re-runs the file's ``interp_`` tests in a child pytest with
``TRITON_INTERPRET=1``; in the main process those tests are skipped (``interp``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

interp = pytest.mark.skipif(
    not INTERPRETING, reason="runs in the child pytest (TRITON_INTERPRET=1) of the file's driver test"
)
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")


def triton_version() -> tuple[int, ...]:
    if not HAVE_TRITON:
        return (0,)
    import triton

    return tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())


def driver(test):
    """Marks the driver test: slow, needs triton, never runs inside the child, and needs Triton >= 3.8
    (3.6's interpreter raises 'only 0-dimensional arrays can be converted to Python scalars'; the
    compiled kernels pass the gpu tests there; 3.8's and 3.9's interpreters pass)."""
    for mark in (
        pytest.mark.slow,  # a child pytest of the file's interp_ tests: a minute or more on 2 cores
        needs_triton,
        pytest.mark.skipif(INTERPRETING, reason="already inside the interpreter child"),
        pytest.mark.skipif(triton_version() < (3, 8), reason="verified with Triton 3.8's and 3.9's interpreters"),
    ):
        test = mark(test)
    return test


def run_interp_tests(path: str) -> None:
    """Run ``path``'s ``interp_`` tests in a child pytest under the interpreter; every one must pass."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path, "-k", "interp_"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-3000:]
