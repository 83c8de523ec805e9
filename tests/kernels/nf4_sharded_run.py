"""The sharded NF4 matmul on 8 fake CPU devices against the unsharded reference; prints JSON.

Run in its own process (the device count is fixed at JAX start-up)::

    python tests/kernels/nf4_sharded_run.py --kernel triton --out r.json

For each mesh (fsdp=8; data2×fsdp2×tensor2; fsdp4×tensor2) and each weight layout
(column parallel: W spec ("tensor", "fsdp"), x rows over (data, fsdp); row parallel: W spec
("fsdp", "tensor"), x's K over tensor), in float32 with the Pallas kernels in interpret mode,
it records the largest |y - y_ref| and |dx - dx_ref| relative to the reference's largest
entry, the output shardings, and the element types of the all-gathers in the compiled HLO.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--kernel", required=True, choices=["mosaic", "triton", "dequant"])
parser.add_argument("--out", required=True)
args = parser.parse_args()

os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tests.processes import with_host_devices  # noqa: E402

os.environ["XLA_FLAGS"] = with_host_devices(8)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxlora.kernels import nf4_matmul, nf4_sharded  # noqa: E402
from jaxlora.targets import hlo  # noqa: E402
from jaxlora.weights.nf4 import DQ_TABLE  # noqa: E402

MESHES = {"fsdp8": (1, 8, 1), "data2_fsdp2_tensor2": (2, 2, 2), "fsdp4_tensor2": (1, 4, 2)}
ROWS = ("data", "fsdp")
LAYOUTS = {  # name -> (x spec [M, K], weight spec [N, K/2] and [N, K/bs])
    "column": (P(ROWS, None), P("tensor", "fsdp")),
    "row": (P(ROWS, "tensor"), P("fsdp", "tensor")),
}
# M = 8·3 rows; N = 8·5 (splits over fsdp 8 and over tensor); K = 8 blocks of 64. Nested
# blocks of 24 absmax entries (bnb uses 256) start mid-row and mid-shard, so a device that
# indexed its absmax codes' nested scales from its shard and not the whole weight would show.
M, N, K, BS, NBS = 24, 40, 512, 64, 24


def operands():
    rng = np.random.default_rng(0)
    code = tuple(float(c) for c in np.sort(rng.uniform(-1, 1, 16)))  # any 16-value table
    codes = jnp.asarray(rng.integers(0, 256, (N, K // 2)), jnp.uint8)
    absmax = jnp.asarray(rng.uniform(0.5, 2.0, (N, K // BS)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((M, N)), jnp.float32)
    nested = (
        jnp.asarray(rng.uniform(0.5, 2.0, (N * K // BS + NBS - 1) // NBS), jnp.float32),
        jnp.float32(0.25),
        DQ_TABLE,
        NBS,
    )
    dq_codes = jnp.asarray(rng.integers(0, 256, (N, K // BS)), jnp.uint8)
    return code, codes, absmax, x, dy, nested, dq_codes


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def main():
    code, codes, absmax_f32, x, dy, nested, dq_codes = operands()
    dq_absmax = nf4_matmul.dequantize_absmax(
        dq_codes, nested[0], nested[1], table=nested[2], nested_blocksize=nested[3]
    )
    absmaxes = {"f32": (absmax_f32, None, absmax_f32), "dq": (dq_codes, nested, dq_absmax)}
    results = {}
    for mesh_name, sizes in MESHES.items():
        mesh = jax.make_mesh(sizes, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
        for (layout, (x_spec, w_spec)), (aname, (absmax, dq, whole)) in itertools.product(
            LAYOUTS.items(), absmaxes.items()
        ):
            y_ref = nf4_matmul.reference_forward(x, codes, whole, code=code, blocksize=BS)
            dx_ref = nf4_matmul.reference_input_grad(dy, codes, whole, code=code, blocksize=BS)

            def f(x, codes, absmax, dy, x_spec=x_spec, w_spec=w_spec, mesh=mesh, dq=dq):
                def mm(x):
                    return nf4_sharded.nf4_matmul_sharded(
                        x,
                        codes,
                        absmax,
                        nested=dq,
                        mesh=mesh,
                        x_spec=x_spec,
                        w_spec=w_spec,
                        code=code,
                        blocksize=BS,
                        kernel=args.kernel,
                        interpret=True,
                    )

                y, vjp = jax.vjp(mm, x)
                return y, vjp(dy)[0]

            def put(a, spec, mesh=mesh):
                return jax.device_put(a, NamedSharding(mesh, spec))

            ins = (put(x, x_spec), put(codes, w_spec), put(absmax, w_spec), put(dy, P(ROWS)))
            compiled = jax.jit(f).lower(*ins).compile()
            y, dx = compiled(*ins)
            gathers = hlo.collectives(compiled.as_text(), "all-gather")
            results[f"{mesh_name}/{layout}/{aname}"] = r = {
                "y_err": rel_err(y, y_ref),
                "dx_err": rel_err(dx, dx_ref),
                "y_spec": str(y.sharding.spec),
                "dx_spec": str(dx.sharding.spec),
                "gather_dtypes": sorted({t for g in gathers for t in g.dtypes}),
            }
            if args.kernel == "mosaic":  # gathered and laid out once, multiplied twice
                p = nf4_sharded.plan(
                    mesh,
                    x_spec,
                    w_spec,
                    ((M, K), (N, K)),
                    code=code,
                    blocksize=BS,
                    kernel="mosaic",
                    interpret=True,
                    absmax_table=None if dq is None else dq[2],
                    nested_blocksize=None if dq is None else dq[3],
                )

                def g(x, codes, absmax, dy, p=p, dq=dq):
                    rest = dq[:2] if dq else (jnp.zeros((), jnp.float32),) * 2
                    staged = nf4_sharded.stage(p, codes, absmax, *rest)
                    mm = lambda x: nf4_sharded.nf4_matmul_staged(x, *staged, p)
                    (y, y2), vjp = jax.vjp(lambda x: (mm(x), mm(2 * x)), x)
                    return y, y2, vjp((dy, jnp.zeros_like(dy)))[0]

                y, y2, dx = jax.jit(g)(*ins)
                r["staged_y_err"] = rel_err(y, y_ref)
                r["staged_y2_err"] = rel_err(y2, 2 * y_ref)
                r["staged_dx_err"] = rel_err(dx, dx_ref)
                r["staged_specs"] = [str(y.sharding.spec), str(dx.sharding.spec)]
    with open(args.out, "w") as fh:
        json.dump({"devices": jax.device_count(), "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
