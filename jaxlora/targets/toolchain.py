"""Compile-only devices for TPU and GPU targets on a machine that has neither.

This is the one module that touches JAX's experimental and private compile-only APIs; it was
written for and checked with jax/jaxlib ``JAX_VERSION``. Anything else in jaxlora uses the
devices it returns like real ones (``Mesh``, ``NamedSharding``, ``jax.jit(...).lower(...)
.compile()``, ``memory_analysis()``, ``cost_analysis()``, ``as_text()``).

* TPU: libtpu (``pip install 'libtpu==0.0.42.*'``, what ``jax[tpu]==0.10.2`` pins) describes
  any topology by name: ``jax.experimental.topologies.get_topology_desc(topology_name=...,
  platform="tpu")``. Its default host is 2x2 chips, so one chip needs
  ``chips_per_host_bounds=[1, 1, 1]``. libtpu's one-process-per-machine lock file is
  switched off (``ALLOW_MULTIPLE_LIBTPU_LOAD=1``): compile-only use drives no TPU.
* GPU: the CUDA PJRT plugin (``pip install jax-cuda12-pjrt==0.10.2``) builds a topology from a
  ``GpuTargetConfigProto`` (``targets/gpu/*.pbtxt``) without a driver; compiling needs
  ``ptxas`` and ``libdevice``, which ``nvidia-cuda-nvcc-cu12`` ships (XLA also finds them in
  ``/usr/local/cuda``). The plugin's normal start-up needs a driver, so its PJRT C API is
  taken from JAX's own plugin discovery when that registered it, and loaded directly from the
  ``.so`` otherwise (with ``JAX_PLATFORMS`` unset, discovery gives up on the missing driver).
  Run with ``JAX_PLATFORMS=cpu`` to keep JAX from trying to start the CUDA backend at all.

TPU and GPU compile-only devices coexist in one process (both plugins loaded, a program
compiled for each, and CPU still runs; checked by ``tests/test_aot.py``). Devices are built
once per target and process.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys

import jax

from jaxlora.targets.registry import Target, get_target

# The jax/jaxlib release the private APIs below were written for. Bump it only after
# tests/test_aot.py passes with the new release.
JAX_VERSION = "0.10.2"

TPU_INSTALL = "pip install 'libtpu==0.0.42.*'  (or: pip install 'jax[tpu]==0.10.2')"
GPU_INSTALL = "pip install jax-cuda12-pjrt==0.10.2 nvidia-cuda-nvcc-cu12"


def add_side_directory() -> str | None:
    """Put a side directory of compile packages on ``sys.path`` (``$JAXLORA_AOT_TOOLCHAIN``,
    else ``.aot-toolchain/`` in the current directory, where ``.ci/run`` installs the ``aot``
    extra with ``pip install --target``), so a process that compiles for targets finds libtpu
    and the CUDA plugin while the project's venv stays free of them. Returns the directory."""
    path = os.environ.get("JAXLORA_AOT_TOOLCHAIN") or os.path.abspath(".aot-toolchain")
    if not os.path.isdir(path):
        return None
    if path not in sys.path:
        sys.path.insert(0, path)
        importlib.invalidate_caches()
    return path


class ToolchainError(RuntimeError):
    """A compile toolchain is missing, or JAX changed under the private APIs used here."""


def _private_apis() -> dict[str, bool]:
    """Each experimental/private name used by this module -> whether this JAX has it."""
    from jax._src import xla_bridge as xb
    from jax._src.lib import xla_client
    from jax.experimental import topologies

    return {
        "jax.experimental.topologies.get_topology_desc": hasattr(topologies, "get_topology_desc"),
        "jax._src.xla_bridge._discover_and_register_pjrt_plugins": hasattr(
            xb, "_discover_and_register_pjrt_plugins"
        ),
        "jax._src.xla_bridge._backend_factories": hasattr(xb, "_backend_factories"),
        "xla_client.load_pjrt_plugin_dynamically": hasattr(
            xla_client, "load_pjrt_plugin_dynamically"
        ),
        "xla_client.make_c_api_device_topology": hasattr(xla_client, "make_c_api_device_topology"),
        "xla_client.pjrt_plugin_loaded": hasattr(xla_client, "pjrt_plugin_loaded"),
        "DeviceTopology._make_compile_only_devices": hasattr(
            getattr(xla_client, "DeviceTopology", object), "_make_compile_only_devices"
        ),
    }


def check_jax_version() -> None:
    """Raise :class:`ToolchainError` unless jax and jaxlib are ``JAX_VERSION``, naming the
    private APIs this module uses that the installed JAX lacks."""
    import jaxlib

    got = {"jax": jax.__version__, "jaxlib": jaxlib.__version__}
    changed = {k: v for k, v in got.items() if v != JAX_VERSION}
    if not changed:
        return
    missing = [name for name, ok in _private_apis().items() if not ok]
    what = ", ".join(f"{k} {v}" for k, v in changed.items())
    detail = (
        f"missing from this JAX: {', '.join(missing)}"
        if missing
        else "every private API it calls is still present, but their behaviour is unchecked"
    )
    raise ToolchainError(
        f"jaxlora.targets.toolchain was written for jax/jaxlib {JAX_VERSION}; installed: "
        f"{what}. {detail}. Re-run tests/test_aot.py with this JAX and update JAX_VERSION, or "
        f"install jax==jaxlib=={JAX_VERSION}."
    )


