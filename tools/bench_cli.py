"""``python -m jaxlora.train`` against a plain PEFT (+ bitsandbytes) training loop, side by side,
on exactly the batches the CLI trained on (issue 15).

    python tools/bench_cli.py --shape 57m --mode lora  --out cli57_lora.json
    python tools/bench_cli.py --shape 57m --mode qlora --out cli57_qlora.json
    python tools/bench_cli.py --shape tiny --mode lora --rounds 1 --window 2-3  # a quick look
    python tools/bench_cli.py --shape 57m --mode lora train.loss_chunk=1024     # recipe keys

1. The cached random-init checkpoint of ``--shape`` (and its bitsandbytes NF4 + double-quant
   copy for qlora) is prepared as ``tools/bench_train.py`` prepares it
   (``bench_common.prepare_checkpoints``).
2. jaxlora's side is the CLI itself, in a subprocess: ``python -m jaxlora.train`` with
   ``--recipe`` (default ``demo``) and the overrides in :func:`cli_overrides` (the checkpoint,
   r 16 all-linear, dropout 0, rows of 256, batch 4, no eval/sampling/checkpoints, one
   metrics line a step), then any ``key=value`` given here. Its throughput is what it writes
   to ``metrics.jsonl``: ``tokens_per_sec`` = the step's real (non-padding) tokens / the step's
   wall time, the time from the end of the previous step's bookkeeping to the step's metrics
   on the host (batch assembly, the step, ``device_get``: ``jaxlora/training/loop.py``).
3. The reference is a plain loop over transformers + PEFT (+ bitsandbytes for qlora) in its
   own subprocess, importing no jaxlora and no jax. Its batches are the CLI's: a jaxlora
   process reads the first round's resolved ``config.yaml`` and builds them with the CLI's
   own pipeline (``data.build_datasets``, ``training.run.train_batches``), in the CLI's order,
   with the adapter the CLI starts from (``training.run.run_keys`` + ``init_lora``, written
   with ``save_adapter``) and the recipe's learning rate at every step (``make_tx``'s
   schedule). transformers gets ``input_ids``, ``position_ids`` (restarting per packed
   example, so its packed-sequence mask applies) and labels that are -100 where jaxlora's
   loss mask is 0, as ``shift_labels`` (already aligned, the way padding-free collators feed
   the Trainer) with ``num_items_in_batch`` = the step's trained tokens (the Trainer's
   gradient-accumulation loss). Optimizer: torch ``AdamW`` (fused, the Trainer default) with
   the recipe's betas, eps and weight decay after ``clip_grad_norm_``. Its step time is
   measured the same way (batch tensors made, forward, backward, clip, update, loss on the
   host) and written as the same metrics lines.
4. The sides alternate, CLI then PEFT, for ``--rounds`` rounds of fresh processes pinned to the
   same cores (``--cpus``) with the same glibc allocator settings (``--malloc``). Both run
   ``hi + 1`` steps of ``--window lo-hi`` (the extra step keeps each process busy past the
   window's last line) and are read the same way: tokens/s and step time are the medians over
   the window's metrics lines; CPU time per step is the process's user + system time
   (``/proc/<pid>/stat``, all threads) between the lines of steps ``lo - 1`` and ``hi``, read
   as they appear, divided by the steps (so it includes the loop's logging between steps);
   peak RSS is the whole process's (``wait4``); the first step (jax compile) is reported
   apart. After the first round the two first-step losses must agree to :func:`loss_bound`
   and both sides must report the same real and trained tokens and learning rate at every
   step; otherwise the batches or the models differ and no ratio is reported (exit 3).

Exit status: 0 done, 2 a setting or data this comparison cannot hold equal on both sides,
3 the sides disagree on the first step. CPU only (float32).

Each process imports only what it runs: jaxlora in the parent and the data step, torch (no
jax) in the reference's process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `tools.*` importable
    sys.path.insert(0, str(ROOT))

from tools import bench_common as bc  # noqa: E402

SIDES = ("jaxlora", "peft")
# Keys the harness sets itself: the window decides the steps, the harness reads every step's
# metrics line from a fresh directory per round.
OWN_KEYS = ("train.max_steps", "train.log_every", "output_dir", "train.resume")
# The reference's equivalent of what the recipe may choose; anything else is refused.
LORA_INITS = ("default", "random", "gaussian")  # pissa / loftq change the base weights
POLL_S = 0.01  # how often the parent reads the sides' metrics lines and CPU time
# float32 logits of a model: the project's model tolerance (the probe bound of bench_train).
LOGIT_TOL = bc.PROBE_BOUND["float32"]
LAYER_TOL = 1e-5  # a layer's float32 tolerance: the log-softmax of the loss is one more layer
UNIT_ROUNDOFF = 2.0**-24


class Refused(Exception):
    """A setting or data the two sides cannot run alike (exit status 2)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    cpu_shapes = sorted(n for n, s in bc.SHAPES.items() if not s.gpu_only)
    p.add_argument("--shape", choices=cpu_shapes, required=True)
    p.add_argument("--mode", choices=("lora", "qlora"), default="lora")
    p.add_argument("--recipe", default="demo", help="the CLI's recipe= (name or YAML path)")
    p.add_argument(
        "--tokenizer",
        default="assets/demo/base",
        help="model.tokenizer (the cached checkpoints have none); its ids must be < the vocab",
    )
    p.add_argument(
        "--window",
        default="5-12",
        help="steps LO-HI (1-based, inclusive) whose metrics are compared; each side runs "
        "HI + 1 steps, and step 1 (compile) is reported apart (LO >= 2)",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds per side, alternating")
    p.add_argument(
        "--attn",
        choices=("eager", "sdpa"),
        default="sdpa",
        help="transformers attn_implementation (sdpa: its default, what users run)",
    )
    p.add_argument(
        "--malloc",
        choices=("tuned", "default"),
        default="tuned",
        help="glibc allocator of both sides: jaxlora.training.host's settings (what the CLI "
        "applies to itself) or glibc's defaults",
    )
    p.add_argument("--cpus", type=int, default=None, help="pin both sides to the first N cores")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "jaxlora-bench")
    p.add_argument("--out", type=Path, default=None, help="write all results as JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="more CLI recipe keys")
    # internal: what a child process does
    p.add_argument(
        "--side", choices=("prepare", "data", "peft"), default=None, help=argparse.SUPPRESS
    )
    p.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        lo, hi = (int(x) for x in args.window.split("-"))
    except ValueError:
        p.error(f"--window must be LO-HI, e.g. 5-12; got {args.window!r}")
    if not 2 <= lo <= hi:
        p.error(f"--window needs 2 <= LO <= HI (step 1 compiles); got {args.window}")
    args.lo, args.hi = lo, hi
    # the sides run from the repository root (the demo recipe's relative paths): make the
    # caller's paths absolute first
    args.cache_dir = args.cache_dir.expanduser().resolve()
    if args.recipe.endswith((".yaml", ".yml")) or "/" in args.recipe:
        args.recipe = str(Path(args.recipe).expanduser().resolve())
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    for text in args.overrides:
        key = text.partition("=")[0]
        if "=" not in text or key == "recipe":
            p.error(f"{text!r}: give recipe keys as key=value (and the recipe with --recipe)")
        if key in OWN_KEYS:
            p.error(f"{key} is set by the harness (--window, one fresh directory per round)")
    usable = sorted(os.sched_getaffinity(0))
    args.cpus = len(usable) if args.cpus is None else args.cpus
    if not 1 <= args.cpus <= len(usable):
        p.error(f"--cpus must be in 1..{len(usable)}, got {args.cpus}")
    args.cpu_set = usable[: args.cpus]
    args.device, args.dtype = "cpu", "float32"  # what bench_common's preparation is asked for
    return args


def _base_dir(args) -> Path:
    dirs = bc.checkpoint_dirs(args.cache_dir, args.shape, args.dtype)
    return dirs["bnb" if args.mode == "qlora" else "dense"]


def cli_overrides(args, output_dir: Path) -> list[str]:
    """The CLI's arguments: the recipe, this benchmark's settings, the caller's keys, and the
    keys the harness owns (the window's steps, a metrics line every step, the directory)."""
    quant = (
        ["quant.type=nf4", "quant.blocksize=64", "quant.double_quant=true"]
        if args.mode == "qlora"
        else ["quant.type=none"]
    )
    return [
        f"recipe={args.recipe}",
        f"model.path={_base_dir(args)}",
        f"model.tokenizer={args.tokenizer}",
        "model.dtype=float32",
        "model.compute_dtype=float32",
        "quant.compute_dtype=float32",
        *quant,
        "lora.r=16",
        "lora.alpha=32",
        "lora.target_modules=all-linear",
        "lora.dropout=0",
        # B != 0 from the start (PEFT's init_lora_weights=False), so the first-step loss checks
        # the adapter too, not only the base; the step costs the same.
        "lora.init=random",
        "data.max_seq_len=256",
        "data.eval_path=null",  # no held-out set: nothing but training in the process
        "train.batch_size=4",
        "train.eval_every=0",
        "train.save_every=0",
        "train.sample_every=0",
        "train.exact_match_examples=0",
        *args.overrides,
        f"train.max_steps={args.hi + 1}",
        "train.log_every=1",
        f"output_dir={output_dir}",
    ]


# ---- the data step (a jaxlora process): the CLI's batches, adapter and learning rates -------


def check_config(cfg, args) -> None:
    """Refuse a resolved config the reference loop cannot run the same way (:class:`Refused`)."""
    t, lc = cfg.train, cfg.lora
    want_quant = "nf4" if args.mode == "qlora" else "none"
    problems = [
        (cfg.model.path != str(_base_dir(args)), f"model.path must be {_base_dir(args)}"),
        (cfg.model.dtype != "float32", "model.dtype must be float32"),
        (cfg.model.compute_dtype != "float32", "model.compute_dtype must be float32"),
        (cfg.quant.type != want_quant, f"quant.type must be {want_quant} for --mode {args.mode}"),
        (
            want_quant == "nf4" and (cfg.quant.blocksize != 64 or not cfg.quant.double_quant),
            "qlora reads bitsandbytes' NF4 copy: quant.blocksize=64, quant.double_quant=true",
        ),
        (
            want_quant == "nf4" and cfg.quant.compute_dtype != "float32",
            "quant.compute_dtype must be float32",
        ),
        (lc.dropout != 0, "lora.dropout must be 0 (the two sides draw different masks)"),
        (lc.init not in LORA_INITS, f"lora.init must be one of {', '.join(LORA_INITS)}"),
        (lc.loraplus_lr_ratio is not None, "lora.loraplus_lr_ratio is not in the reference loop"),
        (t.modules_to_save_lr is not None, "train.modules_to_save_lr is not in the reference"),
        (t.optimizer != "adamw", "train.optimizer must be adamw (torch AdamW on the other side)"),
        (t.max_steps != args.hi + 1, f"train.max_steps must be {args.hi + 1}"),
    ]
    bad = [why for wrong, why in problems if wrong]
    if bad:
        raise Refused("the reference loop cannot run this config alike: " + "; ".join(bad))


def build_data(args) -> None:
    """From the first CLI round's ``config.yaml``: the adapter the CLI starts from, its batches
    in its order (``[steps, grad_accum, rows, seq]`` per key) and learning rate per step, and
    the optimizer settings, written to ``--workdir`` for the reference's processes."""
    from jaxlora import data
    from jaxlora.config import load_config
    from jaxlora.training.run import init_lora, load_base, make_tx, run_keys, train_batches

    cfg = load_config(str(args.workdir / "jaxlora-1" / "config.yaml"))
    check_config(cfg, args)
    t, steps = cfg.train, cfg.train.max_steps
    model = load_base(cfg)
    init_key, _ = run_keys(t.seed)
    model, _, trainable = init_lora(cfg, model, init_key)
    model.save_adapter(args.workdir / "adapter")
    train_ds, _ = data.build_datasets(cfg.data, model.tokenizer, cfg.data_seed)
    it = train_batches(cfg, train_ds)
    micro = [[next(it) for _ in range(t.grad_accum)] for _ in range(steps)]
    arrays = {k: np.stack([np.stack([b[k] for b in m]) for m in micro]) for k in micro[0][0]}
    try:
        real = arrays["input_ids"][arrays["segment_ids"] != 0]
        bc.check_tokens(real, model.config.vocab_size, "the CLI's batches")
    except bc.DegenerateTokensError as e:
        raise Refused(f"{e} (model.tokenizer={cfg.model.tokenizer})") from e
    _, schedule = make_tx(cfg, steps, trainable)
    np.savez(args.workdir / "batches.npz", **arrays)
    settings = {
        "lr": [float(schedule(s)) for s in range(steps)],
        "betas": [t.adam_beta1, t.adam_beta2],
        "eps": t.adam_eps,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "remat": t.remat != "none",
    }
    (args.workdir / "settings.json").write_text(json.dumps(settings))


# ---- the reference: a plain transformers + PEFT (+ bitsandbytes) loop (torch only) -----------


def run_peft(args) -> None:
    """Train ``hi + 1`` steps on the CLI's batches; one metrics line a step, as the CLI's."""
    import torch

    s = json.loads((args.workdir / "settings.json").read_text())
    batches = dict(np.load(args.workdir / "batches.npz"))
    model = bc.peft_model(
        _base_dir(args),
        args.workdir / "adapter",
        mode=args.mode,
        dtype=args.dtype,
        attn=args.attn,
        remat=s["remat"],
    ).train()
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: the Trainer's default optimizer (adamw_torch_fused) with torch >= 2.8, CPU included
    opt = torch.optim.AdamW(
        params,
        lr=s["lr"][0],
        betas=tuple(s["betas"]),
        eps=s["eps"],
        weight_decay=s["weight_decay"],
        fused=True,
    )
    max_norm = s["max_grad_norm"] if s["max_grad_norm"] > 0 else math.inf  # 0: no clipping
    out = args.workdir / "peft" / "metrics.jsonl"
    out.parent.mkdir(exist_ok=True)
    prev = time.perf_counter()
    for step in range(1, len(s["lr"]) + 1):
        micro = {k: torch.from_numpy(v[step - 1]) for k, v in batches.items()}  # [accum, B, S]
        trained = micro["loss_mask"] > 0
        labels = torch.where(trained, micro["targets"], -100).long()
        n_items = trained.sum()
        for group in opt.param_groups:
            group["lr"] = s["lr"][step - 1]
        loss = torch.zeros(())
        for a in range(labels.shape[0]):
            # use_cache=False: with a cache object transformers skips its packed-sequence mask
            mb = model(
                input_ids=micro["input_ids"][a].long(),
                position_ids=micro["positions"][a].long(),
                labels=labels[a],
                shift_labels=labels[a],
                num_items_in_batch=n_items,
                use_cache=False,
            ).loss
            mb.backward()
            loss += mb.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        record = {"step": step, "loss": float(loss), "grad_norm": float(grad_norm)}
        now = time.perf_counter()
        step_time = now - prev
        tokens = int((micro["segment_ids"] != 0).sum())
        record |= {
            "lr": s["lr"][step - 1],
            "tokens": tokens,
            "trained_tokens": int(n_items),
            "tokens_per_sec": tokens / step_time,
            "step_time": step_time,
        }
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")
        prev = time.perf_counter()
    info = {
        "threads": {
            "torch_intra_op": torch.get_num_threads(),
            "torch_inter_op": torch.get_num_interop_threads(),
        },
        "imports_jax": "jax" in sys.modules,
    }
    (args.workdir / "peft" / "info.json").write_text(json.dumps(info))


# ---- the parent: run a side and watch it ------------------------------------------------------


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` so far (all its threads), or None once gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def watch(cmd: list[str], env: dict, metrics: Path, log: Path, cpus: set[int]) -> dict:
    """Run ``cmd`` to its end, reading each new line of ``metrics`` as it appears together with
    the process's CPU time at that moment; returns the records, ``cpu_s`` by step, the peak
    RSS (``wait4``'s ``ru_maxrss``) and the exit status."""
    records, cpu_at, seen = [], {}, 0
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        )
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if metrics.exists():
                text = metrics.read_text()
                whole = text[: text.rfind("\n") + 1]  # complete lines only
                new = whole[seen:]
                seen = len(whole)
                cpu = _cpu_seconds(proc.pid) if pid == 0 else None
                for line in new.splitlines():
                    rec = json.loads(line)
                    records.append(rec)
                    cpu_at[rec["step"]] = cpu
            if pid != 0:
                break
            time.sleep(POLL_S)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "returncode": proc.returncode,
        "records": records,
        "cpu_at": cpu_at,
        "peak_rss": usage.ru_maxrss * 1024,
    }


def round_result(run: dict, lo: int, hi: int, threads: dict) -> dict:
    """One process's numbers over the window, in ``bench_common.aggregate``'s terms."""
    by_step = {r["step"]: r for r in run["records"]}
    missing = [s for s in range(1, hi + 1) if s not in by_step]
    if missing:
        raise RuntimeError(f"metrics.jsonl has no line for step(s) {missing}")
    window = [by_step[s] for s in range(lo, hi + 1)]
    start, end = run["cpu_at"].get(lo - 1), run["cpu_at"].get(hi)
    if start is None or end is None:
        raise RuntimeError(f"the process's CPU time was not read at steps {lo - 1} and {hi}")
    first = by_step[1]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_sec"] for r in window),
        "step_times": [r["step_time"] for r in window],
        "tokens": [r["tokens"] for r in window],
        "first_step_s": first.get("compile_time", first.get("step_time")),
        "cpu_s": end - start,
        "losses": [by_step[s]["loss"] for s in range(1, hi + 1)],
        "records": run["records"],
        "device": "cpu",
        "threads": threads,
        "peak_memory": run["peak_rss"],
        "peak_memory_training": None,  # another process's RSS peak cannot be reset
        "memory_kind": "host peak RSS of the whole process (wait4)",
    }


def loss_bound(loss: float, trained_tokens: int) -> float:
    """How far two float32 first-step losses (the token mean of the cross-entropy of the same
    model on the same batch) may differ: ``2·δ + ε + 2·(n + 1)·u·|loss|``.

    * ``δ`` = 1e-4, the project's float32 model tolerance on logits (bench_train's probe):
      ``ce = logsumexp(z) − z_target`` moves by at most ``δ`` through each term.
    * ``ε`` = 1e-5, a layer's tolerance, for the log-softmax computed in float32 on each side.
    * the mean over ``n`` trained tokens: a sum of ``n`` terms rounds by at most ``(n − 1)·u``
      of itself in any order, the division by ``u`` more (``u = 2⁻²⁴``), on either side.
    """
    return 2 * LOGIT_TOL + LAYER_TOL + 2 * (trained_tokens + 1) * UNIT_ROUNDOFF * abs(loss)


def agreement(ours: list[dict], ref: list[dict]) -> dict:
    """Whether the two sides ran the same first step on the same batches: every step's real
    and trained tokens and learning rate equal, the first-step losses within
    :func:`loss_bound`. Also the first-step gradient norms' relative difference (reported)."""
    a, b = {r["step"]: r for r in ours}, {r["step"]: r for r in ref}
    steps = sorted(set(a) & set(b))
    differ = [
        f"step {s} {k}: {a[s][k]} vs {b[s][k]}"
        for s in steps
        for k in ("tokens", "trained_tokens", "lr")
        if a[s][k] != b[s][k]
    ]
    if set(a) != set(b):
        differ.append(f"steps {sorted(set(a) ^ set(b))} on one side only")
    la, lb = a[1]["loss"], b[1]["loss"]
    bound = loss_bound(lb, b[1]["trained_tokens"])
    diff = abs(la - lb)
    return {
        "loss": {"jaxlora": la, "peft": lb, "abs_diff": diff, "bound": bound},
        "grad_norm_rel_diff": abs(a[1]["grad_norm"] - b[1]["grad_norm"]) / b[1]["grad_norm"],
        "differences": differ,
        "ok": not differ and diff <= bound,
    }


def _spawn_child(args, side: str, env: dict) -> None:
    """A prepare or data step in its own process; :class:`Refused` there is exit status 2."""
    cmd = [sys.executable, __file__, *_child_argv(args), "--side", side]
    cmd += ["--workdir", str(args.workdir)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode == 2:
        raise Refused(proc.stderr.strip().splitlines()[-1].removeprefix("bench_cli: refused: "))
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"bench_cli: the {side} step failed (exit {proc.returncode})")


def _child_argv(args) -> list[str]:
    """The options a child needs to agree with the parent."""
    out = ["--shape", args.shape, "--mode", args.mode, "--window", f"{args.lo}-{args.hi}"]
    return out + ["--attn", args.attn, "--cache-dir", str(args.cache_dir)]


def run_round(args, side: str, r: int, env: dict) -> dict:
    if side == "jaxlora":
        directory = args.workdir / f"jaxlora-{r}"
        cmd = [sys.executable, "-m", "jaxlora.train", *cli_overrides(args, directory)]
        threads = {"xla": f"default (sees {len(args.cpu_set)} cores)"}
    else:
        directory = args.workdir / "peft"
        shutil.rmtree(directory, ignore_errors=True)
        cmd = [sys.executable, __file__, *_child_argv(args), "--side", "peft"]
        cmd += ["--workdir", str(args.workdir)]
    log = args.workdir / f"{side}-{r}.log"
    run = watch(cmd, env, directory / "metrics.jsonl", log, set(args.cpu_set))
    if run["returncode"] != 0:
        sys.stderr.write(log.read_text()[-8000:])
        raise SystemExit(f"bench_cli: {side} round {r} failed (exit {run['returncode']})")
    if side == "peft":
        info = json.loads((directory / "info.json").read_text())
        threads = info["threads"]
        if info["imports_jax"]:
            raise RuntimeError("the reference's process imported jax")
    return round_result(run, args.lo, args.hi, threads)


def _same_config(args, r: int) -> None:
    """Every CLI round resolved the same config (but its directory) as the first."""
    first = (args.workdir / "jaxlora-1" / "config.yaml").read_text()
    this = (args.workdir / f"jaxlora-{r}" / "config.yaml").read_text()
    if first.replace("jaxlora-1", f"jaxlora-{r}") != this:
        raise RuntimeError(f"CLI round {r} resolved another config than round 1")


def compare(args) -> int:
    from jaxlora.config import ConfigError, config_from_argv
    from tools import bench_train  # jaxlora (and so jax) in the parent only

    try:  # refuse what the reference cannot run alike before anything runs
        cfg = config_from_argv(cli_overrides(args, Path("round")))
    except ConfigError as e:
        raise Refused(f"the CLI refuses its arguments: {e}") from e
    check_config(cfg, args)
    env = bench_train.child_env(args)
    info = {
        "machine": bc.machine(),
        "versions": bc.versions(),
        "settings": {
            k: str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
            if k not in ("side", "workdir", "cpu_set")
        },
        "env": {k: os.environ.get(k) for k in bench_train.ENV_RECORDED}
        | (bench_train.malloc_settings(args) or {"MALLOC_*": "glibc defaults"}),
        "cli": ["python", "-m", "jaxlora.train", *cli_overrides(args, Path("<round dir>"))],
    }
    print(json.dumps(info, indent=1))
    ref_name = "PEFT+bnb" if args.mode == "qlora" else "PEFT"
    rounds: dict[str, list] = {s: [] for s in SIDES}
    with tempfile.TemporaryDirectory(prefix="bench_cli_") as tmp:
        args.workdir = Path(tmp)
        t0 = time.perf_counter()
        _spawn_child(args, "prepare", env)
        print(f"prepared the checkpoint in {time.perf_counter() - t0:.1f} s")
        for r in range(1, args.rounds + 1):
            for side in SIDES:
                rounds[side].append(run_round(args, side, r, env))
                if side == "jaxlora" and r == 1:  # the CLI's batches for the reference
                    _spawn_child(args, "data", env)
                elif side == "jaxlora":
                    _same_config(args, r)
                res = rounds[side][-1]
                print(
                    f"round {r}/{args.rounds} {side:8s}: {res['tokens_per_s']:,.0f} tokens/s "
                    f"(median of steps {args.lo}-{args.hi}), first step "
                    f"{res['first_step_s']:.2f} s, load {os.getloadavg()[0]:.2f}"
                )
            if r == 1:
                check = agreement(rounds["jaxlora"][0]["records"], rounds["peft"][0]["records"])
                loss = check["loss"]
                print(
                    f"first-step loss: jaxlora {loss['jaxlora']:.7f}, {ref_name} "
                    f"{loss['peft']:.7f}: |diff| {loss['abs_diff']:.2g} (bound "
                    f"{loss['bound']:.2g}); grad norm relative diff "
                    f"{check['grad_norm_rel_diff']:.2g}"
                )
                if not check["ok"]:
                    why = "; ".join(check["differences"]) or "the first-step losses differ"
                    print(
                        f"bench_cli: refused: the two sides did not run the same first step "
                        f"({why}): the batches or the models differ",
                        file=sys.stderr,
                    )
                    return 3
    remat = cfg.train.remat != "none"
    flops = bc.flops_per_token(bc.SHAPES[args.shape], cfg.data.max_seq_len, cfg.lora.r, remat)
    agg = {s: bc.aggregate(rounds[s], flops, args.dtype) for s in SIDES}
    ratio = bc.ratios(agg["jaxlora"], agg["peft"])
    drift = max(
        abs(x - y) / abs(y)
        for x, y in zip(rounds["jaxlora"][0]["losses"], rounds["peft"][0]["losses"], strict=True)
    )
    print(f"losses of steps 1-{args.hi} (round 1): max relative difference {drift:.2g}")
    for s in SIDES:
        print(f"{s}: threads {agg[s]['threads']}, memory = {agg[s]['memory_kind']}")
    print(bc.table({"jaxlora CLI": agg["jaxlora"], ref_name: agg["peft"]}, ratio, ref_name))
    info["machine"]["loadavg_end"] = list(os.getloadavg())
    load = max(info["machine"]["loadavg"][0], info["machine"]["loadavg_end"][0])
    if warning := bc.contention_warning(load, args.cpus):
        print(warning)
    if args.out:
        results = info | {
            "agreement": check,
            "loss_drift": drift,
            "sides": {"jaxlora CLI": agg["jaxlora"], ref_name: agg["peft"]},
            "ratio": ratio,
        }
        args.out.write_text(json.dumps(results, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        if args.side == "prepare":
            bc.prepare_checkpoints(args.cache_dir, args.shape, args.dtype, args.mode, args.device)
        elif args.side == "data":
            build_data(args)
        elif args.side == "peft":
            run_peft(args)
        else:
            return compare(args)
    except Refused as e:
        print(f"bench_cli: refused: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
