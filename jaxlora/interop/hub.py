"""An export -> a Hugging Face Hub model repository: the folder to upload (the export plus a
``README.md`` model card) and the upload itself.

The card is what the Hub shows and indexes: YAML front matter (``base_model``, ``library_name``,
``tags``, ``datasets``, ``license``; the Hub's model-card metadata) and a body that says what the
model is, what it was trained on, with which recipe, for how many steps, how it did on held-out
data, and how to load it. Everything up to the upload is built and checked locally; the upload is
``huggingface_hub``'s ``create_repo`` + ``upload_folder``, nothing home-made.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import HfApi, try_to_load_from_cache

from jaxlora.config import Config
from jaxlora.config.recipe import to_yaml

log = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "VLLM_MAX_LORA_RANKS",
    "HubError",
    "base_license",
    "card_metadata",
    "hub_id",
    "model_card",
    "push",
    "upload_folder",
    "vllm_max_lora_rank",
]

# What each export format is to the Hub: what it holds, the library that loads it, extra tags.
FORMATS: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "peft": ("A LoRA adapter (PEFT format)", "peft", ()),
    "merged": ("A model with its LoRA adapter merged into the weights", "transformers", ()),
    "bnb4": (
        "A bitsandbytes 4-bit base with its LoRA adapter in `adapter/`",
        "transformers",
        ("bitsandbytes", "4-bit"),
    ),
    "gguf": ("A GGUF file of the merged model", None, ("gguf",)),
}
_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm serve --max-lora-rank choices


class HubError(RuntimeError):
    """The upload failed (no token, no access, no network); the upload folder is kept."""


def hub_id(path: str | None) -> str | None:
    """``path`` when it names a Hub repository rather than a local file or directory (the rule
    :func:`jaxlora.interop.hf.resolve` loads by), else ``None``."""
    if not path or Path(path).expanduser().exists():
        return None
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or path.endswith(_DATA_SUFFIXES):
        return None
    return path


def _front_matter(text: str) -> dict[str, Any]:
    """A model card's YAML metadata; ``{}`` when it has none, or none that parses to a mapping
    (the base's card is read for its license only: a malformed one must not stop an upload)."""
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    try:
        meta = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError as e:
        log.warning("the base model's card has malformed metadata (%s): license unknown", e)
        return {}
    return meta if isinstance(meta, dict) else {}


def base_license(cfg: Config) -> dict[str, str]:
    """The base model's license fields from its own model card, where it is on this machine (a
    local base's ``README.md``, or the Hub's copy in the local cache): ``license``, and the
    ``license_name`` / ``license_link`` a ``license: other`` comes with; ``{}`` when unknown."""
    repo = hub_id(cfg.model.path)
    if repo is None:
        card = Path(cfg.model.path).expanduser() / "README.md"
    else:
        cached = try_to_load_from_cache(repo, "README.md", revision=cfg.model.revision)
        card = Path(cached) if isinstance(cached, str) else None
    if card is None or not card.is_file():
        return {}
    meta = _front_matter(card.read_text())
    if not meta.get("license"):
        return {}
    return {k: meta[k] for k in ("license", "license_name", "license_link") if meta.get(k)}


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _results(run_dir: Path, step: int, steps_run: int) -> list[str]:
    """The card's held-out numbers: report.json (before training and after the run's last
    step, so labelled with that step when an earlier one is exported) and the last eval loss
    metrics.jsonl holds at or before the exported step."""
    lines = []
    report_path = run_dir / "report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
        after = "after training" if step == steps_run else f"after step {steps_run} (not this one)"
        lines += [f"| measure | before training | {after} |", "| --- | --- | --- |"]
        for key, name in (("eval_loss", "eval loss"), ("exact_match", "exact match")):
            before, after = report["before"].get(key), report["after"].get(key)
            if before is not None:
                lines.append(f"| {name} | {before:.4f} | {after:.4f} |")
        lines.append("")
    evals = [r for r in _jsonl(run_dir / "metrics.jsonl") if "eval_loss" in r and r["step"] <= step]
    if evals:
        lines.append(f"Eval loss at step {evals[-1]['step']}: {evals[-1]['eval_loss']:.4f}.")
    return lines or ["The run measured no held-out data (`data.val_size=0`, no `data.eval_path`)."]


def vllm_max_lora_rank(cfg: Config) -> int | None:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds the adapter's largest rank;
    ``None`` above vLLM's largest (512)."""
    rank = max([cfg.lora.r, *cfg.lora.rank_pattern.values()])
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)


