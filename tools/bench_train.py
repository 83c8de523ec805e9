"""LoRA / QLoRA training throughput: jaxlora against transformers + PEFT (+ bitsandbytes).

    python tools/bench_train.py --shape tiny --mode lora  --out lora.json    # CPU
    python tools/bench_train.py --shape tiny --mode qlora --out qlora.json   # CPU
    python tools/bench_train.py --shape llama-8b --mode qlora --batch 2 --seq 2048 --remat on
    python tools/bench_train.py --shape 57m --mode lora --loss-chunk 0       # whole logits

One random-init Hugging Face checkpoint of the shape is built once (cached under
``--cache-dir``); QLoRA uses one bitsandbytes NF4 + double-quant copy of it, made by
transformers + bitsandbytes and read as stored by both sides, so both train the same 4-bit
weights. One LoRA adapter (``all-linear``, dropout 0, ``--init``) is created by jaxlora and
exported with ``save_adapter``; PEFT loads that file. Both sides then train under the same
settings: same packed batches of random token ids (several documents per row, positions
restarting at 0; transformers sees the packing through ``position_ids``), same token-mean
cross-entropy, AdamW with the same hyper-parameters after global-norm clipping (torch: fused
AdamW, the Trainer default; jaxlora: ``optax.adamw``), layer remat on both or neither.

Before timing, each side computes logits of a probe batch in a subprocess; the run is refused
when they differ by more than the bound (float32: 1e-4). Then the two sides train in turn,
A B A B ..., each round in a fresh subprocess (so peak RSS / device memory belongs to one side):
the first step (jax compile / torch first step) and ``--warmup - 1`` more steps are excluded
and the compile time reported; ``--steps`` steps are timed, each synchronised.
Exit status: 0 done, 2 bad input (e.g. an all-zero token file), 3 probe logits differ.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `tools.*` and `jaxlora` importable
    sys.path.insert(0, str(ROOT))

from jaxlora.config.recipe import TrainConfig  # noqa: E402
from tools import bench_common as bc  # noqa: E402

SIDES = ("jaxlora", "peft")
ENV_RECORDED = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "XLA_FLAGS", "JAX_DEFAULT_MATMUL_PRECISION")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", choices=sorted(bc.SHAPES), default="tiny")
    p.add_argument("--mode", choices=("lora", "qlora"), default="lora")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per round (>= 1)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per side, alternating")
    p.add_argument(
        "--remat",
        choices=("off", "on", "offload"),
        default="off",
        help="offload: jaxlora's remat=offload (matmul outputs in host memory); PEFT: no remat",
    )
    p.add_argument(
        "--optimizer",
        choices=("adamw", "adamw_8bit", "adafactor", "lion", "sgd"),
        default="adamw",
        help="jaxlora's train.optimizer; PEFT: bnb AdamW8bit for adamw_8bit, else torch AdamW",
    )
    p.add_argument(
        "--optimizer-offload",
        choices=("none", "host"),
        default="none",
        help="jaxlora's train.optimizer_offload (state in pinned_host between updates)",
    )
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None, help="default: 2 x rank")
    p.add_argument(
        "--init",
        choices=("random", "default"),
        default="random",
        help="random: B != 0 too, so the probe checks the adapter",
    )
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument(
        "--attn",
        choices=("eager", "sdpa"),
        default="eager",
        help="transformers attn_implementation (jaxlora's is eager-style)",
    )
    p.add_argument(
        "--jax-attn",
        choices=("eager", "chunked", "auto"),
        default="eager",
        help="jaxlora's attention; auto: what python -m jaxlora.train picks on these devices "
        "for rows of --seq tokens (a GPU: Pallas flash; a TPU: splash; CPU: chunked from 1024)",
    )
    p.add_argument(
        "--loss-chunk",
        type=int,
        default=TrainConfig.loss_chunk,
        help="jaxlora's train.loss_chunk: tokens per chunk of the cross-entropy, 0 = whole "
        "logits (default: the recipe default)",
    )
    p.add_argument(
        "--mlp-chunk",
        type=int,
        default=TrainConfig.mlp_chunk,
        help="jaxlora's train.mlp_chunk: tokens per tile of every layer's MLP, 0 = whole "
        "sequences (default: the recipe default)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="default: float32 on CPU, bfloat16 on GPU",
    )
    p.add_argument(
        "--malloc",
        choices=("tuned", "default"),
        default="tuned",
        help="glibc allocator for both sides: jaxlora.training.host's settings (what "
        "python -m jaxlora.train applies) or glibc's defaults",
    )
    p.add_argument(
        "--cpus",
        type=int,
        default=None,
        help="pin each side to the first N usable cores (default: all)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: --cpus)")
    p.add_argument(
        "--tokens",
        type=Path,
        default=None,
        help=".npy of token ids to cut documents from (default: random ids)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "jaxlora-bench")
    p.add_argument("--out", type=Path, default=None, help="write all results as JSON")
    p.add_argument(
        "--perturb",
        choices=SIDES,
        default=None,
        help="testing the refusal: shift one adapter weight on this side",
    )
    # internal: what a child process does
    p.add_argument("--side", choices=(*SIDES, "prepare"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--task", choices=("probe", "time"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.alpha is None:
        args.alpha = 2.0 * args.rank
    if args.device == "auto":
        gpu = shutil.which("nvidia-smi") and Path("/dev/nvidia0").exists()
        args.device = "gpu" if gpu else "cpu"
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "gpu" else "float32"
    usable = sorted(os.sched_getaffinity(0))
    args.cpus = len(usable) if args.cpus is None else args.cpus
    if not 1 <= args.cpus <= len(usable):
        p.error(f"--cpus must be in 1..{len(usable)}, got {args.cpus}")
    args.cpu_set = usable[: args.cpus]
    args.threads = args.cpus if args.threads is None else args.threads
    if args.loss_chunk < 0:
        p.error(f"--loss-chunk must be >= 0 (0 = whole logits), got {args.loss_chunk}")
    if args.mlp_chunk < 0:
        p.error(f"--mlp-chunk must be >= 0 (0 = whole sequences), got {args.mlp_chunk}")
    for name in ("batch", "seq", "steps", "warmup", "rounds", "rank", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if bc.SHAPES[args.shape].gpu_only and args.device != "gpu":
        p.error(f"--shape {args.shape} is GPU only (use --shape tiny on CPU)")
    return args


def _dirs(args) -> dict[str, Path]:
    dirs = bc.checkpoint_dirs(args.cache_dir, args.shape, args.dtype)
    return dirs | {"adapter": args.workdir / "adapter"}


# ---- prepare: checkpoint (cached), bnb copy (cached), adapter --------------------------------


def prepare(args) -> None:
    bc.prepare_checkpoints(args.cache_dir, args.shape, args.dtype, args.mode, args.device)
    import jax

    import jaxlora
    from jaxlora.lora import LoraConfig

    d = _dirs(args)
    base = jaxlora.load_model(d["dense"], dtype=args.dtype, tokenizer=False)
    cfg = LoraConfig(
        r=args.rank, alpha=args.alpha, dropout=0.0, target_modules="all-linear", init=args.init
    )
    base.apply_lora(cfg, key=jax.random.key(args.seed)).save_adapter(d["adapter"])


# ---- the two sides ------------------------------------------------------------------------------


class JaxloraSide:
    """jaxlora: ``load_model(..., adapter=)`` -> partition -> jitted ``make_train_step``."""

    def __init__(self, args, probe: bool):
        import jax
        import optax

        import jaxlora
        from jaxlora import lora
        from jaxlora.training.optim import make_optimizer
        from jaxlora.training.step import make_train_step

        if probe:  # full float32 matmuls (no TF32 on GPU) for the 1e-4 comparison
            jax.config.update("jax_default_matmul_precision", "highest")
        self.jax, d = jax, _dirs(args)
        base = d["bnb"] if args.mode == "qlora" else d["dense"]
        model = jaxlora.load_model(base, dtype=args.dtype, adapter=d["adapter"], tokenizer=False)
        if args.perturb == "jaxlora":
            q_proj = model.params["model"]["layers"]["0"]["self_attn"]["q_proj"]
            q_proj["weight"] = q_proj["weight"].replace(b=q_proj["weight"].b + 0.01)
        self.model = model
        self.frozen, self.trainable = lora.partition(model.params, model.lora)
        tx = make_optimizer(
            optax.constant_schedule(args.lr),
            name=args.optimizer,
            weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm,
        )
        self.opt_state = tx.init(self.trainable)
        memory, out = None, {}
        if args.optimizer_offload == "host":
            dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            here = jax.tree.map(lambda _: dev, self.opt_state)
            host = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), here)
            memory, out = (here, host), {"out_shardings": (None, host, None)}
            self.opt_state = jax.device_put(self.opt_state, host)
        remat = {"off": "none", "on": "full", "offload": "offload"}[args.remat]
        attn = args.jax_attn
        if attn == "auto":
            from jaxlora.models.attention import AttentionImpl
            from jaxlora.weights import kernels_for

            attn = AttentionImpl(kernels_for(jax.devices(), seq_len=args.seq).attention)
        self.attention = attn if isinstance(attn, str) else attn.name
        module = model.module(remat=remat, mlp_chunk=args.mlp_chunk).clone(attn_impl=attn)
        self._step = jax.jit(
            make_train_step(
                module,
                lora.combine,
                tx,
                dropout=False,
                loss_chunk=args.loss_chunk,
                state_memory=memory,
            ),
            donate_argnums=(0, 1),
            **out,
        )
        self._fwd = jax.jit(lambda p, i, pos, seg: module.apply({"params": p}, i, pos, seg)[0])
        self._key = jax.random.key(0)
        self.device_name = jax.devices()[0].device_kind
        self.threads = {"xla": f"default (sees {len(os.sched_getaffinity(0))} cores)"}

    def put(self, batch: dict) -> dict:
        return {k: self.jax.device_put(v[None]) for k, v in batch.items()}  # [accum=1, B, S]

    def logits(self, batch: dict) -> np.ndarray:
        b = {k: self.jax.device_put(v) for k, v in batch.items()}
        out = self._fwd(self.model.params, b["input_ids"], b["positions"], b["segment_ids"])
        return np.asarray(out, np.float32)

    def step(self, batch: dict) -> float:
        self.trainable, self.opt_state, m = self._step(
            self.trainable, self.opt_state, self.frozen, batch, self._key
        )
        self.jax.block_until_ready((self.trainable, self.opt_state))
        return float(m["loss"])

    def peak_device_memory(self) -> int | None:
        stats = self.jax.local_devices()[0].memory_stats()
        return None if not stats else stats.get("peak_bytes_in_use")


class PeftSide:
    """transformers (+ bitsandbytes) + ``PeftModel.from_pretrained(..., is_trainable=True)``."""

    def __init__(self, args, probe: bool):
        import torch

        torch.set_num_threads(args.threads)
        self.torch, d = torch, _dirs(args)
        self.dev = torch.device("cuda" if args.device == "gpu" else "cpu")
        model = bc.peft_model(
            d["bnb"] if args.mode == "qlora" else d["dense"],
            d["adapter"],
            mode=args.mode,
            dtype=args.dtype,
            attn=args.attn,
            device=str(self.dev),
            remat=args.remat == "on",
        )
        if probe and args.mode == "qlora":  # bnb's exact semantics (see test_bnb_checkpoints)
            import bitsandbytes as bnb

            for m in model.modules():
                if isinstance(m, bnb.nn.Linear4bit):
                    m.support_avx512bf16_for_cpu = False
        if args.perturb == "peft":
            q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
            with torch.no_grad():
                q_proj.lora_B["default"].weight += 0.01
        self.model = model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        if args.optimizer == "adamw_8bit":
            import bitsandbytes as bnb

            self.opt = bnb.optim.AdamW8bit(self.params, lr=args.lr, weight_decay=args.weight_decay)
        else:
            self.opt = torch.optim.AdamW(
                self.params, lr=args.lr, weight_decay=args.weight_decay, fused=True
            )
        self.max_grad_norm = args.max_grad_norm
        self.attention = args.attn  # transformers' attn_implementation
        self.device_name = torch.cuda.get_device_name() if self.dev.type == "cuda" else "cpu"
        self.threads = {
            "torch_intra_op": torch.get_num_threads(),
            "torch_inter_op": torch.get_num_interop_threads(),
        }

    def put(self, batch: dict) -> dict:
        t = self.torch
        out = {k: t.as_tensor(v).to(self.dev) for k, v in batch.items()}
        for k in ("input_ids", "targets", "positions"):
            out[k] = out[k].long()
        return out

    def _logits(self, b: dict):
        # use_cache=False: with a cache object transformers skips its packed-sequence mask.
        return self.model(
            input_ids=b["input_ids"], position_ids=b["positions"], use_cache=False
        ).logits

    def logits(self, batch: dict) -> np.ndarray:
        self.model.eval()
        with self.torch.no_grad():
            out = self._logits(self.put(batch)).float().cpu().numpy()
        self.model.train()
        return out

    def step(self, b: dict) -> float:
        t = self.torch
        logits = self._logits(b).float()
        ce = t.nn.functional.cross_entropy(
            logits.view(-1, logits.shape[-1]), b["targets"].view(-1), reduction="none"
        )
        mask = b["loss_mask"].view(-1)
        loss = (ce * mask).sum() / mask.sum().clamp(min=1.0)
        loss.backward()
        t.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.dev.type == "cuda":
            t.cuda.synchronize()
        return float(loss.detach())

    def peak_device_memory(self) -> int | None:
        return self.torch.cuda.max_memory_allocated() if self.dev.type == "cuda" else None


# ---- a child process: probe or time one side --------------------------------------------------


def _stream(args) -> np.ndarray | None:
    return None if args.tokens is None else np.load(args.tokens).reshape(-1)


def probe_batch(args) -> dict:
    seq = min(args.seq, 96)
    vocab = bc.SHAPES[args.shape].vocab
    return bc.packed_batches(1, 2, seq, vocab, seed=args.seed + 99, stream=_stream(args))[0]


def run_child(args) -> dict:
    if args.side == "prepare":
        prepare(args)
        return {}
    probe = args.task == "probe"
    side = (JaxloraSide if args.side == "jaxlora" else PeftSide)(args, probe)
    if probe:
        np.save(args.workdir / f"probe_{args.side}.npy", side.logits(probe_batch(args)))
        return {}
    vocab = bc.SHAPES[args.shape].vocab
    n = args.warmup + args.steps
    host = bc.packed_batches(
        min(n, 8), args.batch, args.seq, vocab, seed=args.seed, stream=_stream(args)
    )
    batches = [side.put(b) for b in host]
    after_load = bc.rss_bytes()["rss"]
    t0 = time.perf_counter()
    losses = [side.step(batches[0])]
    first = time.perf_counter() - t0
    for i in range(1, args.warmup):
        losses.append(side.step(batches[i % len(batches)]))
    reset = bc.reset_peak_rss()
    times, cpu0 = [], bc.cpu_seconds()
    for i in range(args.warmup, n):
        t0 = time.perf_counter()
        losses.append(side.step(batches[i % len(batches)]))
        times.append(time.perf_counter() - t0)
    cpu = bc.cpu_seconds() - cpu0
    rss = bc.rss_bytes()
    gpu = args.device == "gpu"
    return {
        "step_times": times,
        "first_step_s": first,
        "losses": losses,
        "cpu_s": cpu,
        "tokens_per_step": args.batch * args.seq,
        "device": side.device_name,
        "threads": side.threads,
        "attention": side.attention,
        "rss_after_load": after_load,
        "peak_memory": side.peak_device_memory() if gpu else bc.rss_bytes()["peak_rss"],
        "peak_memory_training": None if gpu or not reset else rss["peak_rss"],
        "memory_kind": "device (peak allocated)" if gpu else "host peak RSS",
    }


# ---- the parent: prepare, probe, alternate, report -------------------------------------------


def malloc_settings(args) -> dict[str, str]:
    """``--malloc tuned``: jaxlora.training.host's glibc settings (what ``python -m jaxlora.train``
    applies to itself) as start-up environment variables, for PEFT's process and jaxlora's
    alike; ``default``: none, glibc's defaults for both."""
    from jaxlora.training.host import malloc_env

    return malloc_env() if args.malloc == "tuned" else {}


