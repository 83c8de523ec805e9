"""The train step's speed with the chunked cross-entropy against whole logits, interleaved.

    python tools/bench_loss.py --shape 57m --chunks 0 1024 --rounds 5 --steps 3
    python tools/bench_loss.py --shape tiny --chunks 0 1024 512
    python tools/bench_loss.py --shape 57m --chunks 0 512 256 --trained 0.1

The same LoRA train step as ``tools/bench_train.py``'s jaxlora side (its cached random-init
checkpoint of ``--shape``, LoRA r 16 all-linear, packed batches of random ids, AdamW), one
jitted step per ``train.loss_chunk`` value, all in one process so they share the machine's
state. The steps take turns, A B A B ... (``--rounds`` rounds of ``--steps`` timed steps each,
one untimed step first), so load from other processes falls on all of them alike; medians per
value and the load average are printed, wall and CPU time (all threads: steadier than wall
when other processes share the cores). ``--mode qlora`` trains over the bitsandbytes NF4 copy.
``--trained F`` masks the first ``1 − F`` of every document's positions out of the loss, as
``data.train_on_inputs: false`` masks a prompt (default 1: every token trained); the chunked
loss sends only the trained tokens through the head, whole logits send every one.
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
    p.add_argument(
        "--trained",
        type=float,
        default=1.0,
        help="fraction of each document's "
        "positions in the loss (its last ones; the rest are a masked prompt)",
    )
    ours = p.parse_args(argv)
    if any(c < 0 for c in ours.chunks):
        p.error(f"--chunks must be >= 0 (0 = whole logits), got {ours.chunks}")
    if not 0 <= ours.trained <= 1:
        p.error(f"--trained must be in [0, 1], got {ours.trained}")
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
        host = [
            prompt_masked(b, ours.trained)
            for b in bc.packed_batches(4, ours.batch, ours.seq, vocab, seed=0)
        ]
        share = np.mean([b["loss_mask"].mean() for b in host])
        longest = np.mean([b["loss_mask"].sum(1).max() for b in host])
        print(f"tokens in the loss: {share:.1%}; most in one row: {longest:.0f} of {ours.seq}")
        batches = {c: [s.put(b) for b in host] for c, s in sides.items()}
        times: dict[int, list[float]] = {c: [] for c in sides}
        cpu: dict[int, list[float]] = {c: [] for c in sides}
        losses = {c: sides[c].step(batches[c][0]) for c in sides}  # compile
        print(f"first-step loss: {losses} (0 = whole logits)")
        load = [os.getloadavg()[0]]
        for r in range(ours.rounds):
            for c, side in sides.items():
                side.step(batches[c][1])
                for i in range(ours.steps):
                    t0, c0 = time.perf_counter(), time.process_time()
                    side.step(batches[c][i % len(host)])
                    times[c].append(time.perf_counter() - t0)
                    cpu[c].append(time.process_time() - c0)
            load.append(os.getloadavg()[0])
            row = ", ".join(
                f"{c}: {np.median(times[c][-ours.steps :]) * 1e3:,.0f} ms" for c in sides
            )
            print(f"round {r + 1}/{ours.rounds}: {row}; load {load[-1]:.2f}")
    ref, ref_cpu = np.median(times[ours.chunks[0]]), np.median(cpu[ours.chunks[0]])
    tokens = ours.batch * ours.seq
    first = ours.chunks[0]
    print(f"| train.loss_chunk | step, median | tokens/s | vs {first} | CPU / step | vs {first} |")
    print("|---|---|---|---|---|---|")
    for c, t in times.items():
        med, med_cpu = np.median(t), np.median(cpu[c])
        print(
            f"| {c} | {med * 1e3:,.0f} ms | {tokens / med:,.0f} | {ref / med:.2f}× "
            f"| {med_cpu * 1e3:,.0f} ms | {ref_cpu / med_cpu:.2f}× |"
        )
    print(f"load average (1 min) over the run: {min(load):.2f}–{max(load):.2f} on 2 cores")
    return 0


def prompt_masked(batch: dict[str, np.ndarray], trained: float) -> dict[str, np.ndarray]:
    """``batch`` with the first ``round((1 − trained) · n)`` positions of each document (``n``
    positions, one ``segment_ids`` run) out of ``loss_mask``: a prompt, as SFT masks it."""
    mask = batch["loss_mask"].copy()
    for row, seg in zip(mask, batch["segment_ids"], strict=True):
        for s in np.unique(seg[seg != 0]):
            where = np.flatnonzero(seg == s)
            row[where[: round((1 - trained) * len(where))]] = 0
    return batch | {"loss_mask": mask}


if __name__ == "__main__":
    sys.exit(main())
