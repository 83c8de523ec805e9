"""Several adapters on one base (``Model.load_adapter(dir, name=)``) against a model per adapter.

    python tools/bench_adapters.py                     # tiny shape, 4 adapters of r 16
    python tools/bench_adapters.py --shape 57m --adapters 8

One random base (``tools/bench_common.py``'s shape), ``--adapters`` LoRA adapters on every
linear (rank ``--rank``; the last one rank ``--rank`` × 2, to show a second compiled shape), saved
in PEFT format. Printed side by side:

* memory: the bytes of distinct device buffers of the base with every adapter loaded by name,
  against every adapter loaded onto its own ``load_model`` (what a script without named
  adapters does);
* time: ``set_adapter`` (assembling the active tree), and ``sampling.generate`` right after each
  switch, with the number of programs the generation loop has compiled so far
  (``generate_ids._cache_size()``): a switch to an adapter of a shape already seen compiles
  nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `tools.*` and `jaxlora` importable
    sys.path.insert(0, str(ROOT))

from tools import bench_common as bc  # noqa: E402


def distinct_bytes(models) -> int:
    """Bytes of the distinct device buffers the models' parameter trees hold together."""
    import jax

    seen = {}
    for m in models:
        for arr in jax.tree_util.tree_leaves(m.params):
            seen[arr.unsafe_buffer_pointer()] = arr.nbytes
    return sum(seen.values())


def save_adapters(base_dir: Path, out: Path, n: int, rank: int) -> list[Path]:
    """``n`` random adapters on every linear (the last with twice the rank), in PEFT format."""
    import jax

    import jaxlora
    from jaxlora.lora import LoraConfig

    base = jaxlora.load_model(base_dir, tokenizer=False)
    dirs = []
    for i in range(n):
        r = rank * 2 if i == n - 1 else rank
        cfg = LoraConfig(r=r, alpha=2 * r, target_modules="all-linear", init="gaussian")
        model = base.apply_lora(cfg, key=jax.random.key(i))
        dirs.append(model.save_adapter(out / f"adapter{i}"))
    return dirs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", choices=[k for k, s in bc.SHAPES.items() if not s.gpu_only])
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20)
    p.set_defaults(shape="tiny")
    args = p.parse_args(argv)
    if args.adapters < 2:
        p.error("--adapters must be at least 2 (one of the base rank, the last of twice it)")

    import jax
    import numpy as np
    import torch
    import transformers

    import jaxlora
    from jaxlora import sampling

    shape = bc.SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(shape.hf_config()).save_pretrained(tmp / "b")
        dirs = save_adapters(tmp / "b", tmp, args.adapters, args.rank)
        names = [f"adapter{i}" for i in range(args.adapters)]

        model = jaxlora.load_model(tmp / "b", tokenizer=False)
        for name, d in zip(names, dirs, strict=True):
            model = model.load_adapter(d, name=name)
        one_base = distinct_bytes([model.set_adapter(n) for n in names])
        apart = [jaxlora.load_model(tmp / "b", tokenizer=False).load_adapter(d) for d in dirs]
        per_model = distinct_bytes(apart)
        del apart

        switch = []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            model.set_adapter(names[i % len(names)])
            switch.append(time.perf_counter() - t0)

        ids = np.random.default_rng(0).integers(3, shape.vocab, (1, 16)).astype(np.int32)
        rows = []
        for name in [names[0], names[1], names[-1], names[0]]:
            m = model.set_adapter(name)
            t0 = time.perf_counter()
            out = sampling.generate_ids(
                m.module(),
                m.prepared_params(),
                ids,
                np.ones_like(ids),
                np.asarray([shape.vocab], np.int32),  # an id never drawn: no early stop
                jax.random.key(0),
                max_new_tokens=args.new_tokens,
            )
            out.block_until_ready()
            rows.append((name, time.perf_counter() - t0, sampling.generate_ids._cache_size()))

    mib = 2**20
    host = bc.machine()
    print(f"{host['cpu']}, {host['cores_usable']} cores usable, load {host['loadavg']}")
    print(f"shape {shape.name}, {args.adapters} adapters of r {args.rank} (last r {2 * args.rank})")
    print(f"{'parameters held':<44}{'MiB':>10}")
    print(f"{'  one base, every adapter by name':<44}{one_base / mib:>10.1f}")
    print(f"{'  a load_model per adapter':<44}{per_model / mib:>10.1f}")
    print(f"set_adapter: median {statistics.median(switch) * 1e3:.2f} ms ({args.repeats} switches)")
    print(f"{'generate after switching to':<30}{'s':>8}{'programs compiled':>20}")
    for name, seconds, compiled in rows:
        print(f"  {name:<28}{seconds:>8.2f}{compiled:>20}")


if __name__ == "__main__":
    main()
