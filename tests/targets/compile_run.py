"""Compile a small stack of sharded NF4 matmuls, forward and backward, for TPU or GPU targets
without the device; print what the compiler says as JSON.

Run in its own process, one platform per process::

    JAX_PLATFORMS=cpu python tests/targets/compile_run.py --platform tpu --out tpu.json
    python tests/targets/compile_run.py --platform gpu --mode targets --out gpu_targets.json
    python tests/targets/compile_run.py --mode both --out both.json

The function: ``LAYERS`` residual MLP blocks ``x + down(silu(up(x)))`` with NF4 ``up``
(column parallel, ``W [F, D]`` on ``("tensor", "fsdp")``) and ``down`` (row parallel,
``W [D, F]`` on ``("fsdp", "tensor")``), double-quantized as QLoRA's are (8-bit absmax codes
split like the weight, the nested scales and offset replicated), ``x [M, D]`` bf16 with rows
over ``(data, fsdp)``, and the gradient of a scalar loss in ``x``. It is compiled for one chip and for 8 (meshes
fsdp=8 and data2×fsdp2×tensor2), and for each compile the script records: compile seconds,
the custom-call targets, the all-gathers (element types, per-device bytes), per-device
FLOPs (XLA's cost analysis on TPU, where the Mosaic kernels carry a cost estimate; compile-only
GPU executables have none; and on both, the NF4 kernel calls' and all matmuls' counted from
the HLO by :mod:`jaxlora.targets.flops`), and memory analysis. ``--mode targets`` compiles one
NF4 matmul for every registered target of the platform; ``--mode both`` compiles the stack for
one TPU chip and one GPU in the same process (the coexistence check).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxlora import targets  # noqa: E402
from jaxlora.kernels import attention_gpu, nf4_sharded  # noqa: E402
from jaxlora.targets import flops, hlo  # noqa: E402
from jaxlora.weights.nf4 import DQ_TABLE  # noqa: E402

LAYERS, M, D, F, BS, NBS = 2, 256, 512, 1024, 64, 256
ROWS = ("data", "fsdp")
UP = (P(ROWS, None), P("tensor", "fsdp"))  # x spec, W spec (column parallel)
DOWN = (P(ROWS, "tensor"), P("fsdp", "tensor"))  # row parallel
CODE = tuple(float(c) for c in np.linspace(-1.0, 1.0, 16))
TARGETS = {"tpu": ("tpu-v5e-1", "tpu-v5e-8"), "gpu": ("h100-1", "h100-8")}
MESHES = {"fsdp8": (1, 8, 1), "data2_fsdp2_tensor2": (2, 2, 2)}


def make_loss(mesh, kernel: str):
    """``loss(x, weights)``: the MLP stack and a scalar; weights is a list of
    ``((up_codes, up_absmax, up_nested), (down_codes, down_absmax, down_nested))``, absmax the
    uint8 codes of a double-quantized absmax, nested ``(nested_absmax, offset)``."""

    def mm(x, w, specs):
        c, a, (nested, offset) = w
        return nf4_sharded.nf4_matmul_sharded(
            x,
            c,
            a,
            nested=(nested, offset, DQ_TABLE, NBS),
            mesh=mesh,
            x_spec=specs[0],
            w_spec=specs[1],
            code=CODE,
            blocksize=BS,
            kernel=kernel,
        )

    def loss(x, weights):
        for up, down in weights:
            h = jax.nn.silu(mm(x, up, UP))  # [M, F], F split over tensor
            x = x + mm(h, down, DOWN)  # [M, D]
        return jnp.mean(jnp.square(x.astype(jnp.float32)))

    return loss


def abstract_args(mesh):
    def s(shape, dtype, spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    def weight(n, k, spec):
        nested = (s((n * k // BS // NBS,), jnp.float32, P()), s((), jnp.float32, P()))
        return s((n, k // 2), jnp.uint8, spec), s((n, k // BS), jnp.uint8, spec), nested

    x = s((M, D), jnp.bfloat16, P(ROWS, None))
    return x, [(weight(F, D, UP[1]), weight(D, F, DOWN[1])) for _ in range(LAYERS)]


def compile_once(target_name: str, mesh_sizes: tuple[int, int, int]) -> dict:
    target = targets.get_target(target_name)
    data, fsdp, tensor = mesh_sizes
    mesh = targets.compile_mesh(target, data=data, fsdp=fsdp, tensor=tensor)
    step = jax.jit(jax.value_and_grad(make_loss(mesh, target.nf4_kernel)))
    t0 = time.perf_counter()
    lowered = step.lower(*abstract_args(mesh))
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    text = compiled.as_text()
    cost = compiled.cost_analysis()
    mem = compiled.memory_analysis()
    gathers = hlo.collectives(text, "all-gather")
    gathered: dict[str, int] = {}
    for g in gathers:
        for dtype, n in g.bytes_by_dtype().items():
            gathered[dtype] = gathered.get(dtype, 0) + n
    return {
        "target": target_name,
        "mesh": dict(mesh.shape),
        "kernel": target.nf4_kernel,
        "lower_s": round(t1 - t0, 2),
        "compile_s": round(t2 - t1, 2),
        "custom_calls": sorted(hlo.custom_call_targets(text)),
        "all_gathers": [{"dtypes": sorted(g.dtypes), "bytes": g.nbytes} for g in gathers],
        "gathered_bytes": gathered,  # per device and step, by element type
        "collective_ops": sorted({c.op for c in hlo.collectives(text)}),
        "cost_flops": None if cost is None else float(cost.get("flops", 0.0)),
        "hlo_flops": flops.flops_by_kind(text)["nf4"],
        "matmul_flops": flops.matmul_flops(text),
        "temp_bytes": mem.temp_size_in_bytes,  # HBM temporaries (TPU: small ones sit in VMEM)
        "peak_bytes": mem.peak_memory_in_bytes,
        "argument_bytes": mem.argument_size_in_bytes,
    }


def check_target(target_name: str) -> dict:
    """Every registered target: its devices, and one NF4 matmul forward + dx with the kernel
    the registry picks, on one device (rows 16, K 512, N 256). Where the registry falls back
    to dequantize-then-dot, also record XLA's refusal of the Triton kernel."""
    target = targets.get_target(target_name)
    t0 = time.perf_counter()
    devices = targets.compile_devices(target)
    mesh = Mesh(np.array(devices[:1], dtype=object).reshape(1, 1, 1), targets.MESH_AXES)

    def compile_with(kernel: str) -> str:
        def f(x, c, a):
            spec = P(None, None)
            return nf4_sharded.nf4_matmul_sharded(
                x,
                c,
                a,
                mesh=mesh,
                x_spec=spec,
                w_spec=spec,
                code=CODE,
                blocksize=BS,
                kernel=kernel,
            )

        def s(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))

        args = (s((16, 512), jnp.bfloat16), s((256, 256), jnp.uint8), s((256, 8), jnp.float32))
        grad = jax.grad(lambda x, c, a: f(x, c, a).astype(jnp.float32).sum())
        text = jax.jit(grad).lower(*args).compile().as_text()
        return ",".join(sorted(hlo.custom_call_targets(text))) or "none"

    out = {
        "target": target_name,
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "kernel": target.nf4_kernel,
        "custom_calls": compile_with(target.nf4_kernel),
    }
    if target.pallas_kernels and target.platform == "gpu":
        out["attention_tiles"] = {f"{d}/{h}": attention_tiles(mesh, d, h) for d, h in TILE_CASES}
    if target.platform == "gpu" and not target.pallas_kernels:
        try:
            compile_with("triton")
            out["triton_refused"] = None
        except Exception as e:  # XLA's refusal, recorded for the test to read
            out["triton_refused"] = str(e).splitlines()[0][:300]
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