def compile_devices(target: Target | str) -> list[jax.Device]:
    """The compile-only devices of ``target`` (a :class:`Target` or a registered name), in
    topology order; ``len == target.num_devices``. Built once per target and process."""
    return list(_compile_devices(target if isinstance(target, str) else target.name))


@functools.cache
def _compile_devices(name: str) -> tuple[jax.Device, ...]:
    target = get_target(name)
    check_jax_version()
    if target.platform == "tpu":
        devices = _tpu_devices(target)
    elif target.platform == "gpu":
        devices = _gpu_devices(target)
    else:
        raise ValueError(f"target {name!r}: no compile-only devices for {target.platform!r}")
    kinds = {d.device_kind for d in devices}
    if len(devices) != target.num_devices or kinds != {target.device_kind}:
        raise ToolchainError(
            f"target {name!r} wants {target.num_devices} x {target.device_kind!r}, the "
            f"toolchain gave {len(devices)} x {sorted(kinds)} for topology {target.topology!r}"
        )
    return tuple(devices)


def _tpu_devices(target: Target) -> list[jax.Device]:
    if importlib.util.find_spec("libtpu") is None:
        raise ToolchainError(f"compiling for {target.name} needs libtpu: {TPU_INSTALL}")
    from jax.experimental import topologies

    # libtpu takes /tmp/libtpu_lockfile so that two processes never drive one TPU; compiling
    # drives none, and without this a second compiling process (pytest -n 2, a colleague's
    # run) fails with "Internal error when accessing libtpu multi-process lockfile".
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs = {}
    if target.chips_per_host_bounds is not None:
        kwargs["chips_per_host_bounds"] = list(target.chips_per_host_bounds)
    topo = topologies.get_topology_desc(topology_name=target.topology, platform="tpu", **kwargs)
    return list(topo.devices)


def _find(name: str):
    """``importlib.util.find_spec``, with a missing parent package (no ``jax_plugins`` at all)
    meaning "not installed" instead of an error."""
    try:
        return importlib.util.find_spec(name)
    except ModuleNotFoundError:
        return None


def _cuda_plugin_path() -> str:
    spec = _find("jax_plugins.xla_cuda12")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "xla_cuda_plugin.so")
    if path is None or not os.path.exists(path):
        raise ToolchainError(f"compiling for GPU targets needs the CUDA PJRT plugin: {GPU_INSTALL}")
    return path


@functools.cache
def _cuda_c_api():
    """The CUDA plugin's PJRT C API, loaded at most once per process."""
    from jax._src import xla_bridge as xb
    from jax._src.lib import xla_client

    # JAX's own discovery first, so it never loads the plugin a second time after us.
    xb._discover_and_register_pjrt_plugins()
    factory = xb._backend_factories.get("cuda")
    if factory is not None and factory.c_api is not None:
        return factory.c_api
    if xla_client.pjrt_plugin_loaded("cuda"):
        raise ToolchainError("the CUDA PJRT plugin is loaded but JAX registered no C API for it")
    return xla_client.load_pjrt_plugin_dynamically("cuda", _cuda_plugin_path())


def _gpu_devices(target: Target) -> list[jax.Device]:
    from jax._src.lib import xla_client

    _cuda_plugin_path()  # a clear error before anything is loaded
    topo = xla_client.make_c_api_device_topology(
        _cuda_c_api(), "", target_config=target.gpu_config_text(), topology=target.topology
    )
    devices = list(topo._make_compile_only_devices())
    _check_gpu_compiler(devices[0])
    return devices


def _check_gpu_compiler(device: jax.Device) -> None:
    """Compile a tiny dot + tanh, which needs both ptxas and libdevice, and name the package
    that provides them when XLA cannot find them."""
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    a = jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=SingleDeviceSharding(device))
    try:
        jax.jit(lambda a: jnp.tanh(a @ a)).lower(a).compile()
    except Exception as e:  # XLA raises JaxRuntimeError; the message says what is missing
        msg = str(e)
        if "libdevice" in msg or "PTX compilation provider" in msg or "ptxas" in msg:
            raise ToolchainError(
                f"the CUDA plugin cannot compile for {device.device_kind}: ptxas / libdevice "
                f"not found ({msg.splitlines()[0][:200]}). Install them: {GPU_INSTALL}"
            ) from e
        raise


def missing_toolchains() -> dict[str, str]:
    """Platform -> install command, for each platform whose compile package is not installed
    (a present CUDA plugin without ptxas/libdevice shows up in :func:`compile_devices`)."""
    have = {
        "tpu": importlib.util.find_spec("libtpu") is not None,
        "gpu": _find("jax_plugins.xla_cuda12") is not None,
    }
    return {p: hint for p, hint in (("tpu", TPU_INSTALL), ("gpu", GPU_INSTALL)) if not have[p]}
