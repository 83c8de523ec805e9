import os
import shutil
import tempfile

from tests.processes import OPT_LEVEL, run_train

# Tests run on CPU in float32 with full-precision matmuls (parity tolerances are 1e-5 / 1e-4).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# XLA's CPU backend compiles the tests' programs without LLVM's optimization passes. They are
# tiny programs (a 2-layer, 48-wide model's step; one kernel call) that run for milliseconds,
# so compiling them is most of the suite; matmuls are library calls either way. The flag
# changes code generation, not the HLO: results agree to the last bits float32 leaves open
# between two CPUs (the bounds tests use are for those), and memory figures are the same.
# Measured on tests/training/test_train_step.py, 2-core AMD EPYC: 75 CPU-s at XLA's default
# level, 49 without. Processes the tests start inherit it; long runs, whose steps then cost
# more than their compile (the demo's 200 steps: 101 CPU-s at the default level, 199 without),
# and the TPU and GPU compiles run at XLA's default (tests/processes.py). A level you give in
# XLA_FLAGS yourself is kept.
if OPT_LEVEL not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {OPT_LEVEL}=0".strip()


def _session_compile_cache() -> str | None:
    """One persistent XLA compilation cache for the whole test session: both xdist workers and
    every process a test starts (``python -m jaxlora.train``, the benchmark's sides) inherit
    this environment, so a program compiled once (the tiny model's train step, built afresh by
    test after test and run after run: a resumed run, the reference run beside it) is read
    back, not compiled again. A cached executable is the same program: results stay
    bit-identical. The process that starts the session (the xdist controller, or pytest
    itself without xdist) makes the directory, its workers inherit it, and it removes it when
    the session ends; a cache the user configured is used as it is and left alone. Compiles
    under 0.2 s (eager ops) are not worth a file. Measured on tests/test_train_cli.py alone,
    one pinned core of a 2-core AMD EPYC: 204 CPU-s without, 168 with."""
    if "PYTEST_XDIST_WORKER" in os.environ or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return None
    path = tempfile.mkdtemp(prefix="jaxlora-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    return path


_OWN_COMPILE_CACHE = _session_compile_cache()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The README's demo run, ``python -m jaxlora.train output_dir=...`` (the demo recipe:
    QLoRA, 200 steps, evals, samples and exact match), run once per test process for the tests
    of xdist group ``demo``, which read it: the README's generate command on its adapter, and
    its final eval loss against LoRA's. Samples are greedy and evals read the weights only, so
    the training is the one a run without them makes. Compiled at XLA's default level, as a
    user's run is (above)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    run_train(f"output_dir={out}")
    return out


def pytest_unconfigure(config):
    if _OWN_COMPILE_CACHE is not None:
        shutil.rmtree(_OWN_COMPILE_CACHE, ignore_errors=True)


def _own_cpus() -> None:
    """Pin this pytest-xdist worker (and the processes its tests start) to a slice of its own
    of the usable CPUs: worker ``i`` of ``n`` takes every ``n``-th one from the ``i``-th.

    XLA sizes its thread pools (the CPU runtime's, and the TPU and GPU compilers' parallel
    code generation) by the CPUs a process may run on, and so does torch's OpenMP. Unpinned,
    each of the 2 workers on CI's 2 cores, and each compile or training process a test starts,
    runs a pool as wide as the whole machine; the pools' threads then spin waiting for each
    other's work while the other process holds the core. Measured on a 2-core AMD EPYC: the
    GPU compile of tests/targets/test_plan.py took 624 CPU-s beside the TPU one in the suite,
    and 228 CPU-s (231 s) pinned to one core beside it, pinned to the other. With fewer CPUs
    than workers, or outside xdist, nothing is pinned.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if not worker.startswith("gw") or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < count:
        return
    index = int(worker[2:]) % count
    os.sched_setaffinity(0, cpus[index::count])


_own_cpus()


def pytest_collection_modifyitems(config, items):
    import jax

    if jax.default_backend() != "gpu":
        skip = pytest.mark.skip(reason="needs a GPU (jax.default_backend() != 'gpu')")
        for item in items:
            if item.get_closest_marker("gpu") is not None:
                item.add_marker(skip)