def _vllm(fmt: str, repo: str, base: str, cfg: Config) -> list[str]:
    """The card's vLLM line: the merged model as is, an adapter with ``--enable-lora`` (the
    merged model instead where vLLM's PEFTHelper refuses the adapter: DoRA, modules_to_save,
    biases; or would serve it on the original base where PiSSA / LoftQ changed it)."""
    if fmt == "merged":
        return ["", f"vLLM: `vllm serve {repo}`"]
    if fmt != "peft":
        return []
    lo = cfg.lora
    refused = [("DoRA", lo.use_dora), ("modules_to_save", lo.modules_to_save)]
    refused += [(f"bias={lo.bias!r}", lo.bias != "none")]
    refused += [(f"init={lo.init!r} (a changed base)", lo.init == "loftq" or "pissa" in lo.init)]
    if named := [name for name, on in refused if on]:
        return ["", f"vLLM cannot serve this adapter ({', '.join(named)}): serve the merged model."]
    rank = vllm_max_lora_rank(cfg)
    if rank is None:
        return ["", "vLLM takes adapters up to rank 512: serve the merged model instead."]
    serve = f"vllm serve {base} --enable-lora --lora-modules adapter={repo} --max-lora-rank {rank}"
    return ["", f"vLLM: `{serve}`"]


# How to load each upload, in transformers / PEFT, jaxlora and the servers that take it.
_USAGE = {
    "peft": """```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(model, "{repo}")
tokenizer = AutoTokenizer.from_pretrained("{repo}")  # with the chat template it trained on
```

```python
import jaxlora
from huggingface_hub import snapshot_download

model = jaxlora.load_model("{base}", adapter=snapshot_download("{repo}"))
```""",
    "merged": """```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}")
tokenizer = AutoTokenizer.from_pretrained("{repo}")
```

```python
import jaxlora

model = jaxlora.load_model("{repo}")
```""",
    "bnb4": """```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}")  # the 4-bit base (bitsandbytes)
model = PeftModel.from_pretrained(model, "{repo}", subfolder="adapter")
tokenizer = AutoTokenizer.from_pretrained("{repo}")
```""",
    "gguf": "llama.cpp: `llama-cli -hf {repo}`; Ollama: `ollama run hf.co/{repo}`",
}


def card_metadata(cfg: Config, fmt: str) -> dict[str, Any]:
    """The card's front matter: what the Hub indexes the model by."""
    _, library, format_tags = FORMATS[fmt]
    base, dataset = hub_id(cfg.model.path), hub_id(cfg.data.path)
    quantized = cfg.quant.type != "none"
    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
    if library:
        meta["library_name"] = library
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["jaxlora", "lora", *(["qlora"] if quantized else []), *format_tags]
    if dataset:
        meta["datasets"] = [dataset]
    meta |= base_license(cfg)
    return meta


def gguf_files(export: Path) -> list[Path]:
    """A GGUF export's files: the ``.gguf``, and when the ``Modelfile`` beside it is this
    export's (its ``FROM`` names the file), the Modelfile and the GGUF LoRA its ``ADAPTER``
    names (written by ``gguf.lora=true``)."""
    files = [export]
    modelfile = export.parent / "Modelfile"
    if not modelfile.is_file():
        return files
    text = modelfile.read_text()
    if not text.startswith(f"FROM ./{export.name}\n"):
        return files
    files.append(modelfile)
    if adapter := re.search(r"^ADAPTER \./(.+)$", text, re.M):
        lora = export.parent / adapter[1]
        if not lora.is_file():
            raise FileNotFoundError(f"{modelfile} names the adapter {lora}, which is missing")
        files.append(lora)
    return files


def _gguf_usage(repo: str, files: list[Path]) -> str:
    """How to run a GGUF upload: llama.cpp straight from the Hub (with the adapter, from a
    download), Ollama from the downloaded folder's Modelfile."""
    model, names = files[0].name, [f.name for f in files]
    stem = files[0].stem
    lora = next((n for n in names if n.endswith("-lora.gguf")), None)
    get = f"hf download {repo} --local-dir {stem}"
    if lora:
        llama = f"`{get}`, then `llama-cli -m {stem}/{model} --lora {stem}/{lora}`"
    else:
        llama = f"`llama-cli --hf-repo {repo} --hf-file {model}`"
    lines = [f"llama.cpp: {llama}"]
    if "Modelfile" in names:  # its TEMPLATE is the chat template, ADAPTER the LoRA
        ollama = f"`{get} && ollama create {stem} -f {stem}/Modelfile && ollama run {stem}`"
        lines += ["", f"Ollama: {ollama}"]
    elif not lora:
        lines += ["", f"Ollama: `ollama run hf.co/{repo}`"]
    return "\n".join(lines)


