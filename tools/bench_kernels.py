"""Benchmark the fused NF4 dequant-matmul against a bf16 dot and dequantize-then-dot.

    python tools/bench_kernels.py            # GPU/TPU: the full table
    python tools/bench_kernels.py --small    # CPU: shapes scaled down, runs in seconds

For each M in {1, 16, 256, 4096, 16384} and (K, N) in {(4096, 4096), (4096, 14336),
(14336, 4096)} (an 8B model's q/o, gate/up and down projections) it times, in bf16:

* ``fused``: ``NF4Tensor.matmul`` with the Pallas kernel (includes dequantizing the
  double-quantized absmax, as in training), and ``dx``, the input-gradient kernel;
* ``bf16 dot``: ``x @ Wᵀ`` with a bf16 ``W`` of the same shape (the LoRA, unquantized cost);
* ``deq+dot``: dequantize to bf16, then dot (what the CPU fallback and HF+bnb do).

GB/s counts the bytes each path must move at least once (x, the weight as stored, y).
On CPU Pallas kernels only run in interpret mode, which is an emulator: its times mean
nothing, so they are never reported. The kernel is run once per shape to check it against
the jnp reference, and its column says "interp (untimed)".
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from jaxlora.kernels import nf4_matmul as km
from jaxlora.weights import Kernels, NF4Run, kernels_for, nf4, nf4_format

FULL_M = (1, 16, 256, 4096, 16384)
FULL_KN = ((4096, 4096), (4096, 14336), (14336, 4096))
SMALL_M = (1, 16, 64)
SMALL_KN = ((256, 256), (256, 512), (512, 256))


def _time(fn, *args, iters: int) -> float:
    """Median wall time in ms of a jitted call (after one warm-up that compiles)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _bench_shape(m: int, k: int, n: int, *, compiled: bool, iters: int, key) -> dict:
    kw, kx, kd = jax.random.split(key, 3)
    w = (jax.random.normal(kw, (n, k), jnp.float32) * 0.02).astype(jnp.bfloat16)
    t = jax.jit(nf4.quantize)(w)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    dy = jax.random.normal(kd, (m, n), jnp.bfloat16)
    row = {"M": m, "K": k, "N": n}
    platform = jax.devices()[0].platform
    matmul = jax.jit(lambda x, t: t.matmul(x))
    dx_fn = jax.jit(lambda x, t, dy: jax.vjp(lambda x: t.matmul(x), x)[1](dy)[0])

    row["deq+dot"] = _time(matmul, x, t.with_run(NF4Run(Kernels(platform, "dequant"))), iters=iters)
    want = matmul(x, t.with_run(NF4Run(Kernels(platform, "dequant"))))
    wb = t.dequantize(jnp.bfloat16)
    row["bf16 dot"] = _time(jax.jit(lambda x, w: x @ w.T), x, wb, iters=iters)
    row["bf16 dx"] = _time(jax.jit(lambda dy, w: dy @ w), dy, wb, iters=iters)

    fused = kernels_for(jax.devices(), "auto" if compiled else "interpret")
    t = t.with_run(NF4Run(fused))
    got = matmul(x, t)  # correctness first, compiled or interpreted
    ref = km.reference_forward(
        x,
        jnp.asarray(t.codes),
        t.absmax_f32(),
        code=tuple(nf4_format.NF4_CODE.tolist()),
        blocksize=64,
    )
    row["max|err|"] = float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref.astype(jnp.float32))))
    row["max|y|"] = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
    if compiled:
        row["fused"] = _time(matmul, x, t, iters=iters)
        row["fused dx"] = _time(dx_fn, x, t, dy, iters=iters)
    stored = t.nbytes
    io = 2 * (m * k + m * n)
    row["fused GB/s"] = (io + stored) / (row["fused"] * 1e6) if compiled else None
    row["bf16 GB/s"] = (io + 2 * n * k) / (row["bf16 dot"] * 1e6)
    row["fused TFLOP/s"] = 2 * m * n * k / (row["fused"] * 1e9) if compiled else None
    return row


def _fmt(v) -> str:
    if v is None:
        return "interp (untimed)"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="scaled-down shapes (for CPU)")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    backend = jax.default_backend()
    compiled = backend in km.PLATFORMS
    if not compiled and not args.small:
        raise SystemExit(
            f"backend {backend!r} has no compiled Pallas kernels; the full table is only "
            "meaningful on GPU/TPU. Use --small for a CPU run (kernel checked, not timed)."
        )
    if not compiled:
        print(
            f"NOTE: backend {backend!r}: Pallas runs only in interpret mode here. Interpret-mode "
            "times are an emulator's, not a kernel's, so the fused columns are NOT timed; the "
            "kernel is run once per shape and checked against the jnp reference (max|err|)."
        )
    print(f"device: {jax.devices()[0].device_kind} ({backend}), bf16, median of {args.iters}, ms")
    ms, kns = (SMALL_M, SMALL_KN) if args.small else (FULL_M, FULL_KN)
    rows = []
    key = jax.random.key(0)
    for k, n in kns:
        for m in ms:
            key, sub = jax.random.split(key)
            rows.append(_bench_shape(m, k, n, compiled=compiled, iters=args.iters, key=sub))
    cols = ["M", "K", "N", "fused", "bf16 dot", "deq+dot", "fused dx", "bf16 dx"]
    cols += ["fused GB/s", "bf16 GB/s", "fused TFLOP/s", "max|err|", "max|y|"]
    table = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for t in table:
        print("  ".join(v.rjust(w) for v, w in zip(t, widths, strict=True)))


if __name__ == "__main__":
    main()
