"""A run's checkpoint -> the formats users take elsewhere: a PEFT adapter, a merged Hugging Face
checkpoint, a bitsandbytes-4bit base plus adapter, or GGUF for llama.cpp / Ollama
(``python -m jaxlora.export``).

The run is rebuilt from its ``config.yaml`` with the same builder the training run used
(:mod:`jaxlora.training.run`), so the restored trees are exactly those the checkpoint holds.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax

from jaxlora import lora
from jaxlora.config import load_config
from jaxlora.data.prompts import adds_bos
from jaxlora.interop import gguf, hf, hub, ollama
from jaxlora.interop.merged import param_dtype
from jaxlora.models.stacking import unstack_layers
from jaxlora.training import checkpoint
from jaxlora.training.run import (
    init_lora,
    load_base,
    make_tx,
    run_keys,
    run_meta,
    stack_for_scan,
)

log = logging.getLogger(__name__)

FORMATS = ("peft", "merged", "bnb4", "gguf")


def locate(checkpoint_path: Path, step: int | None) -> tuple[Path, int | None]:
    """(run dir, step) from a run dir, its checkpoints/ dir, or one step's dir."""
    path = checkpoint_path.absolute()
    if (path / "config.yaml").exists():
        return path, step
    if (path.parent / "config.yaml").exists() and path.name == "checkpoints":
        return path.parent, step
    if path.name.isdigit() and (path.parents[1] / "config.yaml").exists():
        if step is not None and step != int(path.name):
            raise ValueError(f"step={step} contradicts checkpoint directory {path}")
        return path.parents[1], int(path.name)
    raise ValueError(f"{path}: not a jaxlora run directory (no config.yaml found)")


def _open_checkpoints(run_dir: Path) -> checkpoint.Checkpointer:
    """The run's checkpoints, read only: a run that saved none is refused here, before Orbax
    would create an empty ``checkpoints/`` in it."""
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        raise ValueError(f"{directory} does not exist: the run saved no checkpoint")
    return checkpoint.Checkpointer(directory, keep=10**6, async_save=False)