def model_card(
    cfg: Config, fmt: str, step: int, run_dir: Path, repo_id: str, export: Path | None = None
) -> str:
    """The ``README.md`` for an export of step ``step`` of the run in ``run_dir``; ``export``
    (the uploaded file or folder) names a GGUF upload's files in its instructions."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: no model card for it; expected one of {list(FORMATS)}")
    what = FORMATS[fmt][0]
    base = hub_id(cfg.model.path) or cfg.model.path
    quantized = cfg.quant.type != "none"
    lo = cfg.lora
    method = f"QLoRA ({cfg.quant.type} base)" if quantized else "LoRA"
    targets = lo.target_modules or "PEFT's default modules"
    targets = ", ".join(targets) if isinstance(targets, tuple) else targets
    steps_run = max((r["step"] for r in _jsonl(run_dir / "metrics.jsonl")), default=step)
    data = f"`{cfg.data.path}` ({cfg.data.format} records"
    data += f"; held-out: `{cfg.data.eval_path}`)" if cfg.data.eval_path else ")"
    body = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"{what}, fine-tuned from `{cfg.model.path}` with jaxlora: {method}, r={lo.r}, "
        f"alpha={lo.alpha}, on {targets}.",
        "",
        "## Data",
        "",
        f"{data}, sequences of up to {cfg.data.max_seq_len} tokens.",
        "",
        "## Training",
        "",
        f"Step {step} of a run of {steps_run} optimizer steps (batch {cfg.train.batch_size} "
        f"× {cfg.train.grad_accum} accumulated, {cfg.train.optimizer}, lr {cfg.train.lr:g}, "
        f"{cfg.train.schedule} schedule).",
        "",
        "## Held-out results",
        "",
        *_results(run_dir, step, steps_run),
        "",
        "## How to use",
        "",
        _gguf_usage(repo_id, gguf_files(Path(export)))
        if fmt == "gguf" and export is not None
        else _USAGE[fmt].format(repo=repo_id, base=base),
        *_vllm(fmt, repo_id, base, cfg),
        "",
        "## Recipe",
        "",
        "The resolved configuration of the run (`config.yaml`):",
        "",
        "```yaml",
        to_yaml(cfg).rstrip(),
        "```",
    ]
    front = yaml.safe_dump(card_metadata(cfg, fmt), sort_keys=False, allow_unicode=True)
    return f"---\n{front}---\n\n" + "\n".join(body) + "\n"


def upload_folder(export: Path, card: str) -> Path:
    """The folder to upload: an export directory with ``README.md`` (the card) written into it,
    or, for a single-file export (GGUF), ``<name>.hub/`` beside it holding hard links to the
    file and to the Modelfile and GGUF LoRA written with it (:func:`gguf_files`; no copy of a
    multi-gigabyte file) and the card. A second push rebuilds the folder."""
    export = Path(export)
    if export.is_dir():
        folder = export
    elif export.is_file():
        folder = export.with_name(export.name + ".hub")
        folder.mkdir(exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
        for file in gguf_files(export) if export.suffix == ".gguf" else [export]:
            os.link(file, folder / file.name)
    else:
        raise FileNotFoundError(f"{export}: no export to upload")
    (folder / "README.md").write_text(card)
    return folder


def push(folder: Path, repo_id: str, private: bool = False) -> str:
    """Create ``repo_id`` (if new; ``private`` only applies then) and upload ``folder`` as one
    commit; returns the commit URL. ``token=True`` makes huggingface_hub refuse, before any
    network call, when no token is configured."""
    try:
        api = HfApi(token=True)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return str(api.upload_folder(folder_path=folder, repo_id=repo_id))
    except Exception as e:  # huggingface_hub's own error, with the way to retry
        raise HubError(
            f"push_to_hub={repo_id}: {type(e).__name__}: {e}\nThe upload folder {folder} is "
            f"complete; retry with `hf upload {repo_id} {folder}` once that is fixed."
        ) from e
