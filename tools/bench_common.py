"""Shared pieces of the training benchmarks (``tools/bench_train.py``, ``tools/bench_cli.py``) and
the curve-parity test.

* model shapes (a CPU-sized ``tiny``; Llama-3.2-1B and Llama-3-8B dimensions),
* the cached random-init checkpoint of a shape and its bitsandbytes NF4 copy, and the
  transformers + PEFT (+ bitsandbytes) model both benchmarks train as the reference,
* packed synthetic batches (random ids, several documents per row, positions restarting at 0),
  and the refusal of degenerate token streams (all zeros, one repeated id),
* the FLOP count per token (REFERENCE.md "Cost model") and the peak-FLOP/s table for MFU,
* process memory (peak RSS, resettable through ``/proc/self/clear_refs``), machine and versions,
* statistics over rounds and the printed table.

Nothing here imports jax or torch at module level: each benchmark side imports only its own
framework (the functions that need torch import it when called).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import resource
import shutil
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# ---- shapes ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
    """A Llama architecture by its dimensions; ``hf_config()`` gives the transformers config."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    rope: dict
    gpu_only: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def hf_config(self):
        import transformers

        return transformers.LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            tie_word_embeddings=self.tied,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            rope_parameters=dict(self.rope),
            bos_token_id=1,
            eos_token_id=2,
        )


_LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=32.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)
SHAPES = {
    # CPU-sized: 4 layers, GQA 4/2 heads of 64, intermediate a multiple of 64 (NF4 2-D layout).
    "tiny": Shape(
        "tiny", 256, 704, 4, 4, 2, 2048, False, dict(rope_type="default", rope_theta=10000.0)
    ),
    # The 57 M-parameter shape of issue 15: a real vocabulary (Llama 2's 32,000, untied head)
    # on a CPU-sized body: 8 layers of width 512, GQA 8/4 heads of 64, intermediate 1472
    # (23 × 64, for the NF4 2-D layout): 57.2 M parameters, 32.8 M of them embedding and head.
    "57m": Shape(
        "57m", 512, 1472, 8, 8, 4, 32000, False, dict(rope_type="default", rope_theta=10000.0)
    ),
    # meta-llama/Llama-3.2-1B config.json
    "llama-1b": Shape("llama-1b", 2048, 8192, 16, 32, 8, 128256, True, _LLAMA3_ROPE, True),
    # meta-llama/Meta-Llama-3-8B config.json (no rope scaling in Llama 3.0)
    "llama-8b": Shape(
        "llama-8b",
        4096,
        14336,
        32,
        32,
        8,
        128256,
        False,
        dict(rope_type="default", rope_theta=500000.0),
        True,
    ),
}


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def bnb_config(dtype: str):
    """QLoRA as the paper defines it: NF4, double quantization, compute in ``dtype``."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch_dtype(dtype),
    )


def save_atomically(model, directory: Path) -> None:
    """save_pretrained into a temporary sibling, then rename: a cache entry is whole or absent,
    even with two benchmarks building it at once (the second one's copy is dropped)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
    model.save_pretrained(tmp)
    try:
        tmp.rename(directory)
    except OSError:  # another process got there first
        shutil.rmtree(tmp)


# ---- the cached checkpoints and the reference model -------------------------------------------


def checkpoint_dirs(cache_dir: Path, shape: str, dtype: str) -> dict[str, Path]:
    """Where the random-init checkpoint of ``shape`` (``dense``) and its bitsandbytes NF4 +
    double-quant copy (``bnb``) are cached."""
    base = Path(cache_dir) / f"{shape}-{dtype}"
    return {"dense": base / "dense", "bnb": base / "bnb-nf4-dq"}


def prepare_checkpoints(cache_dir: Path, shape: str, dtype: str, mode: str, device: str) -> None:
    """Build what is missing of :func:`checkpoint_dirs`: the random-init transformers checkpoint
    (``torch.manual_seed(1234)``) and, for ``mode == "qlora"``, its copy quantized by
    transformers + bitsandbytes (:func:`bnb_config`), which both sides of a benchmark read as
    stored. Each is written whole or not at all (:func:`save_atomically`)."""
    import torch
    import transformers

    d = checkpoint_dirs(cache_dir, shape, dtype)
    if not d["dense"].exists():
        torch.manual_seed(1234)
        model = transformers.AutoModelForCausalLM.from_config(
            SHAPES[shape].hf_config(), dtype=torch_dtype(dtype)
        )
        save_atomically(model, d["dense"])
    if mode == "qlora" and not d["bnb"].exists():
        q = transformers.AutoModelForCausalLM.from_pretrained(
            d["dense"],
            quantization_config=bnb_config(dtype),
            dtype=torch_dtype(dtype),
            device_map="cuda" if device == "gpu" else "cpu",
        )
        save_atomically(q, d["bnb"])
        del q  # free the GPU before jax takes it


def peft_model(
    base: Path,
    adapter: Path,
    *,
    mode: str,
    dtype: str,
    attn: str,
    device: str = "cpu",
    remat: bool = False,
):
    """The reference: transformers' model of ``base`` (4-bit through bitsandbytes for
    ``mode == "qlora"``, as stored) with the PEFT adapter ``adapter`` loaded trainable
    (``PeftModel.from_pretrained(..., is_trainable=True)``); ``attn`` is transformers'
    ``attn_implementation``, ``remat`` turns on its per-layer gradient checkpointing.
    ``prepare_model_for_kbit_training`` is not called: it casts norms and embeddings to
    float32, which jaxlora does not."""
    import peft
    import transformers

    kw = {"quantization_config": bnb_config(dtype)} if mode == "qlora" else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        base,
        dtype=torch_dtype(dtype),
        attn_implementation=attn,
        device_map=device,
        **kw,
    )
    if remat:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return peft.PeftModel.from_pretrained(model, adapter, is_trainable=True)