def child_env(args) -> dict[str, str]:
    """The environment of every side's process: offline, quiet transformers, JAX on the
    benchmark's device, and the same glibc allocator settings (``--malloc``) for both sides as
    start-up variables, with jaxlora adding nothing on top of them."""
    env = dict(
        os.environ,
        TRANSFORMERS_VERBOSITY="error",
        HF_HUB_OFFLINE="1",
        JAX_PLATFORMS="cuda" if args.device == "gpu" else "cpu",
    )
    env = {k: v for k, v in env.items() if not k.startswith("MALLOC_")}
    env |= malloc_settings(args)
    env["JAXLORA_HOST_ALLOCATOR"] = "default"  # nothing on top of what the environment says
    return env


def _spawn(argv: list[str], args, side: str, task: str | None = None) -> dict:
    out = args.workdir / f"{side}-{task}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, __file__, *argv, "--side", side, "--workdir", str(args.workdir)]
    cmd += ["--task", task] if task else []
    env = child_env(args) | {"BENCH_RESULT": str(out)}
    if side == "prepare":  # torch (bnb quantization) and jax share this process's GPU
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    cpus = set(args.cpu_set)
    proc = subprocess.run(
        cmd,
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(
            f"bench_train: the {side} {task or ''} subprocess failed (exit {proc.returncode})"
        )
    return json.loads(out.read_text())


def check_probe(args) -> dict:
    """Max |logits difference| of the two sides on the probe batch, against the bound."""
    ours = np.load(args.workdir / "probe_jaxlora.npy")
    return bc.compare_logits(ours, np.load(args.workdir / "probe_peft.npy"), args.dtype)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.side is not None:  # a child
        result = run_child(args)
        Path(os.environ["BENCH_RESULT"]).write_text(json.dumps(result))
        return 0
    shape = bc.SHAPES[args.shape]
    try:
        if args.tokens is not None:
            bc.check_tokens(_stream(args), shape.vocab, str(args.tokens))
    except bc.DegenerateTokensError as e:
        print(f"bench_train: refused: {e}", file=sys.stderr)
        return 2
    ref_name = "PEFT+bnb" if args.mode == "qlora" else "PEFT"
    info = {
        "machine": bc.machine(),
        "versions": bc.versions(),
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("side", "task", "workdir")
        },
    }
    info["env"] = {k: os.environ.get(k) for k in ENV_RECORDED}  # children inherit these
    info["env"] |= malloc_settings(args) or {"MALLOC_*": "glibc defaults"}
    print(json.dumps(info, indent=1))
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        args.workdir = Path(tmp)
        t0 = time.perf_counter()
        _spawn(argv, args, "prepare")
        print(f"prepared checkpoint + adapter in {time.perf_counter() - t0:.1f} s")
        for side in SIDES:
            _spawn(argv, args, side, "probe")
        probe = check_probe(args)
        print(
            f"probe logits {probe['shape']} ({args.dtype}): max |jaxlora - {ref_name}| = "
            f"{probe['max_abs_diff']:.3g} (bound {probe['bound']:.3g})"
        )
        if not probe["ok"]:
            print(
                f"bench_train: refused: the two sides do not start from the same logits "
                f"({probe['max_abs_diff']:.3g} > {probe['bound']:.3g})",
                file=sys.stderr,
            )
            return 3
        rounds: dict[str, list] = {s: [] for s in SIDES}
        for r in range(args.rounds):
            for side in SIDES:
                res = _spawn(argv, args, side, "time")
                rounds[side].append(res)
                tps = res["tokens_per_step"] * len(res["step_times"]) / sum(res["step_times"])
                print(
                    f"round {r + 1}/{args.rounds} {side:8s}: {tps:,.0f} tokens/s, "
                    f"first step {res['first_step_s']:.2f} s, "
                    f"load {os.getloadavg()[0]:.2f}"
                )
    flops = bc.flops_per_token(shape, args.seq, args.rank, args.remat == "on")
    agg = {s: bc.aggregate(rounds[s], flops, args.dtype) for s in SIDES}
    ratio = bc.ratios(agg["jaxlora"], agg["peft"])
    first_losses = {s: rounds[s][0]["losses"][0] for s in SIDES}
    print(
        f"first-step loss: jaxlora {first_losses['jaxlora']:.6f}, "
        f"{ref_name} {first_losses['peft']:.6f}"
    )
    for s in SIDES:
        print(
            f"{s}: device {agg[s]['device']}, attention {agg[s]['attention']}, "
            f"threads {agg[s]['threads']}, "
            f"memory = {agg[s]['memory_kind']}, MFU: {agg[s]['mfu_note']}"
        )
    rows = {"jaxlora": agg["jaxlora"], ref_name: agg["peft"]}
    print(bc.table(rows, ratio, ref_name))
    info["machine"]["loadavg_end"] = list(os.getloadavg())
    load = max(info["machine"]["loadavg"][0], info["machine"]["loadavg_end"][0])
    if args.device == "cpu" and (warning := bc.contention_warning(load, args.cpus)):
        print(warning)
    results = info | {
        "probe": probe,
        "sides": {"jaxlora": agg["jaxlora"], ref_name: agg["peft"]},
        "ratio": ratio,
        "first_step_loss": first_losses,
        "flops_per_token": flops,
    }
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
