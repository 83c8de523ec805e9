"""Export to Hugging Face formats: merged checkpoints, and the ``python -m jaxlora.export`` CLI.

Merged export: a plain Hugging Face checkpoint with the adapter folded into the weights.
``transformers.AutoModelForCausalLM.from_pretrained(directory)`` loads the result with no PEFT
involved. Each LoRA weight becomes ``W + s·B·A`` computed in float32 (DoRA: scaled by
``m/‖W + s·B·A‖``), which is what ``PeftModel.merge_and_unload()`` computes, and is cast to the
export dtype once. 4-bit (NF4) bases are dequantized: a merged checkpoint is dense.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import hf
from jaxlora.lora import LoRAWeight, dense_weight, merge

log = logging.getLogger(__name__)


def merged_params(params: dict, *, dtype: Any = jnp.float32) -> dict:
    """Every weight as a dense ``dtype`` array: LoRA weights merged (in float32), NF4 weights
    dequantized, arrays cast. The input tree may mix all three."""
    merged = merge(params, dtype=jnp.float32)

    def dense(path: str, leaf: Any) -> Any:
        if isinstance(leaf, dict):
            return {k: dense(f"{path}.{k}", v) for k, v in leaf.items()}
        if isinstance(leaf, jax.Array | np.ndarray):
            return jnp.asarray(leaf).astype(dtype)
        if hasattr(leaf, "dequantize"):
            return dense_weight(leaf, jnp.float32).astype(dtype)
        raise TypeError(f"merged_params: cannot export {path} of type {type(leaf).__name__}")

    return {k: dense(k, v) for k, v in merged.items()}


def _param_dtype(params: dict) -> str:
    """The dtype name of the unquantized weights (embeddings are never quantized)."""
    leaf = params["model"]["embed_tokens"]["weight"]
    return jnp.dtype(leaf.dtype).name


def save_merged(
    model: Any,
    directory: str | Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write ``model`` (a :class:`jaxlora.Model`, LoRA applied or not) as a merged HF checkpoint:
    ``config.json`` + sharded safetensors (+ the tokenizer files when the model has a tokenizer).

    ``dtype``: ``"float32"``, ``"bfloat16"`` or ``"float16"``; default the dtype the model's
    unquantized weights are stored in.
    """
    dtype = dtype or _param_dtype(model.params)
    if dtype not in hf.DTYPES:
        raise ValueError(f"save_merged: dtype={dtype!r}; expected one of {sorted(hf.DTYPES)}")
    n_lora = sum(isinstance(v, LoRAWeight) for v in hf.flatten(model.params).values())
    log.info("merged export to %s: %d LoRA weights folded in, dtype %s", directory, n_lora, dtype)
    params = merged_params(model.params, dtype=jnp.float32)  # save_pretrained casts once
    directory = hf.save_pretrained(
        params, model.config, directory, dtype=dtype, max_shard_bytes=max_shard_bytes
    )
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(directory))
    return directory


# ---- python -m jaxlora.export ------------------------------------------------------------------

FORMATS = ("peft", "merged", "bnb4")
_USAGE = (
    "usage: python -m jaxlora.export checkpoint=<run dir | run/checkpoints | run/checkpoints/N> "
    "format=peft|merged|bnb4 out=<dir> [step=N] [dtype=float32|bfloat16|float16]"
)


