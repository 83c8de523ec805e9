"""jaxlora.training.host: the glibc allocator settings, applied once, only when they can take effect."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SNIPPET = "import jaxlora.training.host as h; {before}print(h.tune_allocator()); print(h.tune_allocator())"


def _python(code: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    """``python -c code`` on the CPU, with no allocator setting from this environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("JAXLORA_HOST_ALLOCATOR", None)
    env |= {"JAX_PLATFORMS": "cpu"} | env_extra
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def _run(env_extra: dict[str, str], before: str = "") -> list[str]:
    out = _python(SNIPPET.format(before=before), env_extra)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_applies_all_five_settings_once():
    first, again = _run({})
    assert (
        first
        == again
        == ("tuned: M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD, M_ARENA_MAX, M_MMAP_MAX")
    )


# Allocate, touch and free a 128 MiB block (what XLA:CPU does with a step's temporaries, one
# block above glibc's 32 MiB mmap-threshold cap for the chunked loss's step) three times; print
# the minor page faults of the last two rounds.
REUSE = """
import ctypes, resource
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
n = 128 << 20
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(ctypes.c_void_p(p))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
@pytest.mark.parametrize("allocator", ["tuned", "default"])
def test_a_large_freed_block_comes_back_without_page_faults_once_tuned(allocator):
    code = "import jaxlora.training.host as h; h.tune_allocator()\n" + REUSE
    out = _python(code, {"JAXLORA_HOST_ALLOCATOR": allocator})
    assert out.returncode == 0, out.stderr
    faults = int(out.stdout.split()[-1])
    pages = 2 * (128 << 20) // os.sysconf("SC_PAGE_SIZE")  # the two later rounds' pages
    if allocator == "tuned":  # the block stays in the heap: its pages are already there
        assert faults < pages // 20, faults
    else:  # glibc unmaps it on free, and the next round faults every page in again
        assert faults > pages // 2, faults


def test_leaves_the_allocator_alone_when_asked_configured_or_on_an_accelerator():
    assert _run({"JAXLORA_HOST_ALLOCATOR": "default"})[0] == (
        "glibc defaults (JAXLORA_HOST_ALLOCATOR=default)"
    )
    assert _run({"MALLOC_ARENA_MAX": "4"})[0] == (
        "glibc settings from the environment (MALLOC_* is set)"
    )
    assert _run({"JAX_PLATFORMS": "cuda"})[0] == (
        "not tuned: the train step runs on an accelerator (JAX_PLATFORMS=cuda)"
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_refuses_after_jax_has_run():
    out = _run({}, before="import jax.numpy as jnp; jnp.ones(3).block_until_ready(); ")
    assert out[0].startswith("not tuned: JAX already ran a computation")


def test_bad_setting_is_an_error():
    out = _python(SNIPPET.format(before=""), {"JAXLORA_HOST_ALLOCATOR": "fast"})
    assert (
        out.returncode != 0 and "JAXLORA_HOST_ALLOCATOR must be 'tuned' or 'default'" in out.stderr
    )


def test_malloc_env_matches_the_settings():
    from jaxlora.training.host import SETTINGS, malloc_env

    env = malloc_env()
    assert env == {name: str(value) for _, _, name, value in SETTINGS}
    assert env["MALLOC_ARENA_MAX"] == "1" and env["MALLOC_TOP_PAD_"] == str(512 << 20)
