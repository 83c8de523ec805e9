"""Named hardware targets that jaxlora compiles for without the hardware.

A :class:`Target` says which compile-only devices stand in for the real ones (a libtpu
topology, or the CUDA plugin plus a ``GpuTargetConfigProto`` in ``gpu/*.pbtxt``), how much
memory each device has, and which NF4 matmul runs there. ``num_devices`` and
``memory_bytes`` describe the *compile* devices, which are what a memory plan is made for.

Memory per device (vendor specifications):

* TPU (Google Cloud TPU system architecture pages): v5e 16 GiB HBM2e per chip, v4 32 GiB
  HBM2 per chip, v5p 95 GiB HBM2e per chip, v6e (Trillium) 32 GiB HBM per chip. The numbers
  are the vendor's; the compiler reserves a little (libtpu 0.0.42 reports 15.75 / 15.25 /
  95.74 / 31.25 GiB available on v5e / v4 core / v5p / v6e).
* v4 is the exception to "one device = one chip": libtpu's compile-only ``v4`` topology has
  one device per TensorCore (2 per chip, 16 GiB each; ``core_on_chip`` 0 and 1), while JAX on
  a real v4 VM shows one megacore device per chip with 32 GiB. A plan for ``tpu-v4-8`` is
  therefore made for 8 half-chip devices. v5p's topology is megacore (one device per chip).
* GPU: the bytes the CUDA driver reports as total device memory (``device_memory_size`` in
  the target config; NVIDIA's "80 GB" H100 reports 84,942,979,072 B). ``memory_spec`` keeps
  the vendor's wording.

NF4 kernels (measured with jax/jaxlib 0.10.2 by ``tests/test_aot.py``): TPU runs the
Pallas Mosaic kernels (``nf4_tpu``). GPU runs the Pallas Triton kernels (``nf4_triton``)
where XLA accepts Triton: compute capability 8.0 and up; for sm_75 (T4) XLA refuses with
"Triton support is only enabled for Ampere GPUs (compute capability 8.0) and up", so T4 gets
the dequantize-then-dot path. (Pallas' Mosaic GPU lowering needs sm_90a or newer and is not
used by jaxlora.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

GiB = 2**30

# The NF4 matmul implementations, by the name the sharded matmul takes (nf4_sharded.KERNELS).
MOSAIC, TRITON, DEQUANT = "mosaic", "triton", "dequant"
# XLA 0.10.2 compiles Triton custom calls only from Ampere (sm_80) on.
TRITON_MIN_COMPUTE_CAPABILITY = (8, 0)

_GPU_CONFIG_DIR = Path(__file__).parent / "gpu"


@dataclass(frozen=True)
class Target:
    """One named compile target.

    ``topology``: TPU topology name (``"v5e:2x4"``) or the CUDA plugin's topology string
    (``"1x1x8"``: 1 slice, 1 host, 8 devices). ``chips_per_host_bounds`` is passed to libtpu
    for topologies smaller than its default host (single-chip v5e / v6e). ``gpu_config`` is
    the file name of the ``GpuTargetConfigProto`` under ``jaxlora/targets/gpu/``.
    """

    name: str
    platform: str  # "tpu" | "gpu"
    device_kind: str  # what the compile-only devices report as ``device_kind``
    num_devices: int
    memory_bytes: int  # per device
    memory_spec: str  # the vendor's wording, per chip
    topology: str
    chips_per_host_bounds: tuple[int, int, int] | None = None
    gpu_config: str | None = None
    compute_capability: tuple[int, int] | None = None

    @property
    def nf4_kernel(self) -> str:
        """``"mosaic"`` (TPU), ``"triton"`` (GPU, sm_80+) or ``"dequant"`` (T4 and others)."""
        return nf4_kernel_for(self.platform, self.compute_capability)

    @property
    def pallas_kernels(self) -> bool:
        """Whether jaxlora's Pallas kernels compile for this target."""
        return self.nf4_kernel != DEQUANT

    @property
    def nf4_kernel_reason(self) -> str:
        """Why this NF4 path, for logs and ``plan`` output."""
        if self.nf4_kernel == MOSAIC:
            return "Pallas Mosaic kernels (TPU)"
        if self.nf4_kernel == TRITON:
            return f"Pallas Triton kernels (sm_{''.join(map(str, self.compute_capability))})"
        cc = self.compute_capability
        return (
            f"dequantize-then-dot: XLA compiles Triton only for compute capability "
            f"{TRITON_MIN_COMPUTE_CAPABILITY[0]}.{TRITON_MIN_COMPUTE_CAPABILITY[1]}+, "
            f"this target has {cc[0]}.{cc[1]}"
            if cc
            else f"dequantize-then-dot: no Pallas kernel for platform {self.platform!r}"
        )

    def gpu_config_text(self) -> str:
        """The ``GpuTargetConfigProto`` text for a GPU target."""
        if self.gpu_config is None:
            raise ValueError(f"target {self.name!r} ({self.platform}) has no GPU target config")
        return (_GPU_CONFIG_DIR / self.gpu_config).read_text()


