"""How attention memory grows with the length: compile for a TPU chip from this machine, print the
compiler's temporary bytes (``memory_analysis().temp_size_in_bytes``) per implementation.

    python tools/attention_memory.py                     # attention fwd+bwd, Llama-3-8B heads
    python tools/attention_memory.py --what step         # the whole LoRA train step, 8B model
    python tools/attention_memory.py --what step --layers 2 --impls splash --seqs 2048 8192

``attention``: one layer's attention core, forward and backward (dq, dk, dv from a cotangent),
at Llama-3-8B's attention shapes (32 query heads, 8 kv heads, head_dim 128, bf16).
``step``: ``jaxlora.step.make_train_step`` for Llama-3-8B (``--layers`` of them) with LoRA
(r 16, all-linear) over a bf16 base (``--base nf4``: QLoRA), remat per layer, one row of
``--seq`` tokens. A compile that does not fit prints the compiler's message, whose "required"
figure counts the arguments (the weights) too.
Nothing runs: it needs ``jax[tpu]`` (libtpu) to compile and no TPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

GiB = 2**30


def tpu_device(topology: str, accelerator: str):
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # another compile may hold libtpu
    from jax.experimental import topologies

    return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]


def attention_temp(impl: str, seq: int, sharding) -> int:
    import jax
    import jax.numpy as jnp

    from jaxlora.models.attention import attention

    B, KV, G, D = 1, 8, 4, 128

    def fwd_bwd(q, k, v, seg, do):
        fn = lambda q, k, v: attention(q, k, v, segment_ids=seg, scale=D**-0.5, impl=impl)
        out, pull = jax.vjp(fn, q, k, v)
        return out, pull(do)

    sds = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    q, kv = sds((B, KV, G, seq, D)), sds((B, KV, seq, D))
    compiled = jax.jit(fwd_bwd).lower(q, kv, kv, sds((B, seq), jnp.int32), q).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def step_temp(impl: str, seq: int, layers: int, remat: str, sharding, base: str = "bf16") -> int:
    import jax
    import jax.numpy as jnp
    import optax
    from jaxlora.nf4 import quantize
    from jaxlora.optim import make_optimizer
    from jaxlora.step import make_train_step

    from jaxlora.lora import LoraConfig, combine, inject, partition
    from jaxlora.models.config import LlamaConfig
    from jaxlora.models.llama import LlamaForCausalLM, init_params

    cfg = LlamaConfig(  # meta-llama/Meta-Llama-3-8B config.json
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
    )
    lora_cfg = LoraConfig(r=16, alpha=32, target_modules="all-linear")

    def init(key):
        params = init_params(cfg, key, jnp.bfloat16)
        if base == "nf4":  # QLoRA: every decoder projection NF4 + double quant, blocks of 64
            params = jax.tree_util.tree_map_with_path(
                lambda p, w: quantize(w) if w.ndim == 2 and "layers" in str(p) else w, params
            )
        return inject(params, lora_cfg, key)

    params = jax.eval_shape(init, jax.random.key(0))
    frozen, trainable = partition(params, lora_cfg)
    tx = make_optimizer(optax.constant_schedule(1e-4), weight_decay=0.0, max_grad_norm=1.0)
    opt_state = jax.eval_shape(tx.init, trainable)
    module = LlamaForCausalLM(cfg, jnp.bfloat16, jnp.bfloat16, remat=remat, attn_impl=impl)
    step = make_train_step(module, combine, tx, dropout=False)
    put = lambda tree: jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree
    )
    tok = jax.ShapeDtypeStruct((1, 1, seq), jnp.int32, sharding=sharding)
    batch = {k: tok for k in ("input_ids", "targets", "loss_mask", "segment_ids", "positions")}
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding)
    # jaxlora.lora picks its CPU-only fused LoRA matmul (which copies every base weight) from
    # jax.default_backend() at trace time; here that is this machine's CPU, not the target, so
    # it is shown the target's platform while tracing.
    with mock.patch.object(
        jax, "default_backend", lambda: next(iter(sharding.device_set)).platform
    ):
        lowered = jax.jit(step, donate_argnums=(0, 1)).lower(
            put(trainable), put(opt_state), put(frozen), batch, rng
        )
    return lowered.compile().memory_analysis().temp_size_in_bytes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--what", choices=("attention", "step"), default="attention")
    p.add_argument("--impls", nargs="+", default=["eager", "splash"])
    p.add_argument("--seqs", nargs="+", type=int, default=[2048, 8192])
    p.add_argument("--layers", type=int, default=32, help="step: decoder layers")
    p.add_argument("--remat", choices=("none", "full", "dots"), default="full")
    p.add_argument("--base", choices=("bf16", "nf4"), default="bf16", help="step: base weights")
    p.add_argument("--topology", default="v5e:2x2")
    p.add_argument("--accelerator", default="v5litepod-4", help="TPU_ACCELERATOR_TYPE")
    args = p.parse_args(argv)

    from jax.sharding import SingleDeviceSharding

    device = tpu_device(args.topology, args.accelerator)
    sharding = SingleDeviceSharding(device)
    print(f"target: {device.device_kind} ({args.topology}), {args.what}")
    for impl in args.impls:
        temps = {}
        for seq in args.seqs:
            try:
                if args.what == "attention":
                    temps[seq] = attention_temp(impl, seq, sharding)
                else:
                    temps[seq] = step_temp(impl, seq, args.layers, args.remat, sharding, args.base)
                print(f"{impl:>8} S={seq:>6}: temp {temps[seq] / GiB:8.3f} GiB", flush=True)
            except Exception as e:  # a compile that fails (e.g. out of memory) is a result here
                print(f"{impl:>8} S={seq:>6}: FAILED {type(e).__name__}: {str(e)[:300]}")
        if len(temps) > 1:
            lo, hi = min(temps), max(temps)
            growth = temps[hi] / max(temps[lo], 1)
            print(f"{impl:>8} temp({hi}) / temp({lo}) = {growth:.2f} (length x{hi / lo:g})")


if __name__ == "__main__":
    main()
