"""The processes tests start: their ``XLA_FLAGS``, and the train command run as a user runs
it. The test session compiles XLA's CPU programs without LLVM's optimization passes
(tests/conftest.py); a script that sets its own count of fake CPU devices keeps that, and a
process that should compile as a user's would (a long training run, whose steps then cost
more than its compile; a TPU or GPU target) drops it. Imports nothing heavy, so a script can
call it before JAX is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DEVICE_COUNT = "--xla_force_host_platform_device_count"
OPT_LEVEL = "--xla_backend_optimization_level"


def _flags() -> list[str]:
    return os.environ.get("XLA_FLAGS", "").split()


def with_host_devices(n: int) -> str:
    """This process's ``XLA_FLAGS`` with ``n`` fake CPU devices in place of any count they
    give."""
    kept = [f for f in _flags() if not f.startswith(DEVICE_COUNT)]
    return " ".join([*kept, f"{DEVICE_COUNT}={n}"])


def without_opt_level() -> str:
    """This process's ``XLA_FLAGS`` without the session's code-generation level: XLA's
    default, what a user's process compiles with."""
    return " ".join(f for f in _flags() if not f.startswith(OPT_LEVEL))


def user_env() -> dict[str, str]:
    """This process's environment with XLA's default code generation."""
    return {**os.environ, "XLA_FLAGS": without_opt_level()}


def run_train(*args: str) -> None:
    """``python -m jaxlora.train ARGS`` from the repository root (the recipes' paths are
    relative to it), compiled at XLA's default level; fails the test on a non-zero exit."""
    cmd = [sys.executable, "-m", "jaxlora.train", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=user_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def logged_steps(out: Path) -> list[int]:
    """The steps a running ``jaxlora.train`` has logged to ``out/metrics.jsonl`` so far: its
    whole lines only (a reader can catch a line half-written)."""
    path = out / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line)["step"] for line in text[: text.rfind("\n") + 1].splitlines()]