def nf4_kernel_for(platform: str, compute_capability: tuple[int, int] | None = None) -> str:
    """The NF4 matmul for a device platform (``Device.platform``: "tpu", "gpu", "cpu")."""
    if platform == "tpu":
        return MOSAIC
    if platform in ("gpu", "cuda"):
        if compute_capability is None or compute_capability >= TRITON_MIN_COMPUTE_CAPABILITY:
            return TRITON
        return DEQUANT
    return DEQUANT


def _tpu(name, kind, n, gib, spec, topology, bounds=None) -> Target:
    return Target(name, "tpu", kind, n, gib * GiB, spec, topology, chips_per_host_bounds=bounds)


# Vendor wording of each GPU config's memory; everything else is read from the config file.
_GPU_MEMORY_SPEC = {
    "h100-sxm-80g.pbtxt": "80 GB HBM3",
    "h200-sxm-141g.pbtxt": "141 GB HBM3e",
    "a100-sxm-40g.pbtxt": "40 GB HBM2",
    "a100-sxm-80g.pbtxt": "80 GB HBM2e",
    "l4.pbtxt": "24 GB GDDR6",
    "rtx4090.pbtxt": "24 GB GDDR6X",
    "t4.pbtxt": "16 GB GDDR6",
}


def gpu_config_fields(text: str) -> dict:
    """``device_description_str``, ``device_memory_size`` and the compute capability of a
    ``GpuTargetConfigProto`` text (the fields the registry shows; XLA parses the rest)."""

    def field(pattern: str) -> str:
        m = re.search(pattern, text)
        if m is None:
            raise ValueError(f"GPU target config has no match for {pattern!r}")
        return m.group(1)

    cc = re.search(r"cuda_compute_capability\s*{\s*major:\s*(\d+)\s+minor:\s*(\d+)", text)
    if cc is None:
        raise ValueError("GPU target config has no cuda_compute_capability { major minor }")
    return {
        "device_kind": field(r'device_description_str:\s*"([^"]+)"'),
        "memory_bytes": int(field(r"device_memory_size:\s*(\d+)")),
        "compute_capability": (int(cc.group(1)), int(cc.group(2))),
    }


def _gpu(name: str, config: str, n: int) -> Target:
    f = gpu_config_fields((_GPU_CONFIG_DIR / config).read_text())
    return Target(
        name,
        "gpu",
        f["device_kind"],
        n,
        f["memory_bytes"],
        _GPU_MEMORY_SPEC[config],
        f"1x1x{n}",
        gpu_config=config,
        compute_capability=f["compute_capability"],
    )


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        _tpu("tpu-v5e-1", "TPU v5 lite", 1, 16, "16 GiB HBM2e", "v5e:1x1", (1, 1, 1)),
        _tpu("tpu-v5e-8", "TPU v5 lite", 8, 16, "16 GiB HBM2e", "v5e:2x4"),
        _tpu("tpu-v4-8", "TPU v4", 8, 16, "32 GiB HBM2 (2 TensorCores)", "v4:2x2x1"),
        _tpu("tpu-v5p-8", "TPU v5", 4, 95, "95 GiB HBM2e", "v5p:2x2x1"),
        _tpu("tpu-v6e-1", "TPU v6 lite", 1, 32, "32 GiB HBM", "v6e:1x1", (1, 1, 1)),
        _tpu("tpu-v6e-8", "TPU v6 lite", 8, 32, "32 GiB HBM", "v6e:2x4"),
        _gpu("h100-1", "h100-sxm-80g.pbtxt", 1),
        _gpu("h100-8", "h100-sxm-80g.pbtxt", 8),
        _gpu("h200-1", "h200-sxm-141g.pbtxt", 1),
        _gpu("a100-40g-1", "a100-sxm-40g.pbtxt", 1),
        _gpu("a100-80g-1", "a100-sxm-80g.pbtxt", 1),
        _gpu("l4-1", "l4.pbtxt", 1),
        _gpu("rtx4090-1", "rtx4090.pbtxt", 1),
        _gpu("t4-1", "t4.pbtxt", 1),
    )
}


def get_target(name: str) -> Target:
    """The registered target ``name``; unknown names list the known ones."""
    try:
        return TARGETS[name]
    except KeyError:
        raise KeyError(f"unknown target {name!r}; known: {', '.join(TARGETS)}") from None