# Pallas GPU attention at each row width of attention_gpu.TILE_ROWS: (dtype, head_dim)
TILE_CASES = (("bfloat16", 128), ("float32", 128), ("bfloat16", 256), ("float32", 256))


def attention_tiles(mesh, dtype: str, head_dim: int) -> str:
    """The Pallas GPU flash attention, forward and gradients, compiled on one device with the
    tile rows attention_gpu.tile_rows picks, with a sliding window and soft-capped scores (the
    kernels' widest form; the plain causal one is in the step plan_run.py compiles): ``"ok"``,
    or XLA's refusal (shared memory)."""
    b, kv, g, s = 1, 2, 2, 512
    sharding = NamedSharding(mesh, P())
    q, kv_shape = (b, kv, g, s, head_dim), (b, kv, s, head_dim)
    shapes = [(q, dtype), (kv_shape, dtype), (kv_shape, dtype), ((b, s), "int32")]
    args = [jax.ShapeDtypeStruct(sh, dt, sharding=sharding) for sh, dt in shapes]

    def loss(q, k, v, seg):
        out = attention_gpu.pallas_gpu_attention(
            q, k, v, seg, scale=head_dim**-0.5, sliding_window=s // 4, softcap=50.0
        )
        return out.astype(jnp.float32).sum()

    try:
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    except Exception as e:  # XLA's refusal, recorded for the test to read
        return str(e).splitlines()[0][:300]
    return "ok"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--platform", choices=sorted(TARGETS))
    parser.add_argument(
        "--mode",
        choices=["step", "targets", "both"],
        default="step",
        help="step: the sharded stack on 1 and 8 devices; targets: every "
        "registered target of the platform; both: one TPU and one GPU compile "
        "in this process (coexistence)",
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.mode != "both" and args.platform is None:
        parser.error(f"--mode {args.mode} needs --platform")
    t0 = time.perf_counter()
    if args.mode == "both":
        runs = [compile_once(TARGETS[p][0], (1, 1, 1)) for p in ("tpu", "gpu")]
    elif args.mode == "targets":
        names = [n for n, t in targets.TARGETS.items() if t.platform == args.platform]
        runs = [check_target(n) for n in names]
    else:
        one, eight = TARGETS[args.platform]
        runs = [compile_once(one, (1, 1, 1))]
        runs += [compile_once(eight, sizes) for sizes in MESHES.values()]
    out = {"runs": runs, "total_s": round(time.perf_counter() - t0, 2), "jax": jax.__version__}
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
