"""The compile toolchain as the compiling test processes see it: the ``aot`` extra in the
venv, or in a side directory put on their ``PYTHONPATH`` only (``$JAXLORA_AOT_TOOLCHAIN``,
default ``.aot-toolchain/``, where ``.ci/run`` installs it)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.processes import without_opt_level

ROOT = Path(__file__).resolve().parents[2]
CACHE_VARIABLES = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_")
SIDE = Path(os.environ.get("JAXLORA_AOT_TOOLCHAIN", ROOT / ".aot-toolchain"))
# The compiling processes build the program a TPU or GPU would run: JAX's default matmul
# precision, not the "highest" tests/conftest.py sets for CPU parity tests (with it, XLA
# compiles float32 dots as multi-pass bf16 / 3xTF32 programs: the CI model's four GPU compiles
# took 699 CPU-s instead of 228, the TPU ones 324 instead of 210, on a 2-core AMD EPYC).
# They also leave out the test session's persistent compilation cache (tests/conftest.py):
# a compile-only TPU or GPU executable is never run, and each compile here is of its own program;
# and the session's CPU code-generation level (tests/conftest.py): they compile as a user would.
ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith(CACHE_VARIABLES)},
    "XLA_FLAGS": without_opt_level(),
    "JAX_PLATFORMS": "cpu",
    "JAX_DEFAULT_MATMUL_PRECISION": "default",
    "PYTHONPATH": os.pathsep.join([str(SIDE), str(ROOT), os.environ.get("PYTHONPATH", "")]),
}


@functools.cache
def missing() -> dict[str, str]:
    """``missing_toolchains()`` as the compiling processes see it (with the side directory);
    asked once per test process (each ask starts a Python that loads the toolchains: 4.5 s)."""
    code = (
        "import json; from jaxlora.targets import missing_toolchains as m; print(json.dumps(m()))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# A compile of the CI model takes 4-10 min on the 2-core CI machine when idle (GPU: 567 s in
# the last CI run); on a machine shared with other jobs it took 686 s to over 900 s, so the limit
# is the suite's own budget rather than a guess at an idle machine's speed.
def run_script(script: Path, *args: str, timeout: int = 1800) -> None:
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def run_plan(*args: str, env: dict[str, str] | None = None, timeout: int = 600):
    """``python -m jaxlora.plan ARGS`` as a user runs it, from the repository root with the
    toolchain on its path (``env`` adds variables); the completed process, for the caller to
    check its exit status and output."""
    return subprocess.run(
        [sys.executable, "-m", "jaxlora.plan", *args],
        env=ENV | (env or {}),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
