"""Pallas kernels and when to use them.

Mode (``set_mode`` or the ``JAXLORA_KERNELS`` environment variable):

* ``"auto"`` (default): kernels on GPU and TPU; on CPU the explicit, logged
  dequantize-then-dot fallback, because CPU Pallas only runs in (slow) interpret mode.
* ``"interpret"``: kernels everywhere, in Pallas interpret mode (tests, debugging on CPU).
* ``"off"``: never use kernels.
"""

from __future__ import annotations

import os

_MODES = ("auto", "interpret", "off")
_mode = os.environ.get("JAXLORA_KERNELS", "auto")
if _mode not in _MODES:
    raise ValueError(f"JAXLORA_KERNELS must be one of {_MODES}, got {_mode!r}")

# Block sizes the fused NF4 kernels accept: a K tile must hold whole absmax blocks.
KERNEL_BLOCKSIZES = (32, 64, 128)


def set_mode(mode: str) -> None:
    """Choose when kernels run: ``"auto"``, ``"interpret"`` or ``"off"`` (see module doc)."""
    global _mode
    if mode not in _MODES:
        raise ValueError(f"kernel mode must be one of {_MODES}, got {mode!r}")
    _mode = mode


def get_mode() -> str:
    return _mode


def interpret() -> bool:
    """Whether kernels should run in Pallas interpret mode."""
    return _mode == "interpret"