# ---- synthetic data --------------------------------------------------------------------------


class DegenerateTokensError(ValueError):
    """A token stream that would make the benchmark meaningless (all zeros, one repeated id)."""


def check_tokens(ids: np.ndarray, vocab: int, where: str) -> None:
    """Refuse token ids that are out of range or all one value (e.g. the all-zero batch, whose
    embedding rows, attention scores and softmax are degenerate and not what training sees)."""
    ids = np.asarray(ids)
    if ids.size == 0:
        raise DegenerateTokensError(f"{where}: no tokens")
    if not np.issubdtype(ids.dtype, np.integer):
        raise DegenerateTokensError(f"{where}: token ids must be integers, got {ids.dtype}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise DegenerateTokensError(f"{where}: token ids span [{lo}, {hi}], vocab is {vocab}")
    if lo == hi:
        raise DegenerateTokensError(
            f"{where}: every token id is {lo} ({ids.size} tokens); refusing to time a "
            f"degenerate all-{lo} input. Use random ids (the default) or real tokens."
        )


def packed_batches(
    n: int,
    batch: int,
    seq: int,
    vocab: int,
    *,
    seed: int = 0,
    stream: np.ndarray | None = None,
    min_doc: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """``n`` packed batches, each a dict of ``[batch, seq]`` arrays in ``jaxlora.data.packing`` layout.

    Every row is filled with documents of random length (``min_doc``..``seq`` positions; the
    last one cut to fit): ``input_ids`` = a document's tokens ``[:-1]``, ``targets`` = ``[1:]``,
    so every position is trained and no target crosses a document boundary; ``segment_ids``
    1, 2, ... per document; ``positions`` restart at 0 (which is also how transformers detects
    packed rows from ``position_ids``). Tokens are uniform random ids in ``[0, vocab)``, or are
    read in order from ``stream`` (cycled) when given. Deterministic in ``seed``.
    """
    rng = np.random.default_rng(seed)
    min_doc = max(1, seq // 4) if min_doc is None else min_doc
    if stream is not None:
        check_tokens(stream, vocab, "token stream")
    cursor = 0
    out = []
    for b in range(n):
        cols = {
            k: np.zeros((batch, seq), np.int32)
            for k in ("input_ids", "targets", "segment_ids", "positions")
        }
        for row in range(batch):
            start, seg = 0, 1
            while start < seq:
                length = min(int(rng.integers(min_doc, seq + 1)), seq - start)
                if stream is None:
                    doc = rng.integers(0, vocab, size=length + 1)
                else:
                    idx = (cursor + np.arange(length + 1)) % len(stream)
                    doc, cursor = np.asarray(stream)[idx], cursor + length + 1
                span = slice(start, start + length)
                cols["input_ids"][row, span] = doc[:-1]
                cols["targets"][row, span] = doc[1:]
                cols["segment_ids"][row, span] = seg
                cols["positions"][row, span] = np.arange(length)
                start, seg = start + length, seg + 1
        cols["loss_mask"] = np.ones((batch, seq), np.float32)
        check_tokens(cols["input_ids"], vocab, f"batch {b}")
        out.append(cols)
    return out


# ---- cost model ------------------------------------------------------------------------------


def matmul_params(shape: Shape) -> int:
    """Weights that take part in a matmul per token: every decoder linear and the head."""
    d, f, hd = shape.hidden, shape.intermediate, shape.head_dim
    attn = d * shape.heads * hd * 2 + d * shape.kv_heads * hd * 2  # q, o; k, v
    return shape.layers * (attn + 3 * d * f) + shape.vocab * d


def lora_params(shape: Shape, r: int) -> int:
    """A and B of LoRA on every decoder linear ("all-linear"): ``r · (in + out)`` each."""
    d, f, hd = shape.hidden, shape.intermediate, shape.head_dim
    q, kv = shape.heads * hd, shape.kv_heads * hd
    per_layer = (d + q) * 2 + (d + kv) * 2 + (d + f) * 3  # q, o; k, v; gate, up, down
    return shape.layers * r * per_layer


def flops_per_token(shape: Shape, seq: int, r: int, remat: bool) -> float:
    """REFERENCE.md "Cost model": LoRA training ≈ 4·N_matmul (forward + input gradients; frozen
    weights get no weight gradient) + 6·S·d·L (causal attention, fwd+bwd) + 6·N_lora, and
    activation recompute adds 2·N_matmul. Llama-3-8B, S=2048, r=16: 31.9 GFLOP/token."""
    n = matmul_params(shape)
    attn = 6 * seq * shape.heads * shape.head_dim * shape.layers
    return (6 if remat else 4) * n + attn + 6 * lora_params(shape, r)


# bf16 dense peak FLOP/s (no sparsity), by device name.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def peak_flops(device_name: str | None, dtype: str) -> tuple[float | None, str]:
    """``(peak FLOP/s, why)``; ``None`` where MFU would not mean anything."""
    if not device_name or device_name.lower().startswith("cpu"):
        return None, "CPU: no peak in the table"
    if dtype != "bfloat16":
        return None, f"{dtype} compute: the table holds bf16 peaks"
    for key, peak in PEAK_BF16:
        if key.lower() in device_name.lower():
            return peak, f"{key} bf16 dense peak {peak / 1e12:g} TFLOP/s"
    return None, f"no peak FLOP/s known for {device_name!r}"


# ---- memory, machine, versions ---------------------------------------------------------------


def _proc_kb(path: str, field: str) -> int | None:
    """The kB value of ``field`` in a ``/proc`` file (``VmHWM`` in ``/proc/self/status``,
    ``MemTotal`` in ``/proc/meminfo``), or None where the file or field is missing."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> dict[str, int | None]:
    """Current and peak resident set size of this process (``VmRSS``, ``VmHWM``)."""
    cur, peak = _proc_kb("/proc/self/status", "VmRSS"), _proc_kb("/proc/self/status", "VmHWM")
    return {
        "rss": None if cur is None else cur * 1024,
        "peak_rss": None if peak is None else peak * 1024,
    }


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` 5), so a later peak covers only
    what came after (training, not loading). False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def machine() -> dict:
    """CPU model, cores, RAM and load of this machine (GPU names come from the sides)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    mem = _proc_kb("/proc/meminfo", "MemTotal")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gib": None if mem is None else round(mem / 2**20, 1),
        "loadavg": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "numpy",
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "accelerate",
    "safetensors",
)


def versions() -> dict[str, str | None]:
    """Installed versions of the libraries either side uses (read from metadata, not imported)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


# ---- statistics and the table ----------------------------------------------------------------


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and the spread ``(max - min) / median`` of per-round values."""
    values = list(values)
    med = statistics.median(values)
    return {
        "median": med,
        "min": min(values),
        "max": max(values),
        "spread": (max(values) - min(values)) / med if med else float("nan"),
    }


# Probe bounds: float32 is the project's model tolerance. bf16: two bf16 implementations round
# differently; the bound is relative to max |logit| and catches a wrong adapter or mask, not
# 1e-4 parity (float32 runs and tests/test_curve_parity.py check that).
PROBE_BOUND = {"float32": 1e-4, "bfloat16": 5e-2}


def compare_logits(ours: np.ndarray, ref: np.ndarray, dtype: str) -> dict:
    """Max |ours − ref| against :data:`PROBE_BOUND` (absolute in float32, relative in bf16)."""
    diff = float(np.max(np.abs(ours - ref)))
    scale = float(np.max(np.abs(ref)))
    bound = PROBE_BOUND[dtype] * (scale if dtype == "bfloat16" else 1.0)
    return {
        "max_abs_diff": diff,
        "max_abs_logit": scale,
        "bound": bound,
        "ok": diff <= bound,
        "shape": list(ours.shape),
        "dtype": dtype,
    }


def aggregate(rounds: list[dict], flops_per_tok: float, dtype: str) -> dict:
    """One side's rounds -> tokens/s over rounds, median step time, memory, FLOP/s, MFU.

    A round's tokens/s is its own ``tokens_per_s`` where it has one (``bench_cli``: the median
    of its steps' figures), else its timed tokens over its timed time."""
    tps = [
        r["tokens_per_s"]
        if "tokens_per_s" in r
        else r["tokens_per_step"] * len(r["step_times"]) / sum(r["step_times"])
        for r in rounds
    ]
    med = summarize(tps)["median"]
    peak, why = peak_flops(rounds[0]["device"], dtype)
    mems = [r["peak_memory"] for r in rounds if r["peak_memory"] is not None]
    train_mems = [r["peak_memory_training"] for r in rounds if r["peak_memory_training"]]
    median = lambda xs: float(statistics.median(xs))
    return {
        "tokens_per_s": summarize(tps),
        "step_time": median([t for r in rounds for t in r["step_times"]]),
        "first_step_s": median([r["first_step_s"] for r in rounds]),
        "cpu_per_step": median([r["cpu_s"] / len(r["step_times"]) for r in rounds]),
        "cpu_utilization": median([r["cpu_s"] / sum(r["step_times"]) for r in rounds]),
        "peak_memory": max(mems) if mems else None,
        "peak_memory_training": max(train_mems) if train_mems else None,
        "flops_per_s": med * flops_per_tok,
        "mfu": None if peak is None else med * flops_per_tok / peak,
        "mfu_note": why,
        "device": rounds[0]["device"],
        "threads": rounds[0]["threads"],
        "attention": rounds[0].get("attention"),
        "memory_kind": rounds[0]["memory_kind"],
        "rounds": rounds,
    }


def ratios(ours: dict, ref: dict) -> dict[str, float]:
    """jaxlora / reference for every aggregate both sides have (tokens/s by median)."""
    keys = (
        "step_time",
        "first_step_s",
        "cpu_per_step",
        "peak_memory",
        "peak_memory_training",
        "flops_per_s",
    )
    out = {k: ours[k] / ref[k] for k in keys if ours[k] and ref[k]}
    out["tokens_per_s"] = ours["tokens_per_s"]["median"] / ref["tokens_per_s"]["median"]
    return out


def contention_warning(load: float, cores: int) -> str | None:
    """A warning when other processes share the cores the benchmark ran on."""
    if load <= 0.75 * cores:
        return None
    return (
        f"WARNING: load average {load:.1f} with {cores} core(s) in use: other processes "
        "share these cores, so wall-clock numbers partly measure contention (torch's "
        "OpenMP threads spin-wait when oversubscribed). Compare CPU time per step, pin "
        "with --cpus 1, or rerun when the machine is idle."
    )


def _fmt_bytes(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def table(rows: dict[str, dict], ratio: dict[str, float], reference: str) -> str:
    """A Markdown table: one column per side, then the jaxlora / reference ratio."""
    sides = list(rows)
    head = f"| metric | {' | '.join(sides)} | jaxlora / {reference} |"
    lines = [head, "|" + "---|" * (len(sides) + 2)]

    def line(label: str, fmt, key: str, ratio_key: str | None = None) -> None:
        cells = [fmt(rows[s].get(key)) for s in sides]
        r = ratio.get(ratio_key or key)
        lines.append(f"| {label} | {' | '.join(cells)} | {'' if r is None else f'{r:.2f}×'} |")

    tok = lambda v: (
        "n/a" if v is None else (f"{v['median']:,.0f} ({v['min']:,.0f}–{v['max']:,.0f})")
    )
    line("tokens/s, median (min–max over rounds)", tok, "tokens_per_s")
    line("step time, median", lambda v: "n/a" if v is None else f"{1e3 * v:,.1f} ms", "step_time")
    line(
        "compile / first step (excluded)",
        lambda v: "n/a" if v is None else f"{v:,.2f} s",
        "first_step_s",
    )
    line(
        "CPU time per step (all threads)",
        lambda v: "n/a" if v is None else f"{1e3 * v:,.1f} ms",
        "cpu_per_step",
    )
    line(
        "CPU utilisation (cores busy)",
        lambda v: "n/a" if v is None else f"{v:.2f}",
        "cpu_utilization",
    )
    line("peak memory", _fmt_bytes, "peak_memory")
    line("peak memory, timed steps only", _fmt_bytes, "peak_memory_training")
    line("model TFLOP/s", lambda v: "n/a" if v is None else f"{v / 1e12:.3f}", "flops_per_s")
    line("MFU", lambda v: "n/a" if v is None else f"{100 * v:.1f} %", "mfu")
    return "\n".join(lines)
