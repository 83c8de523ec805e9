"""Compile the GPU attention paths for an H100 from a machine without a GPU and print what the
compiler reports (temporary bytes), forward and backward.

    python tools/attention_gpu_compile.py                     # S = 2048 and 8192
    python tools/attention_gpu_compile.py --seqs 4096 --target /path/to/gpu_target.pbtxt

Needs ``jax[cuda12]`` (the CUDA PJRT plugin) in the venv and a ``GpuTargetConfigProto`` text file
(``--target``; default: ``$JAXLORA_GPU_TARGET``). The plugin's normal start-up needs a driver,
so it is loaded directly with the target config, as in JAX's own compile-only tests. Shapes:
Llama-3-8B attention (32 query heads, 8 kv heads, head_dim 128, bf16, batch 1).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

GiB = 2**30


def h100_device(target: Path):
    from jax._src.lib import xla_client
    from jax.experimental import topologies

    plugin = os.path.join("jax_plugins", "xla_cuda12", "xla_cuda_plugin.so")
    pattern = os.path.join(sys.prefix, "lib", "python3*", "site-packages", plugin)
    c_api = xla_client.load_pjrt_plugin_dynamically("cuda", glob.glob(pattern)[0])
    topo = xla_client.make_c_api_device_topology(
        c_api, "", target_config=target.read_text(), topology="1x1x1"
    )
    return topologies.TopologyDescription(topo._make_compile_only_devices()).devices[0]


def compile_temp(impl: str, seq: int, window: int | None, sharding) -> int:
    import jax
    import jax.numpy as jnp

    from jaxlora.models.attention import attention

    B, KV, G, D = 1, 8, 4, 128

    def fwd_bwd(q, k, v, seg, do):
        fn = lambda q, k, v: attention(
            q, k, v, segment_ids=seg, scale=D**-0.5, sliding_window=window, impl=impl
        )
        out, pull = jax.vjp(fn, q, k, v)
        return out, pull(do)

    sds = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    q, kv = sds((B, KV, G, seq, D)), sds((B, KV, seq, D))
    compiled = jax.jit(fwd_bwd).lower(q, kv, kv, sds((B, seq), jnp.int32), q).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--impls", nargs="+", default=["cudnn", "pallas_gpu", "chunked", "eager"])
    p.add_argument("--seqs", nargs="+", type=int, default=[2048, 8192])
    p.add_argument("--window", type=int, default=None, help="sliding window (cudnn, chunked)")
    p.add_argument("--target", type=Path, default=os.environ.get("JAXLORA_GPU_TARGET"))
    args = p.parse_args(argv)
    if args.target is None:
        p.error("--target (a GpuTargetConfigProto text file) is required")

    from jax.sharding import SingleDeviceSharding

    device = h100_device(args.target)
    sharding = SingleDeviceSharding(device)
    print(f"target: {device.device_kind} ({args.target.name}), attention fwd+bwd")
    for impl in args.impls:
        for seq in args.seqs:
            try:
                temp = compile_temp(impl, seq, args.window, sharding)
                print(f"{impl:>10} S={seq:>6}: compiled, temp {temp / GiB:8.3f} GiB", flush=True)
            except Exception as e:  # a path that does not compile is a result here
                msg = str(e).replace("\n", " ")[:300]
                print(f"{impl:>10} S={seq:>6}: FAILED {type(e).__name__}: {msg}", flush=True)


if __name__ == "__main__":
    main()
