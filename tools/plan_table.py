"""The planning table of docs/planning.md, from ``python -m jaxlora.plan ... format=json``.

Each row (model × QLoRA/LoRA × sequence length × target) is compiled in its own process by the
plan command itself, so the table is exactly what a user would get; results are appended to a
JSON-lines file as they come (a rerun skips rows already there: the whole table takes hours on
2 cores), and ``--render`` prints the markdown table from that file::

    nice python tools/plan_table.py --out plans.jsonl                       # every row
    nice python tools/plan_table.py --out plans.jsonl --models Llama-3.1-8B --quant qlora \\
        --seq 2048 --targets tpu-v5e-1 l4-1                                # some rows
    python tools/plan_table.py --out plans.jsonl --render                  # the tables
    python tools/plan_table.py --out assets/plans/plans.jsonl --write docs/planning.md
    nice python tools/plan_table.py --out compile.jsonl --models Llama-3.1-8B --quant qlora \\
        --seq 2048 --targets tpu-v5e-1 --layers 2 8 --scan true false      # compile time

``--write FILE`` replaces the generated blocks of a markdown file (between
``<!-- plan_table.py: matrix -->`` or ``<!-- plan_table.py: rows -->`` and
``<!-- /plan_table.py -->``) with the tables rendered from ``--out``; ``--check FILE`` exits 1
when they differ (tests/test_docs.py runs it on docs/planning.md, so the docs cannot drift from
``assets/plans/plans.jsonl``).

``--layers N`` compiles the model cut to its first N layers (a copy of ``config.json`` with
``num_hidden_layers = N`` in a temporary directory) to measure compile time against depth.
Models are the ``config.json`` files in ``assets/configs/`` (the published Hugging Face configs).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jaxlora.targets.registry import TARGETS as REGISTRY

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "assets" / "configs"
MODELS = ["Llama-3.1-8B", "Llama-3.2-1B", "Llama-3.2-3B", "Qwen2.5-7B", "Mistral-7B-v0.3"]
TARGETS = list(REGISTRY)  # every registered target, in the registry's order
QUANT = {"qlora": ["recipe=llama_qlora"], "lora": ["recipe=llama_lora"]}
# Rows compiled at these commits, before LoRA factors were split and gathered over fsdp
# (20f55d1), hold every factor whose dimensions no rule put on fsdp whole on each device of a
# mesh, with its Adam state: their multi-device figures are high (8B QLoRA, 8 devices: about
# 1.2 GiB). The tables mark them with a dagger until they are compiled again.
FACTORS_WHOLE = frozenset({"9b52ab4", "2e8a44a", "08970e6", "a640bf0"})


def devices(target: str) -> int:
    """Devices JAX sees on the target (``tpu-v5p-8`` is 4 megacore chips, ``tpu-v4-8`` 8 half
    chips: jaxlora/targets/registry.py)."""
    return REGISTRY[target].num_devices


def row_key(r: dict) -> tuple:
    keys = ("model", "quant", "seq", "target", "layers", "scan", "search")
    return (*(r[k] for k in keys), tuple(r.get("overrides", ())))


def plan_argv(row: dict, model_dir: Path) -> list[str]:
    """The ``python -m jaxlora.plan`` arguments of one row: the recipe, micro-batch 1 per
    device (the rows split over ``fsdp`` = every device), no accumulation."""
    n = devices(row["target"])
    return [
        *QUANT[row["quant"]],
        f"model.path={model_dir}",
        "model.tokenizer=null",
        f"model.scan_layers={row['scan']}",
        f"data.max_seq_len={row['seq']}",
        f"train.batch_size={n}",
        "train.grad_accum=1",
        f"mesh.fsdp={n}",
        f"target={row['target']}",
        f"search={row['search']}",
        "format=json",
        *row.get("overrides", ()),
    ]


def model_dir(name: str, layers: int | None, tmp: Path) -> Path:
    if layers is None:
        return CONFIGS / name
    cfg = json.loads((CONFIGS / name / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    if "max_window_layers" in cfg:
        cfg["max_window_layers"] = min(cfg["max_window_layers"], layers)
    out = tmp / f"{name}-{layers}"
    out.mkdir(exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def run_row(row: dict, tmp: Path) -> dict:
    argv = [
        sys.executable,
        "-m",
        "jaxlora.plan",
        *plan_argv(row, model_dir(row["model"], row["layers"], tmp)),
    ]
    # the compile toolchains: the `aot` extra in this environment, or a side directory
    # ($JAXLORA_AOT_TOOLCHAIN, where .ci/run installs them) on the plan process's path only
    path = [os.environ.get("JAXLORA_AOT_TOOLCHAIN"), str(ROOT), os.environ.get("PYTHONPATH")]
    env = os.environ | {"JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(filter(None, path))}
    start, cpu0 = time.perf_counter(), _children_cpu_s()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    # CPU seconds of the whole plan process: on a shared machine far steadier than wall time
    times = {"wall_s": time.perf_counter() - start, "cpu_s": _children_cpu_s() - cpu0}
    times |= {"commit": _commit()}  # rows of one table may come from different commits
    if proc.returncode != 0:
        return row | {"error": proc.stderr.strip().splitlines()[-1:]} | times
    return row | {"plan": json.loads(proc.stdout[proc.stdout.index("{") :])} | times


@functools.cache
def _commit() -> str | None:
    """The commit whose code plans the rows (``git rev-parse``, once per run)."""
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    )
    return out.stdout.strip() or None


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _tflops(plan: dict) -> str:
    """FLOPs per device and step, counted with every loop body × its trip count; "—" for rows
    planned before they were (no ``flops_source``, or XLA's cost analysis, which counts a
    scanned step's layers once) or where the plan could not count them."""
    if plan.get("flops_source") != "hlo_matmuls" or plan.get("flops_per_device") is None:
        return "—"
    return f"{plan['flops_per_device'] / 1e12:.1f}"


def _largest(search: dict | None, one: dict | None = None) -> int | str | None:
    """The largest micro-batch a ``--search batch`` row found (0: not even one fits; "≥N" where
    no larger one was compiled, the search's limit: a lower bound), or None where no search ran
    or it failed. Without a search, a micro-batch-1 row (``one``: one row per device) that does
    not fit answers 0 as a search would, without its compiles: the search starts there, and a
    smaller micro-batch than one row per device does not exist (a † row excepted: its figure
    is out of date)."""
    if search is None and one is not None and "error" not in one and not _dagger(one):
        p = one["plan"]
        if (
            not p["per_device"]["fits"]
            and p["micro_batch"] == p["mesh"]["data"] * p["mesh"]["fsdp"]
        ):
            return 0
    if search is None or "error" in search:
        return None
    if "search" in search["plan"]:
        found = search["plan"]["search"]
        largest = found["largest_micro_batch"]
        # as BatchSearch.at_limit, from the row's compiles (rows from before the flag too)
        at_limit = largest and all(t["micro_batch"] <= largest for t in found["tried"])
        return f"≥{largest}" if at_limit else largest
    fits_any = search["plan"]["per_device"].get("total_bytes") is not None  # rows before it
    return search["plan"]["micro_batch"] if fits_any else 0


def _first(one: dict | None, search: dict | None) -> dict | None:
    """The micro-batch-1 row: ``one`` where it was compiled, else the first compile of the
    search (the same step: one row per device), its time that compile's CPU seconds."""
    if one is not None or search is None or "error" in search:
        return one
    found = search["plan"].get("search")
    if not found or found["first"] is None:
        return None
    first = {"plan": found["first"], "cpu_s": found["tried"][0]["cpu_s"]}
    return first | {"target": search["target"], "commit": search.get("commit")}


def _dagger(row: dict) -> str:
    """ "†" for a multi-device row compiled before the factors were split (FACTORS_WHOLE)."""
    many = REGISTRY[row["target"]].num_devices > 1
    return " †" if many and row.get("commit") in FACTORS_WHOLE else ""


def render(results: list[dict]) -> str:
    """One line per (model, method, S, target, overrides): the micro-batch-1 plan's figures and,
    when a ``--search batch`` row was run too, the largest micro-batch it found. The time is the
    CPU seconds of the whole plan process (start-up, tracing, compiling): on a machine shared
    with other work, a compile's wall time says more about the load than about the compile.
    Where only a search was run, its first compile (one row per device) is the row, and the
    time that compile's CPU seconds (no process start-up)."""
    gib = lambda n: f"{n / 2**30:.2f}"
    lines = [
        "| model | method | S | target | per device GiB (of) | headroom | fits | largest mb "
        "| TFLOP per device | plan CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    group = lambda r: (r["model"], r["quant"], r["seq"], r["target"], *r.get("overrides", ()))
    rows: dict[tuple, dict[str, dict]] = {}
    for r in results:
        if r["layers"] is None:
            rows.setdefault(group(r), {})[r["search"]] = r
    order = lambda k: (MODELS.index(k[0]), k[1], k[2], TARGETS.index(k[3]), k[4:])
    for key in sorted(rows, key=order):
        search = rows[key].get("batch")
        one = _first(rows[key].get("none"), search)
        method = " ".join([key[1], *key[4:]])
        head = f"| {key[0]} | {method} | {key[2]} | {key[3]} "
        largest = _largest(search, one)
        largest = "—" if largest is None else largest
        if one is None:
            lines.append(head + f"| | | | {largest} | | |")
        elif "error" in one:
            lines.append(head + f"| error: {' '.join(one['error'])[:80]} | | | {largest} | | |")
        elif one["plan"]["per_device"]["total_bytes"] is None:  # the compiler refused it
            refused = one["plan"]["per_device"].get("refused", "")
            lines.append(
                head + f"| does not fit{_dagger(one)}: {refused[:90]} | | no | {largest} | | |"
            )
        else:
            p = one["plan"]
            d = p["per_device"]
            free = 1 - d["total_bytes"] / d["device_bytes"]
            lines.append(
                head + f"| {gib(d['total_bytes'])} ({gib(d['device_bytes'])}){_dagger(one)} "
                f"| {100 * free:.1f} % | {'yes' if d['fits'] else 'no'} | {largest} "
                f"| {_tflops(p)} | {one['cpu_s']:.0f} |"
            )
    return "\n".join(lines)


def _cell(one: dict | None, search: dict | None) -> str:
    """One target's cell of the at-a-glance matrix: per-device GiB and whether it fits, "OOM"
    where the compiler refused the step, the largest micro-batch when searched, "" where the
    row was not compiled."""
    if one is None or "error" in one:
        return "error" if one is not None else ""
    d = one["plan"]["per_device"]
    text = (
        "OOM ✗"
        if d["total_bytes"] is None
        else f"{d['total_bytes'] / 2**30:.1f} {'✓' if d['fits'] else '✗'}"
    ) + _dagger(one)
    largest = _largest(search, one)
    return text if largest is None else f"{text} mb {largest}"


def render_matrix(results: list[dict]) -> str:
    """Two matrices (TPU targets, GPU targets): a line per model, method and sequence length, a
    column per target; each cell the per-device GiB at micro-batch 1, ✓ where it leaves at least
    10 % of the device free, ✗ where it does not, "OOM" where the compiler refused it, "mb N"
    the largest micro-batch where it was searched; empty where the row was not compiled."""
    rows: dict[tuple, dict[str, dict]] = {}
    for r in results:
        if r["layers"] is None and not r.get("overrides"):
            key = (r["model"], r["quant"], r["seq"])
            rows.setdefault(key, {})[(r["target"], r["search"])] = r
    order = lambda k: (MODELS.index(k[0]), k[1], k[2])
    out = []
    for platform in ("tpu", "gpu"):
        cols = [t for t in TARGETS if REGISTRY[t].platform == platform]
        out += [
            "| model | method | S | " + " | ".join(f"`{t}`" for t in cols) + " |",
            "|---|---|---|" + "---|" * len(cols),
        ]
        for key in sorted(rows, key=order):
            got = [(rows[key].get((t, "none")), rows[key].get((t, "batch"))) for t in cols]
            cells = [_cell(_first(one, search), search) for one, search in got]
            out.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out[:-1])


BLOCKS = {"matrix": render_matrix, "rows": render}
END = "<!-- /plan_table.py -->"


def write_blocks(text: str, results: list[dict]) -> str:
    """``text`` with each generated block (``<!-- plan_table.py: NAME -->`` ... ``END``)
    replaced by its table rendered from ``results``."""
    for name, fn in BLOCKS.items():
        start = f"<!-- plan_table.py: {name} -->"
        if text.count(start) != 1:
            raise SystemExit(f"expected one {start!r} marker, found {text.count(start)}")
        head, rest = text.split(start)
        if END not in rest:
            raise SystemExit(f"no {END!r} after {start!r}")
        text = head + start + "\n" + fn(results) + "\n" + END + rest.split(END, 1)[1]
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSON-lines results (appended)")
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--quant", nargs="+", default=list(QUANT), choices=list(QUANT))
    ap.add_argument("--seq", nargs="+", type=int, default=[2048, 8192])
    ap.add_argument("--targets", nargs="+", default=TARGETS, choices=TARGETS)
    ap.add_argument("--layers", nargs="+", type=int, default=[None])
    ap.add_argument("--scan", nargs="+", default=["auto"], choices=["auto", "true", "false"])
    ap.add_argument("--search", default="none", choices=["none", "batch"])
    ap.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="recipe overrides for every row (e.g. train.optimizer=adamw_8bit), part of its key",
    )
    ap.add_argument("--render", action="store_true", help="print the markdown tables and exit")
    ap.add_argument("--write", type=Path, help="replace the generated blocks of this markdown file")
    ap.add_argument("--check", type=Path, help="exit 1 if this file's generated blocks are stale")
    args = ap.parse_args()
    done = (
        [json.loads(line) for line in args.out.read_text().splitlines()]
        if args.out.exists()
        else []
    )
    if args.render:
        print(render_matrix(done) + "\n\n" + render(done))
        return
    if args.write or args.check:
        path = args.write or args.check
        text = path.read_text()
        fresh = write_blocks(text, done)
        if args.write:
            path.write_text(fresh)
        elif fresh != text:
            raise SystemExit(f"{path}: the tables are stale: run tools/plan_table.py --write")
        return
    seen = {row_key(r) for r in done}
    grid = itertools.product(
        args.models, args.quant, args.seq, args.targets, args.layers, args.scan
    )
    with tempfile.TemporaryDirectory() as tmp:
        for model, quant, seq, target, layers, scan in grid:
            row = dict(
                model=model,
                quant=quant,
                seq=seq,
                target=target,
                layers=layers,
                scan=scan,
                search=args.search,
                overrides=list(args.set),
            )
            if row_key(row) in seen:
                continue
            result = run_row(row, Path(tmp))
            with args.out.open("a") as f:
                f.write(json.dumps(result) + "\n")
            print(json.dumps(result)[:300], flush=True)


if __name__ == "__main__":
    main()