def export_checkpoint(
    checkpoint_path: str | Path,
    fmt: str,
    out: str | Path,
    *,
    step: int | None = None,
    dtype: str | None = None,
    gguf_type: str = "f16",
    gguf_lora: bool = False,
) -> Path:
    """Rebuild a run's model from its ``config.yaml`` and Orbax checkpoint, then write ``fmt``.

    ``peft``: the adapter (adapter_config.json + adapter_model.safetensors + tokenizer).
    ``merged``: a dense HF checkpoint with the adapter folded in (NF4 bases dequantized first).
    ``bnb4``: the 4-bit base as a bitsandbytes HF checkpoint in ``out`` plus the adapter in
    ``out/adapter`` — merging into 4 bits would lose most of the update, so the two stay apart.
    ``gguf``: see :func:`export_gguf` (``gguf_type``, ``gguf_lora``).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "gguf":
        gguf.check_type(gguf_type)
        if Path(out).suffix != ".gguf":
            raise ValueError(f"format=gguf: out={out} must be a file name ending in .gguf")
    run_dir, step = locate(Path(checkpoint_path), step)
    cfg = load_config(str(run_dir / "config.yaml"))
    if fmt == "bnb4" and cfg.quant.type == "none":
        raise ValueError("format=bnb4 needs a run with a 4-bit base (quant.type nf4 or fp4)")
    base_dir = Path(cfg.model.path).expanduser()
    if fmt != "gguf" and base_dir.is_dir() and Path(out).resolve() == base_dir.resolve():
        raise ValueError(
            f"out={out} is the run's base model directory (model.path): a {fmt} export would "
            "overwrite its files; choose another directory"
        )
    ckpt = _open_checkpoints(run_dir)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"{run_dir / 'checkpoints'} holds no complete checkpoint")
        # the run's init key: a randomized PiSSA base (pissa_niter_K) depends on it
        init_key, _ = run_keys(cfg.train.seed)
        model, frozen, trainable = init_lora(cfg, load_base(cfg), init_key)
        # the checkpoint's trees are laid out as its run stacked them (model.scan_layers)
        stacked = ckpt.read_meta(step).get("layers", "unrolled") != "unrolled"
        _, trainable, runs = stack_for_scan(frozen, trainable, model.config, stacked)
        tx, _ = make_tx(cfg, 1, trainable)
        trainable, *_ = ckpt.restore(step, trainable, tx.init(trainable), run_meta(cfg, runs))
    finally:
        ckpt.close()
    model = model.replace(params=lora.combine(frozen, unstack_layers(trainable)))
    out = Path(out)
    if fmt == "peft":
        model.save_adapter(out, base_model_name_or_path=cfg.model.path)
    elif fmt == "merged":
        model.save_merged(out, dtype=dtype)
    elif fmt == "gguf":
        _, raw = hf.read_config(hf.resolve(cfg.model.path, cfg.model.revision))
        export_gguf(model, out, raw.get("max_position_embeddings"), gguf_type, separate=gguf_lora)
    else:
        base = _without_adapter(frozen)
        hf.save_bnb4(
            base,
            model.config,
            out,
            dtype=dtype or param_dtype(base),
            compute_dtype=cfg.quant_compute_dtype,
            generation=model.generation,
        )
        model.tokenizer.save_pretrained(str(out))
        model.save_adapter(out / "adapter", base_model_name_or_path=str(out.absolute()))
    log.info("exported step %d of %s as %s to %s", step, run_dir, fmt, out)
    return out


def push_to_hub(
    checkpoint_path: str | Path,
    fmt: str,
    out: str | Path,
    repo_id: str,
    *,
    step: int | None = None,
    private: bool = False,
) -> str:
    """Upload the export ``out`` (written by :func:`export_checkpoint` from the same arguments)
    to the Hub repository ``repo_id`` with a model card built from the run: its recipe,
    metrics.jsonl and report.json. Returns the commit URL."""
    run_dir, step = locate(Path(checkpoint_path), step)
    if step is None:
        ckpt = _open_checkpoints(run_dir)
        try:
            step = ckpt.latest_step()
        finally:
            ckpt.close()
    cfg = load_config(str(run_dir / "config.yaml"))
    card = hub.model_card(cfg, fmt, step, run_dir, repo_id, export=Path(out))
    folder = hub.upload_folder(Path(out), card)
    log.info("uploading %s to the Hugging Face Hub as %s", folder, repo_id)
    return hub.push(folder, repo_id, private=private)


def export_gguf(
    model, out: Path, context_length: int | None, gguf_type: str, *, separate: bool
) -> Path:
    """``out`` (a ``.gguf`` file) for llama.cpp, with an Ollama ``Modelfile`` beside it.

    ``separate=False``: the merged model. ``separate=True``: the base (adapter not merged) in
    ``out`` and the adapter as a GGUF LoRA in ``<stem>-lora.gguf`` (``llama-cli -m out --lora
    ...``; the Modelfile's ``ADAPTER``). The Modelfile's TEMPLATE is the chat template translated
    (:mod:`jaxlora.interop.ollama`); one that cannot be translated is left out with a warning
    saying so, and the GGUF still carries the Jinja template.
    """
    if context_length is None:
        raise ValueError("format=gguf: the base's config.json has no max_position_embeddings")
    adapter = out.with_name(out.stem + "-lora.gguf") if separate else None
    try:
        text = ollama.modelfile(
            model.tokenizer,
            out.name,
            adapter_file=adapter and adapter.name,
            add_bos=adds_bos(model.tokenizer),
        )
    except ollama.TemplateError as e:
        log.warning("Modelfile without TEMPLATE (write one by hand): %s", e)
        text = f"FROM ./{out.name}\n" + (f"ADAPTER ./{adapter.name}\n" if adapter else "")
    merged = adapter is None
    base = model.params if merged else _without_adapter(model.params)
    files = {
        out: gguf.model_gguf(
            base,
            model.config,
            model.tokenizer,
            gguf_type=gguf_type,
            context_length=context_length,
            name=Path(str(model.source)).name if model.source else None,
        )
    }
    if not merged:
        files[adapter] = gguf.lora_gguf(model.params, model.config, model.lora, gguf_type=gguf_type)
    for path, content in files.items():
        content.write(path)
    ollama.write_modelfile(out.parent, text)
    return out


def _without_adapter(params: dict) -> dict:
    return jax.tree.map(
        lambda w: w.base if isinstance(w, lora.LoRAWeight) else w,
        params,
        is_leaf=lambda w: isinstance(w, lora.LoRAWeight),
    )
