"""Host-side settings that make a CPU train step fast: glibc's allocator.

XLA:CPU's worker threads allocate and free the step's temporary buffers on every step. With
glibc's defaults each thread gets its own arena, and freed memory goes back to the kernel
(heaps shrink, large blocks are unmapped), so the next step touches fresh pages again: on the
benchmark's tiny model that was 32,000 minor page faults and about 55 ms of kernel time in a
105 ms step (``tools/bench_train.py``; docs/benchmarks.md). Keeping the memory mapped removes
them. The four ``mallopt`` settings below are what measured that way; any one alone does not.
With two arenas instead of one the effect came and went from run to run (which arena a
thread lands in), so all threads share one. A fifth, no block ever ``mmap``-ed
(``M_MMAP_MAX`` 0), covers what glibc's 32 MiB cap on ``M_MMAP_THRESHOLD`` leaves out: a step
whose temporaries XLA allocates as one block above 32 MiB (the chunked loss's tiny-model step:
131 MiB) was mapped and unmapped, and its 33,000 pages faulted in again, on every step.

:func:`tune_allocator` applies them to the running process. It must run before the first JAX
computation (before XLA's threads have their arenas); ``python -m jaxlora.train`` calls it
first thing. Freed memory then stays with the process (its resident size stays at its peak),
which is what a training process wants. ``JAXLORA_HOST_ALLOCATOR=default`` leaves glibc's
defaults; ``MALLOC_*`` variables in the environment are respected and left alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pkgutil
import sys

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h) and the values measured.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -3, -4, -8
# (mallopt parameter, its name, the environment variable glibc reads at start-up, value)
SETTINGS = (
    (M_MMAP_THRESHOLD, "M_MMAP_THRESHOLD", "MALLOC_MMAP_THRESHOLD_", 32 << 20),  # heap up to 32 MiB
    (M_TRIM_THRESHOLD, "M_TRIM_THRESHOLD", "MALLOC_TRIM_THRESHOLD_", (1 << 31) - 1),  # keep the top
    (M_TOP_PAD, "M_TOP_PAD", "MALLOC_TOP_PAD_", 512 << 20),  # grow in 512 MiB steps (addresses)
    (M_ARENA_MAX, "M_ARENA_MAX", "MALLOC_ARENA_MAX", 1),  # one arena for all threads
    (M_MMAP_MAX, "M_MMAP_MAX", "MALLOC_MMAP_MAX_", 0),  # larger blocks from the heap too
)
ENV = "JAXLORA_HOST_ALLOCATOR"

_applied: str | None = None


def _accelerator() -> str | None:
    """What JAX would compute on instead of the CPU, decided without starting a backend:
    ``JAX_PLATFORMS`` if set, else an installed GPU/TPU plugin (``jax_plugins``, libtpu)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        first = platforms.split(",")[0].strip()
        return None if first == "cpu" else f"JAX_PLATFORMS={platforms}"
    from importlib import metadata, util

    plugins = [ep.name for ep in metadata.entry_points(group="jax_plugins")]
    if util.find_spec("jax_plugins") is not None:
        import jax_plugins  # namespace package of GPU plugins (jax_cuda12_plugin, ...)

        plugins += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    if util.find_spec("libtpu") is not None:
        plugins.append("libtpu")
    return f"JAX plugin(s) {sorted(set(plugins))} installed" if plugins else None


def _backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - jax moved it; then we cannot tell
        return False
    check = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(check()) if check is not None else False


def tune_allocator() -> str:
    """Keep freed host memory mapped (glibc ``mallopt``), once per process; returns what it did.

    Applied when JAX will compute on the CPU (``JAX_PLATFORMS=cpu``, or no GPU/TPU plugin
    installed): that is where it was measured, and where the host allocator is on the step's
    path. A no-op, with the reason returned and logged, when ``JAXLORA_HOST_ALLOCATOR=default``,
    when the environment sets ``MALLOC_*`` itself, with an accelerator, off Linux/glibc, or when
    JAX has already run a computation (too late for XLA's threads; call this right after
    ``import jaxlora``).
    """
    global _applied
    if _applied is not None:
        return _applied
    value = os.environ.get(ENV, "tuned")
    if value not in ("tuned", "default"):
        raise ValueError(f"{ENV} must be 'tuned' or 'default', got {value!r}")
    if value == "default":
        _applied = f"glibc defaults ({ENV}=default)"
    elif any(k.startswith("MALLOC_") for k in os.environ):
        _applied = "glibc settings from the environment (MALLOC_* is set)"
    elif (accelerator := _accelerator()) is not None:
        _applied = f"not tuned: the train step runs on an accelerator ({accelerator})"
    elif not sys.platform.startswith("linux"):
        _applied = f"not tuned: {sys.platform} has no glibc malloc"
    elif _backends_initialized():
        _applied = "not tuned: JAX already ran a computation (call tune_allocator before it)"
        log.warning("host allocator %s", _applied)
        return _applied
    else:
        try:
            mallopt = ctypes.CDLL("libc.so.6").mallopt
        except (OSError, AttributeError):
            _applied = "not tuned: no glibc (libc.so.6 with mallopt)"
        else:
            done = [name for opt, name, _, v in SETTINGS if mallopt(opt, v) == 1]
            _applied = "tuned: " + ", ".join(done) if done else "not tuned: mallopt refused"
    log.info("host allocator: %s", _applied)
    return _applied


def malloc_env() -> dict[str, str]:
    """The same settings as environment variables, for a process started from this one (glibc
    reads them at start-up): ``tools/bench_train.py`` gives them to both sides it compares."""
    return {env: str(v) for _, _, env, v in SETTINGS}
