"""Quantization error of 4-bit data types on a real model: NF4+DQ vs NF4 vs FP4 vs Int4.

Reproduces the comparison of Table 2 in the QLoRA paper (Dettmers et al. 2023: Pile-CC
perplexity Int4 34.34, FP4 31.07, NF4+DQ 27.41) on any checkpoint — by default the shipped demo
base model on 1,000 fresh documents of its pretraining language (a new sampling seed: the same
people and facts, new orders and phrasings), i.e. held-out text from its own distribution. Every decoder linear is quantized with the data type (blocks of
64, as bitsandbytes), the rest stays float32, and the table gives eval loss, perplexity and the
relative weight reconstruction error ``‖W − Q(W)‖ / ‖W‖``.

    python tools/quant_error.py                      # the demo base on held-out demo text
    python tools/quant_error.py --model DIR --data FILE.jsonl --format text|alpaca|chat

Int4 is the symmetric blockwise absmax integer baseline (round(x / absmax · 7), codes −7..7),
simulated as quantize-dequantize since no checkpoint format stores it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flax.traverse_util import flatten_dict, unflatten_dict  # noqa: E402

from jaxlora import data  # noqa: E402
from jaxlora.config import DataConfig  # noqa: E402
from jaxlora.interop.bnb import is_quantized_weight  # noqa: E402
from jaxlora.model import load_model  # noqa: E402
from jaxlora.training.step import loss_sum  # noqa: E402
from jaxlora.weights.nf4 import quantize  # noqa: E402


def int4_absmax(w: np.ndarray, blocksize: int = 64) -> np.ndarray:
    """Symmetric blockwise absmax Int4 quantize-dequantize over the row-major flattening."""
    flat = w.reshape(-1).astype(np.float32)
    pad = (-flat.size) % blocksize
    blocks = np.pad(flat, (0, pad)).reshape(-1, blocksize)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    scale = np.where(absmax > 0, absmax / 7.0, 1.0)
    q = np.clip(np.round(blocks / scale), -7, 7) * scale
    return q.reshape(-1)[: flat.size].reshape(w.shape)


VARIANTS = {
    "float32": None,
    "NF4+DQ": lambda w: np.asarray(quantize(w, quant_type="nf4", double_quant=True).dequantize()),
    "NF4": lambda w: np.asarray(quantize(w, quant_type="nf4", double_quant=False).dequantize()),
    "FP4": lambda w: np.asarray(quantize(w, quant_type="fp4", double_quant=False).dequantize()),
    "Int4": int4_absmax,
}


def eval_loss(model, rows) -> float:
    module = model.module()
    fn = jax.jit(lambda p, b: loss_sum(module, p, b))
    total = count = 0.0
    for batch in data.batches(rows, 16, shuffle=False, drop_last=False, repeat=False):
        s, n = fn(model.params, {k: jnp.asarray(v) for k, v in batch.items()})
        total, count = total + float(s), count + float(n)
    return total / count


def _demo_text(path: Path, count: int = 1000) -> str:
    """Held-out documents of the demo language (the pretraining used sampling seed 0)."""
    from tools.demo_world import make_world, pretrain_documents
    from tools.make_demo import NUM_PEOPLE, SEED

    people = make_world(SEED, NUM_PEOPLE)
    with open(path, "w") as f:
        for doc in pretrain_documents(people, seed=12345, count=count):
            f.write(json.dumps({"text": doc}) + "\n")
    return str(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="assets/demo/base")
    p.add_argument("--data", default=None, help="default: held-out demo-language text")
    p.add_argument("--format", default="text", choices=["alpaca", "chat", "text"])
    p.add_argument("--max-seq-len", type=int, default=128)
    args = p.parse_args(argv)

    model = load_model(args.model, dtype="float32")
    if args.data is None:
        args.data = _demo_text(Path(tempfile.mkdtemp()) / "heldout.jsonl")
    # every token scores (prompt and answer): a language-modelling perplexity, as in the paper
    cfg = DataConfig(
        path=args.data,
        format=args.format,
        max_seq_len=args.max_seq_len,
        train_on_inputs=True,
        val_size=0,
        packing=True,
    )
    rows, _ = data.build_datasets(cfg, model.tokenizer, seed=0)
    dense = flatten_dict(model.params, sep=".")
    results = []
    for name, fn in VARIANTS.items():
        flat, errs = dict(dense), []
        if fn is not None:
            for k, w in dense.items():
                if is_quantized_weight(k):
                    w = np.asarray(w)
                    q = fn(w)
                    errs.append(np.linalg.norm(w - q) / np.linalg.norm(w))
                    flat[k] = jnp.asarray(q)
        loss = eval_loss(dataclasses.replace(model, params=unflatten_dict(flat, sep=".")), rows)
        results.append((name, loss, float(np.exp(loss)), float(np.mean(errs)) if errs else 0.0))

    print(f"model {args.model}, data {args.data} ({len(rows)} packed rows of {args.max_seq_len})")
    print(f"{'data type':<10} {'eval loss':>10} {'perplexity':>11} {'rel. weight err':>16}")
    for name, loss, ppl, err in results:
        print(f"{name:<10} {loss:>10.5f} {ppl:>11.4f} {err:>16.4f}")
    order = [r[0] for r in sorted(results[1:], key=lambda r: r[1])]
    print("best to worst (4-bit):", " < ".join(order), "| QLoRA paper: NF4+DQ < FP4 < Int4")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
