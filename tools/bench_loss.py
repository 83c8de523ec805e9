"""The train step's speed with the chunked cross-entropy against whole logits, interleaved.

    python tools/bench_loss.py --shape 57m --chunks 0 1024 --rounds 5 --steps 3
    python tools/bench_loss.py --shape tiny --chunks 0 1024 512

The same LoRA train step as ``tools/bench_train.py``'s jaxlora side (its cached random-init
checkpoint of ``--shape``, LoRA r 16 all-linear, packed batches of random ids, AdamW), one
jitted step per ``train.loss_chunk`` value, all in one process so they share the machine's
state. The steps take turns, A B A B ... (``--rounds`` rounds of ``--steps`` timed steps each,
one untimed step first), so load from other processes falls on all of them alike; medians per
value and the load average are printed. ``--mode qlora`` trains over the bitsandbytes NF4 copy.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools import bench_common as bc  # noqa: E402
from tools import bench_train  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", choices=("tiny", "57m"), default="tiny")
    p.add_argument("--mode", choices=("lora", "qlora"), default="lora")
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 1024])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round and value")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    ours = p.parse_args(argv)
    if any(c < 0 for c in ours.chunks):
        p.error(f"--chunks must be >= 0 (0 = whole logits), got {ours.chunks}")
    with tempfile.TemporaryDirectory(prefix="bench_loss_") as tmp:
        common = ["--shape", ours.shape, "--mode", ours.mode, "--device", "cpu"]
        common += ["--batch", str(ours.batch), "--seq", str(ours.seq)]
        args = bench_train.parse_args(common)
        args.workdir = Path(tmp)
        bench_train.prepare(args)  # cached checkpoint (+ NF4 copy); the adapter in tmp
        sides = {}
        for c in ours.chunks:
            args.loss_chunk = c
            sides[c] = bench_train.JaxloraSide(args, probe=False)
        vocab = bc.SHAPES[ours.shape].vocab
        host = bc.packed_batches(4, ours.batch, ours.seq, vocab, seed=0)
        batches = {c: [s.put(b) for b in host] for c, s in sides.items()}
        times: dict[int, list[float]] = {c: [] for c in sides}
        losses = {c: sides[c].step(batches[c][0]) for c in sides}  # compile
        print(f"first-step loss: {losses} (0 = whole logits)")
        load = [os.getloadavg()[0]]
        for r in range(ours.rounds):
            for c, side in sides.items():
                side.step(batches[c][1])
                for i in range(ours.steps):
                    t0 = time.perf_counter()
                    side.step(batches[c][i % len(host)])
                    times[c].append(time.perf_counter() - t0)
            load.append(os.getloadavg()[0])
            row = ", ".join(
                f"{c}: {np.median(times[c][-ours.steps :]) * 1e3:,.0f} ms" for c in sides
            )
            print(f"round {r + 1}/{ours.rounds}: {row}; load {load[-1]:.2f}")
    ref = np.median(times[ours.chunks[0]])
    tokens = ours.batch * ours.seq
    print(f"| train.loss_chunk | step, median | tokens/s | vs {ours.chunks[0]} |")
    print("|---|---|---|---|")
    for c, t in times.items():
        med = np.median(t)
        print(f"| {c} | {med * 1e3:,.0f} ms | {tokens / med:,.0f} | {ref / med:.2f}× |")
    print(f"load average (1 min) over the run: {min(load):.2f}–{max(load):.2f} on 2 cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
