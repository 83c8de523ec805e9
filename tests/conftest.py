import os

# Tests run on CPU in float32 with full-precision matmuls (parity tolerances are 1e-5 / 1e-4).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402


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
