"""The LoRA train step with each attention implementation, timed in turn in one process.

    python tools/bench_attention.py --seq 256 --batch 4            # eager vs chunked, CPU
    python tools/bench_attention.py --seq 2048 --batch 1 --rounds 8

Same model (``tools/bench_common.py``'s shape, default ``tiny``: 4 layers, hidden 256, 4 query
and 2 kv heads of 64), same LoRA (r 16, all-linear, random B), same packed batch (``--docs``
documents a row, default three), same jitted ``jaxlora.training.step.make_train_step``; only
``attn_impl`` differs. The implementations run alternately, round after round, so a machine
shared with other work slows them alike (host allocator tuned as the train CLI tunes it).
Printed: median and minimum wall time and median process CPU time per step.
tools/bench_train.py (``--jax-attn``) compares one of them with PEFT instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `tools.*` and `jaxlora` importable
    sys.path.insert(0, str(ROOT))

from tools import bench_common as bc  # noqa: E402


def packed_batch(
    batch: int, seq: int, vocab: int, seed: int = 0, docs: int = 3
) -> dict[str, np.ndarray]:
    """``[accum=1, batch, seq]``: ``docs`` equal documents a row, positions restarting at 0."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (1, batch, seq)).astype(np.int32)
    lengths = [seq // docs] * (docs - 1) + [seq - (docs - 1) * (seq // docs)]
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
    pos = np.concatenate([np.arange(n) for n in lengths])
    tile = lambda x: np.broadcast_to(x, (1, batch, seq)).astype(np.int32)
    return dict(
        input_ids=ids,
        targets=np.roll(ids, -1, -1),
        loss_mask=np.ones_like(ids),
        segment_ids=tile(seg),
        positions=tile(pos),
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", choices=sorted(bc.SHAPES), default="tiny")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--impls", nargs="+", default=["eager", "chunked"])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--docs", type=int, default=3, help="documents packed in a row")
    args = p.parse_args(argv)

    from jaxlora.training.host import tune_allocator

    tune_allocator()  # what python -m jaxlora.train does before the first computation

    import jax
    import jax.numpy as jnp
    import optax

    from jaxlora.lora import LoraConfig, combine, inject, partition
    from jaxlora.models.config import LlamaConfig
    from jaxlora.models.llama import LlamaForCausalLM, init_params
    from jaxlora.training.optim import make_optimizer
    from jaxlora.training.step import make_train_step

    s = bc.SHAPES[args.shape]
    cfg = LlamaConfig(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        head_dim=s.head_dim,
        rms_norm_eps=1e-5,
        tie_word_embeddings=s.tied,
    )
    lora_cfg = LoraConfig(r=16, alpha=32, target_modules="all-linear", init="random")
    params = inject(init_params(cfg, jax.random.key(0)), lora_cfg, jax.random.key(1))
    frozen, trainable = partition(params, lora_cfg)
    tx = make_optimizer(optax.constant_schedule(2e-4), weight_decay=0.01, max_grad_norm=1.0)
    batch = {
        k: jnp.asarray(v)
        for k, v in packed_batch(args.batch, args.seq, s.vocab, docs=args.docs).items()
    }
    key = jax.random.key(0)

    steps = {}
    for impl in args.impls:
        module = LlamaForCausalLM(cfg, attn_impl=impl)
        steps[impl] = jax.jit(make_train_step(module, combine, tx, dropout=False))
        t = time.perf_counter()
        _, _, m = jax.block_until_ready(
            steps[impl](trainable, tx.init(trainable), frozen, batch, key)
        )
        print(
            f"{impl:>8}: compile + first step {time.perf_counter() - t:5.1f} s, "
            f"loss {float(m['loss']):.6f}",
            flush=True,
        )

    wall = {impl: [] for impl in args.impls}
    cpu = {impl: [] for impl in args.impls}
    for _ in range(args.rounds):
        for impl in args.impls:
            state = (trainable, tx.init(trainable))
            t, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(steps[impl](*state, frozen, batch, key))
            wall[impl].append(time.perf_counter() - t)
            cpu[impl].append(time.process_time() - c)
    print(
        f"{args.shape}, batch {args.batch} x {args.seq} ({args.docs} documents a row), "
        f"{args.rounds} rounds, "
        f"{len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()[0]:.1f}"
    )
    for impl in args.impls:
        ms = lambda xs, f: f"{f(xs) * 1e3:8.1f} ms"
        print(
            f"{impl:>8}: wall median {ms(wall[impl], np.median)} (min {ms(wall[impl], min)}), "
            f"CPU median {ms(cpu[impl], np.median)}"
        )


if __name__ == "__main__":
    main()
