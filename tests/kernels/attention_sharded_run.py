"""Flash attention kernels under ``shard_map`` on 8 fake CPU devices against eager attention on
one; prints JSON. Run in its own process (the device count is fixed at JAX start-up)::

    python tests/kernels/attention_sharded_run.py --out r.json

Each case (mesh, kernel, layout, segments, window) runs ``jaxlora.models.attention.attention``
with an ``AttentionImpl`` on the mesh, float32, the Pallas kernels in interpret mode (cuDNN's
adaptor through ``jax.nn``'s XLA implementation: cuDNN needs a GPU), and records the largest
difference from unsharded eager attention, relative to eager's largest entry: the output at
real tokens, the largest output at padding rows (flash kernels give 0 there), and dq, dk, dv
of a loss that masks padding; plus how the heads were split and how the output lies.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
args = parser.parse_args()

os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tests.processes import with_host_devices  # noqa: E402

os.environ["XLA_FLAGS"] = with_host_devices(8)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

from jaxlora.kernels import attention_sharded  # noqa: E402
from jaxlora.kernels.attention_gpu import cudnn_attention  # noqa: E402
from jaxlora.models.attention import AttentionImpl, attention  # noqa: E402

MESHES = {"fsdp8": (1, 8, 1), "data2_fsdp2_tensor2": (2, 2, 2)}
ROWS = ("data", "fsdp")
CASES = [  # (mesh, impl, B, KV, G, S, D, segments, window)
    ("fsdp8", "splash", 8, 2, 2, 19, 8, "packed", None),
    ("data2_fsdp2_tensor2", "splash", 4, 2, 3, 23, 8, "packed+padded", 5),  # kv heads split
    ("data2_fsdp2_tensor2", "splash", 4, 1, 4, 13, 8, "packed", 4),  # MQA: query groups split
    ("data2_fsdp2_tensor2", "pallas_gpu", 4, 2, 2, 17, 16, "packed+padded", None),
    ("fsdp8", "pallas_gpu", 8, 1, 2, 11, 8, "packed", None),
    ("data2_fsdp2_tensor2", "cudnn", 4, 2, 2, 19, 8, "padded", 3),  # one sequence a row
]


def operands(B, KV, G, S, D, segments, seed=0):
    """Random q, k, v; a cotangent that is 0 on padding rows; segment ids (0 = padding)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, KV, G, S, D), np.float32)
    k = rng.standard_normal((B, KV, S, D), np.float32)
    v = rng.standard_normal((B, KV, S, D), np.float32)
    seg = np.ones((B, S), np.int32)
    for b in range(B):  # a different split in each row
        if "packed" in segments:
            seg[b, (b % 3 + 1) * S // 5 :] = 2
            seg[b, (b % 2 + 3) * S // 5 :] = 3
        if "padded" in segments:
            seg[b, S - 1 - b % 4 :] = 0
    do = rng.standard_normal(q.shape, np.float32) * (seg != 0)[:, None, None, :, None]
    return q, k, v, do, seg


def rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1.0))


def run_case(mesh_name, impl, B, KV, G, S, D, segments, window) -> dict:
    mesh = jax.make_mesh(MESHES[mesh_name], ("data", "fsdp", "tensor"), (AxisType.Auto,) * 3)
    am = attention_sharded.AttentionMesh(mesh, ROWS, "tensor")
    q, k, v, do, seg = operands(B, KV, G, S, D, segments)
    scale = D**-0.5

    def sharded(q, k, v):
        if impl == "cudnn":  # the sharded path with cuDNN's adaptor, run by XLA on CPU
            kernel = functools.partial(
                cudnn_attention, scale=scale, sliding_window=window, implementation="xla"
            )
            return attention_sharded.sharded(kernel, q, k, v, jnp.asarray(seg), am)
        return attention(
            q,
            k,
            v,
            segment_ids=jnp.asarray(seg),
            scale=scale,
            sliding_window=window,
            impl=AttentionImpl(impl, interpret=True, mesh=am),
        )

    def eager(q, k, v):
        return attention(
            q, k, v, segment_ids=jnp.asarray(seg), scale=scale, sliding_window=window, impl="eager"
        )

    def fwd_bwd(fn):
        out, pull = jax.vjp(fn, q, k, v)
        return out, pull(do)

    out, grads = jax.jit(lambda: fwd_bwd(sharded))()
    ref, ref_grads = jax.jit(lambda: fwd_bwd(eager))()
    real = (seg != 0)[:, None, None, :, None]
    return {
        "case": f"{mesh_name}/{impl}/B{B}_KV{KV}_G{G}_S{S}_D{D}/{segments}/window{window}",
        "heads": attention_sharded.layout(am, B, KV, G).heads,
        "out_spec": str(out.sharding.spec),
        "out_err": rel(np.where(real, out, 0), np.where(real, ref, 0)),
        "padding_max": float(np.max(np.abs(np.where(real, 0, out)))),
        "grad_err": max(rel(a, b) for a, b in zip(grads, ref_grads, strict=True)),
    }


def main():
    results = [run_case(*case) for case in CASES]
    with open(args.out, "w") as fh:
        json.dump({"devices": jax.device_count(), "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
