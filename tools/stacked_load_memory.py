"""Device memory of loading a base for a train step that scans its layers, side by side: loading
it, then stacking the layers (what jaxlora did before), against stacking them as the checkpoint
streams in (``training.run.load_base`` with a mesh: a ``StackingSink``).

    python tools/stacked_load_memory.py                          # 57m shape, NF4 + double quant
    python tools/stacked_load_memory.py --shape tiny --quant none

The checkpoint is ``tools/bench_common.py``'s random-init shape, cached as ``bench_train.py``
caches it (``--cache-dir``). LoRA goes on q, v and down of the first half of the layers, so
there are two runs (``model.scan_layers`` stacks only alike layers). Each side runs in its own process (an
allocator's peak cannot be reset) and reports, over what was live before loading:

* ``load peak``: the sum of ``jax.live_arrays()`` sampled after every tensor read and every
  stacked slot written (the loader's functions wrapped for the measurement only);
* ``after stacking``: live bytes once LoRA is applied and both halves are stacked, the moment
  loading-then-stacking holds the layers twice;
* ``allocator peak``: ``device.memory_stats()["peak_bytes_in_use"]`` where the backend keeps
  one (GPU, TPU; not the CPU), which also sees inside each call.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))

from tools import bench_common as bc  # noqa: E402


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="57m", choices=sorted(bc.SHAPES))
    p.add_argument("--quant", default="nf4", choices=["nf4", "none"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "jaxlora-bench")
    p.add_argument("--side", choices=["stacked", "unstacked"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def checkpoint(args) -> Path:
    """The random-init checkpoint of ``--shape`` (built once, as ``bench_train.py`` does)."""
    directory = args.cache_dir / f"{args.shape}-{args.dtype}" / "dense"
    if not directory.exists():
        import torch
        import transformers

        torch.manual_seed(1234)
        model = transformers.AutoModelForCausalLM.from_config(
            bc.SHAPES[args.shape].hf_config(), dtype=bc.torch_dtype(args.dtype)
        )
        bc.save_atomically(model, directory)
    return directory


def one_side(args) -> dict:
    """Load, apply LoRA and stack for scan one way; the figures of the module docstring."""
    import gc

    import jax

    from jaxlora.config import load_config
    from jaxlora.interop import hf
    from jaxlora.model import load_model
    from jaxlora.models import stacking
    from jaxlora.training import run

    directory = checkpoint(args)
    layers = bc.SHAPES[args.shape].layers
    cfg = load_config(
        "demo",
        [
            f"model.path={directory}",
            f"model.dtype={args.dtype}",
            f"model.compute_dtype={args.dtype}",
            f"quant.type={args.quant}",
            "lora.target_modules=[q_proj,v_proj,down_proj]",
            f"lora.layers_to_transform=[{','.join(str(i) for i in range(layers // 2))}]",
        ],
    )
    live = lambda: sum(x.nbytes for x in jax.live_arrays())
    samples: list[int] = []
    stream, write = hf.iter_tensors, stacking._write_slot

    def counted_stream(d):
        for item in stream(d):
            samples.append(live())
            yield item
        samples.append(live())

    def counted_write(buf, x, i):
        out = write(buf, x, i)
        samples.append(live())
        return out

    hf.iter_tensors, stacking._write_slot = counted_stream, counted_write
    mesh = run.make_mesh(cfg)
    stacked = args.side == "stacked"
    gc.collect()
    before = live()
    model = load_model(
        directory,
        dtype=args.dtype,
        quant=None if args.quant == "none" else args.quant,
        tokenizer=False,
        quant_kwargs={"blocksize": 64, "double_quant": True},
        sink=run.stacking_sink(cfg, mesh) if stacked else None,
    )
    base = sum(x.nbytes for x in jax.tree.leaves(model.params))
    first, second = stacking.LAYER_PATHS[0]
    in_layers = sum(x.nbytes for x in jax.tree.leaves(model.params[first][second]))
    peak = max(samples) - before
    model, frozen, trainable = run.init_lora(cfg, model, jax.random.key(0))
    frozen, trainable, runs = run.stack_for_scan(frozen, trainable, model.config, True)
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "base": base,
        "layers": in_layers,
        "adapter": sum(x.nbytes for x in jax.tree.leaves(trainable)),
        "load_peak": peak,
        "after_stacking": live() - before,
        "allocator_peak": stats.get("peak_bytes_in_use"),
        "runs": runs,
        "device": str(jax.devices()[0].device_kind),
    }


def main(argv=None) -> int:
    args = _args(argv)
    if args.side:
        print(json.dumps(one_side(args)))
        return 0
    checkpoint(args)  # once, before the two sides
    res = {}
    for side in ("unstacked", "stacked"):
        cmd = [sys.executable, __file__, *(argv or sys.argv[1:]), "--side", side]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, check=False)
        if out.returncode:
            sys.stderr.write(out.stderr[-3000:])
            return out.returncode
        res[side] = json.loads(out.stdout.strip().splitlines()[-1])
    old, new = res["unstacked"], res["stacked"]
    m = bc.machine()
    print(f"{args.shape}, {args.quant}, {args.dtype}; runs {new['runs']}; device {new['device']}")
    print(f"machine: {m.get('cpu')}, {m.get('cores')} cores, load average {os.getloadavg()[0]:.1f}")
    print(
        f"base {old['base']:,} B ({old['layers']:,} B in the decoder layers), "
        f"adapter {old['adapter']:,} B"
    )
    print(f"{'':24}{'load, then stack':>20}{'stacked as it loads':>22}")
    for key in ("load_peak", "after_stacking", "allocator_peak"):
        a, b = old[key], new[key]
        if a is None:
            print(f"{key:24}{'n/a':>20}{'n/a':>22}")
            continue
        ratio = lambda v: f"{v:,} ({v / old['base']:.2f}x)"
        print(f"{key:24}{ratio(a):>20}{ratio(b):>22}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
