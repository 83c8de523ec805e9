"""Compile attention forward and backward for a TPU or GPU target from a machine without one
and print what the compiler reports (temporary bytes), per implementation and length.

    python tools/attention_compile.py                                  # h100-1, S 2048 and 8192
    python tools/attention_compile.py --target l4-1 --seqs 4096 --window 4096
    python tools/attention_compile.py --target tpu-v5e-1 --seqs 2048 8192 32768

Compiles with jaxlora's toolchain (``jaxlora.targets``: libtpu, and the CUDA PJRT plugin and
ptxas, from the ``aot`` extra, in the venv or in ``.aot-toolchain/``) for one device of the
target. Shapes: Llama-3-8B attention (32 query heads, 8 kv heads, head_dim 128, bf16, batch 1).
Implementations by default: the target platform's (TPU: eager, splash, chunked; GPU: cudnn,
pallas_gpu, chunked, eager). The cuDNN path also needs cuDNN itself (JAX checks its version
while tracing), which the toolchain does not carry: without it that row prints JAX's error. A
compile that does not fit prints the compiler's message. The whole train step, for a target:
``python -m jaxlora.plan``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

GiB = 2**30
IMPLS = {"tpu": ["eager", "splash", "chunked"], "gpu": ["cudnn", "pallas_gpu", "chunked", "eager"]}


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
    from jaxlora import targets
    from jaxlora.targets.toolchain import add_side_directory

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--impls", nargs="+", default=None, help="default: the platform's")
    p.add_argument("--seqs", nargs="+", type=int, default=[2048, 8192])
    p.add_argument("--window", type=int, default=None, help="sliding window")
    p.add_argument("--target", default="h100-1", choices=sorted(targets.TARGETS))
    args = p.parse_args(argv)
    impls = args.impls or IMPLS[targets.get_target(args.target).platform]

    from jax.sharding import SingleDeviceSharding

    add_side_directory()
    device = targets.compile_devices(targets.get_target(args.target))[0]
    sharding = SingleDeviceSharding(device)
    window = "" if args.window is None else f", window {args.window}"
    print(f"target: {args.target} ({device.device_kind}), attention fwd+bwd{window}")
    for impl in impls:
        for seq in args.seqs:
            try:
                temp = compile_temp(impl, seq, args.window, sharding)
                print(f"{impl:>10} S={seq:>6}: compiled, temp {temp / GiB:8.3f} GiB", flush=True)
            except Exception as e:  # a path that does not compile is a result here
                msg = str(e).replace("\n", " ")[:300]
                print(f"{impl:>10} S={seq:>6}: FAILED {type(e).__name__}: {msg}", flush=True)


if __name__ == "__main__":
    main()
