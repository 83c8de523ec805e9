"""Build the built-in demo's assets: instruction data, a tokenizer and a tiny pretrained Llama.

    python tools/make_demo.py            # data + tokenizer + pretraining (~10 min on 2 CPU cores)
    python tools/make_demo.py --check    # regenerate the data in memory, compare with the files
    python tools/make_demo.py --data-only

Writes ``assets/demo/data/{train,eval}.jsonl`` and ``sample_prompts.json`` (pure functions of
``--seed``, checked byte for byte by ``--check``), and ``assets/demo/base/`` (``config.json``,
``model.safetensors``, the tokenizer files and ``pretrain_log.json``). The synthetic language
and the task are described in ``tools/demo_world.py`` and ``assets/demo/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `tools.*` and `jaxlora` importable
    sys.path.insert(0, str(ROOT))

from tools.demo_world import TASKS, instruction_splits, make_world, pretrain_documents  # noqa: E402

SEED = 0
NUM_PEOPLE = 200
NUM_EVAL_PEOPLE = 50  # asked about only in eval.jsonl
DATA_FILES = ("train.jsonl", "eval.jsonl", "sample_prompts.json")


def data_files(seed: int) -> dict[str, str]:
    """The exact text of every data file, by name: a pure function of ``seed``."""
    people = make_world(seed, NUM_PEOPLE)
    train, evals = instruction_splits(people, seed, NUM_EVAL_PEOPLE)
    jsonl = lambda recs: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    # Held-out examples, so samples show generalisation: per task the first eval question
    # without an input (usable as a bare instruction string), plus one description with input.
    samples = [next(r for r in evals if r["task"] == t and not r["input"]) for t in TASKS]
    samples.append(next(r for r in evals if r["task"] == "describe" and r["input"]))
    return {
        "train.jsonl": jsonl(train),
        "eval.jsonl": jsonl(evals),
        "sample_prompts.json": json.dumps(samples, indent=2, ensure_ascii=False) + "\n",
    }


def check(data_dir: Path, seed: int) -> list[str]:
    """Names of the data files that differ from (or are missing next to) a fresh regeneration."""
    bad = []
    for name, text in data_files(seed).items():
        path = data_dir / name
        if not path.exists() or path.read_bytes() != text.encode("utf-8"):
            bad.append(name)
    return bad


def tokenizer_corpus(docs: list[str], data: dict[str, str]) -> list[str]:
    """Pretraining text plus every instruction example in its Alpaca layout (the chat template
    uses the same section headers), so every word of the demo is in the BPE vocabulary."""
    from jaxlora.data import ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT

    out = list(docs)
    for name in ("train.jsonl", "eval.jsonl"):
        for line in data[name].splitlines():
            r = json.loads(line)
            template = ALPACA_TEMPLATE if r["input"] else ALPACA_TEMPLATE_NO_INPUT
            out.append(template.format(**r) + r["output"])
    return out


def build_base(args: argparse.Namespace, data: dict[str, str]) -> None:
    """Tokenizer + pretraining + probes, written to ``<out>/base`` with ``pretrain_log.json``."""
    import jax
    import numpy as np

    from tools.demo_pretrain import PretrainSettings, build_tokenizer, model_config, pretrain

    t_start = time.time()
    settings = PretrainSettings(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    people = make_world(args.seed, NUM_PEOPLE)
    # A row holds ~2 documents: this many means no row is seen twice.
    n_docs = int(settings.steps * settings.batch_size * 2.8)
    docs = list(pretrain_documents(people, args.seed, n_docs))
    tokenizer = build_tokenizer(tokenizer_corpus(docs[:20000], data), args.vocab_size)
    eos = tokenizer.eos_token_id
    encoded = [np.asarray(e + [eos], np.int32) for e in tokenizer(docs)["input_ids"]]
    n_tokens = int(sum(map(len, encoded)))
    print(
        f"{len(docs)} documents, {n_tokens} tokens, vocab {len(tokenizer)}; "
        f"data ready in {time.time() - t_start:.1f}s"
    )

    config = model_config(len(tokenizer), hidden=args.hidden, layers=args.layers)
    params, history = pretrain(config, encoded, settings, tokenizer.pad_token_id)
    seconds = time.time() - t_start
    recall = write_base(Path(args.out) / "base", config, params, tokenizer, people)
    log = {
        "seed": args.seed,
        "settings": vars(settings),
        "architecture": {"hidden": args.hidden, "layers": args.layers, "vocab": len(tokenizer)},
        "num_params": sum(int(x.size) for x in jax.tree_util.tree_leaves(params)),
        "documents": len(docs),
        "tokens": n_tokens,
        "wall_seconds": round(seconds, 1),  # data + tokenizer + pretraining
        "cpu_count": os.cpu_count(),
        "loss_history": [[s, round(v, 4)] for s, v in history],
        "fact_recall": recall,
    }
    (Path(args.out) / "base" / "pretrain_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"saved {Path(args.out) / 'base'} (pretraining took {seconds:.0f}s)")


def write_base(out: Path, config, params: dict, tokenizer, people) -> dict[str, float]:
    """Save the checkpoint and tokenizer, check the reload, and return the base's fact recall."""
    import jax
    import numpy as np

    from jaxlora.interop.hf import save_pretrained
    from jaxlora.model import Model, load_model
    from tools.demo_eval import fact_probes, fact_recall
    from tools.demo_pretrain import MAX_POSITIONS

    model = Model(config=config, params=params, tokenizer=tokenizer)
    recall = fact_recall(model, people)
    print("base fact recall (plain-text prompts):", json.dumps(recall))

    special = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    extra = {"max_position_embeddings": MAX_POSITIONS} | special  # read by transformers only
    save_pretrained(jax.device_get(params), config, out, dtype="float32", extra_config=extra)
    tokenizer.save_pretrained(out)
    # What was written is what was trained, through jaxlora's own loader.
    probes = [p for _, p, _ in fact_probes(people[:2])]
    ids = np.asarray(tokenizer(probes, padding=True)["input_ids"])
    want = np.asarray(model(ids))
    np.testing.assert_allclose(np.asarray(load_model(out)(ids)), want, rtol=0, atol=1e-5)
    return recall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "assets" / "demo"))
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--check", action="store_true", help="compare regenerated data with files")
    ap.add_argument("--data-only", action="store_true", help="write the data files, no model")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=2048, help="cap; BPE stops at ~1.2k")
    args = ap.parse_args(argv)

    data_dir = Path(args.out) / "data"
    if args.check:
        bad = check(data_dir, args.seed)
        if bad:
            print(f"{data_dir}: {', '.join(bad)} differ from the seed-{args.seed} regeneration")
            return 1
        print(f"{data_dir}: all data files match the seed-{args.seed} regeneration")
        return 0

    data = data_files(args.seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, text in data.items():
        (data_dir / name).write_text(text, encoding="utf-8")
    print(f"wrote {', '.join(data)} to {data_dir}")
    if not args.data_only:
        build_base(args, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
