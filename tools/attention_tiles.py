"""How much of causal attention's work the Pallas GPU kernels do on packed rows: the (query
tile, key tile) pairs their loops visit, over the pairs of the causal triangle alone.

    python tools/attention_tiles.py                       # S 2048 and 8192, documents ~256-1024
    python tools/attention_tiles.py --seqs 4096 --mean-tokens 300 --window 4096

Documents get lognormal lengths (``--mean-tokens``, ``--sigma``), are packed into rows by
jaxlora's own packing (best-fit decreasing, ``jaxlora.data.packing.pack``), and ``--rows`` of
the packed rows, drawn at random, are counted with the kernels' own loop bounds
(``_Flash.key_tiles`` / ``segment_tiles``: the causal and window bounds met with the documents'
spans). The forward kernel's tiles are 128 rows, the backward's 32 (bf16, head_dim 128). The
counts are of tiles, so of the attention products' FLOPs; time on a GPU follows them only
roughly (nothing here ran on a GPU).
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


def packed_rows(rng, seq: int, mean: float, sigma: float, rows: int):
    """Segment ids ``(rows, seq)`` of rows packed from lognormal-length documents."""
    import numpy as np

    from jaxlora.data.packing import pack

    mu = np.log(mean) - sigma**2 / 2  # the lognormal's mean is then `mean`
    lengths = np.clip(rng.lognormal(mu, sigma, 64 * seq // int(mean) + 64).astype(int), 8, seq)
    packed = pack(list(lengths), seq)
    chosen = rng.choice(len(packed), min(rows, len(packed)), replace=False)
    seg = np.zeros((len(chosen), seq), np.int32)
    for b, r in enumerate(chosen):
        t = 0
        for n, i in enumerate(packed[r], 1):
            seg[b, t : t + lengths[i]] = n
            t += lengths[i]
    return seg


def visited(seg, tile: int, window: int | None) -> tuple[int, int]:
    """(pairs the kernels visit, pairs of the causal triangle) for rows ``seg`` at ``tile``."""
    import jax.numpy as jnp

    from jaxlora.kernels.attention_chunked import segment_spans
    from jaxlora.kernels.attention_gpu import _Flash

    f = _Flash(1.0, True, window, None, tile, tile, interpret=True)
    B, S = seg.shape
    n = S // tile
    seg = jnp.asarray(seg)
    first, last = segment_spans(seg)
    got = 0
    for b in range(B):
        for i in range(n):
            at = slice(i * tile, (i + 1) * tile)
            spans = f.segment_tiles(seg[b, at], first[b, at], last[b, at], tile)
            lo, hi = f.bounds(f.key_tiles(i * tile, tile, tile, n), spans)
            got += max(int(hi) - int(lo), 0)
    return got, B * n * (n + 1) // 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--mean-tokens", type=float, nargs="+", default=[256, 512, 1024])
    p.add_argument("--sigma", type=float, default=0.6, help="the lengths' lognormal sigma")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import numpy as np

    rng = np.random.default_rng(args.seed)
    print(
        f"Pallas GPU flash attention on packed rows: tile pairs visited / causal triangle "
        f"({args.rows} packed rows, lognormal lengths, sigma {args.sigma}"
        + (f", window {args.window}" if args.window else "")
        + ")"
    )
    print(f"{'S':>6} {'mean doc':>9} {'docs/row':>9} {'fwd (128)':>10} {'bwd (32)':>9}")
    for seq in args.seqs:
        for mean in args.mean_tokens:
            seg = packed_rows(rng, seq, mean, args.sigma, args.rows)
            docs = float(np.mean(seg.max(axis=1)))
            fwd = visited(seg, 128, args.window)
            bwd = visited(seg, 32, args.window)
            print(
                f"{seq:>6} {mean:>9.0f} {docs:>9.1f} {fwd[0] / fwd[1]:>10.3f} "
                f"{bwd[0] / bwd[1]:>9.3f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