def _parse(argv: list[str]) -> dict[str, str]:
    import difflib

    keys = ("checkpoint", "format", "out", "step", "dtype")
    args: dict[str, str] = {}
    for a in argv:
        k, sep, v = a.partition("=")
        if not sep or k not in keys:
            near = difflib.get_close_matches(k, keys, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(f"unknown argument {a!r}{hint}\n{_USAGE}")
        args[k] = v
    for k in ("checkpoint", "format", "out"):
        if k not in args:
            raise ValueError(f"missing {k}=\n{_USAGE}")
    if args["format"] not in FORMATS:
        raise ValueError(f"format={args['format']!r}: expected one of {', '.join(FORMATS)}")
    return args


def _locate(checkpoint: Path, step: str | None) -> tuple[Path, int | None]:
    """(run dir, step) from a run dir, its checkpoints/ dir, or one step's dir."""
    checkpoint = checkpoint.absolute()
    if (checkpoint / "config.yaml").exists():
        return checkpoint, int(step) if step else None
    if (checkpoint.parent / "config.yaml").exists() and checkpoint.name == "checkpoints":
        return checkpoint.parent, int(step) if step else None
    if checkpoint.name.isdigit() and (checkpoint.parents[1] / "config.yaml").exists():
        if step and int(step) != int(checkpoint.name):
            raise ValueError(f"step={step} contradicts checkpoint directory {checkpoint}")
        return checkpoint.parents[1], int(checkpoint.name)
    raise ValueError(f"{checkpoint}: not a jaxlora run directory (no config.yaml found)")


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path, *, step: int | None = None,
                      dtype: str | None = None) -> Path:  # fmt: skip
    """Rebuild a run's model from its ``config.yaml`` and Orbax checkpoint, then write ``fmt``.

    ``peft``: the adapter (adapter_config.json + adapter_model.safetensors + tokenizer).
    ``merged``: a dense HF checkpoint with the adapter folded in (NF4 bases dequantized first).
    ``bnb4``: the 4-bit base as a bitsandbytes HF checkpoint in ``out`` plus the adapter in
    ``out/adapter`` — merging into 4 bits would lose most of the update, so the two stay apart.
    """
    from jaxlora import checkpoint as ckpt_lib
    from jaxlora import lora, train
    from jaxlora.config import load_config
    from jaxlora.nf4_bnb import save_bnb4
    from jaxlora.peft_io import save_adapter

    run_dir, step = _locate(Path(checkpoint), None if step is None else str(step))
    cfg = load_config(str(run_dir / "config.yaml"))
    ckpt = ckpt_lib.Checkpointer(run_dir / "checkpoints", keep=10**6, async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise ValueError(f"{run_dir / 'checkpoints'} holds no complete checkpoint")
    model = train.load_base(cfg)
    lcfg, frozen, trainable = train.init_lora(cfg, model, jax.random.key(0))
    tx, _ = train.make_tx(cfg, 1)
    trainable, *_ = ckpt.restore(step, trainable, tx.init(trainable), train.run_meta(cfg, lcfg))
    ckpt.close()
    model.params = lora.combine(frozen, trainable)
    out = Path(out)
    if fmt == "peft":
        model.save_adapter(out, base_model_name_or_path=cfg.model.path)
    elif fmt == "merged":
        save_merged(model, out, dtype=dtype)
    elif fmt == "bnb4":
        if cfg.quant.type == "none":
            raise ValueError("format=bnb4 needs a run with a 4-bit base (quant.type nf4 or fp4)")
        base = jax.tree.map(lambda w: w.base if isinstance(w, LoRAWeight) else w, frozen,
                            is_leaf=lambda w: isinstance(w, LoRAWeight))  # fmt: skip
        save_bnb4(base, model.config, out, dtype=dtype or _param_dtype(base),
                  compute_dtype=cfg.quant.compute_dtype)  # fmt: skip
        model.tokenizer.save_pretrained(str(out))
        save_adapter(model, out / "adapter", base_model_name_or_path=str(out.absolute()))
    else:
        raise ValueError(f"format={fmt!r}: expected one of {', '.join(FORMATS)}")
    log.info("exported step %d of %s as %s to %s", step, run_dir, fmt, out)
    return out


def main(argv: list[str] | None = None) -> int:
    import sys

    from jaxlora.checkpoint import ResumeError
    from jaxlora.config import ConfigError
    from jaxlora.safetensors_io import CheckpointError

    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True
    )
    try:
        args = _parse(sys.argv[1:] if argv is None else list(argv))
        step = int(args["step"]) if "step" in args else None
        out = export_checkpoint(args["checkpoint"], args["format"], args["out"], step=step,
                                dtype=args.get("dtype"))  # fmt: skip
    except (ValueError, ConfigError, CheckpointError, ResumeError, FileNotFoundError) as e:
        print(f"jaxlora.export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args['format']} export to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
