"""``XLA_FLAGS`` for the processes tests start: the test session's own flags (tests/conftest.py)
kept, the count of fake CPU devices set. Imports nothing, so a script can call it before JAX
is imported."""

from __future__ import annotations

import os

DEVICE_COUNT = "--xla_force_host_platform_device_count"


def with_host_devices(n: int, flags: str | None = None) -> str:
    """``flags`` (default: this process's ``XLA_FLAGS``) with ``n`` fake CPU devices in place of
    any count they give."""
    flags = os.environ.get("XLA_FLAGS", "") if flags is None else flags
    kept = [f for f in flags.split() if not f.startswith(DEVICE_COUNT)]
    return " ".join([*kept, f"{DEVICE_COUNT}={n}"])
