"""Datasets -> tokenized, loss-masked examples -> packed train/validation sets.

``build_datasets(cfg.data, tokenizer, seed)`` runs the whole pipeline:

1. :func:`load_records`: a local ``.json``/``.jsonl``/``.csv``/``.parquet`` file, a directory
   of them, or a hub dataset id, all through ``datasets.load_dataset``. JSON files are first
   checked line by line so a bad record is reported as ``path:LINE: what is wrong``.
2. :func:`tokenize`: each record becomes an :class:`~jaxlora.packing.Example` in one format:

   * ``alpaca``: ``instruction``, optional ``input``, ``output``, in the Stanford Alpaca prompt
     template (``ALPACA_TEMPLATE``; ``ALPACA_TEMPLATE_NO_INPUT`` when the input is empty),
     from github.com/tatsu-lab/stanford_alpaca ``train.py``. Tokens are
     ``BOS? + prompt + output + EOS``; the loss covers the output and EOS.
   * ``chat``: ``messages`` (a list of ``{role, content}``) rendered with the tokenizer's chat
     template. The loss covers the assistant turns: the characters between the rendered
     prefix ``messages[:i]`` with the generation prompt and the rendered ``messages[:i+1]``,
     which includes the template's end-of-turn marker (so no extra EOS is appended).
   * ``text``: ``text``; ``BOS? + text + EOS``, every token trained.

   ``BOS?`` is whatever ``add_special_tokens`` adds for this tokenizer. A token is trained when
   its characters overlap a trained span (character offsets need a fast tokenizer).
   ``train_on_inputs`` trains every token. **Truncation**: an example longer than
   ``max_seq_len + 1`` tokens is cut from the right to ``max_seq_len + 1`` (it then fills
   exactly ``max_seq_len`` positions and may lose its EOS); an example left without any trained
   token is dropped. Both counts are logged. If no example survives, :class:`DataError`.
3. :func:`split_validation`: ``val_size`` (fraction or count) examples, chosen by ``seed``;
   or, with ``eval_path``, that held-out file is the validation set.
4. :meth:`PackedDataset.build <jaxlora.packing.PackedDataset.build>` and
   :func:`~jaxlora.packing.batches`: rows, batches, the checkpointable iterator.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxlora.config import DataConfig
from jaxlora.packing import BatchIterator, DataError, Example, PackedDataset, batches

__all__ = [
    "ALPACA_TEMPLATE",
    "ALPACA_TEMPLATE_NO_INPUT",
    "BatchIterator",
    "DataError",
    "Example",
    "PackedDataset",
    "TokenizeStats",
    "alpaca_prompt",
    "batches",
    "build_datasets",
    "load_records",
    "load_tokenizer",
    "split_validation",
    "tokenize",
]

log = logging.getLogger(__name__)

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """The Alpaca prompt (everything before the response); use it to sample from a model."""
    if input:
        return ALPACA_TEMPLATE.format(instruction=instruction, input=input)
    return ALPACA_TEMPLATE_NO_INPUT.format(instruction=instruction)


def load_tokenizer(path: str, revision: str | None = None) -> Any:
    """``transformers.AutoTokenizer`` from a local directory or hub id (fast tokenizers only)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=revision)
    if not tok.is_fast:
        raise DataError(f"tokenizer at {path} has no fast (Rust) version; jaxlora needs one")
    return tok


def check_record(rec: Any, cfg: DataConfig) -> str | None:
    """What is wrong with one record for ``cfg.format``, or None if nothing."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"

    def need_str(name: str, optional: bool = False) -> str | None:
        if name not in rec or (optional and rec[name] is None):
            return None if optional else f'missing field "{name}"'
        if not isinstance(rec[name], str):
            return f'field "{name}" must be a string, got {type(rec[name]).__name__}'
        return None

    if cfg.format == "alpaca":
        return (
            need_str(cfg.instruction_field)
            or need_str(cfg.input_field, optional=True)
            or need_str(cfg.output_field)
        )
    if cfg.format == "text":
        return need_str(cfg.text_field)
    name = cfg.messages_field
    msgs = rec.get(name)
    if not isinstance(msgs, list) or not msgs:
        return f'field "{name}" must be a non-empty list of {{"role", "content"}} objects'
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return f'{name}[{j}] must be an object with a string "role"'
        if not isinstance(m.get("content"), str):
            return f'{name}[{j}] must have a string "content"'
    return None


def _check_json_file(path: Path, cfg: DataConfig) -> None:
    """Validate JSON Lines (or a ``.json`` array) record by record: ``path:LINE: problem``."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):  # one JSON array of records
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})"
            ) from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON array of records")
        for k, rec in enumerate(records):
            if problem := check_record(rec, cfg):
                raise DataError(f"{path}: record {k + 1}: {problem}")
        count = len(records)
    else:
        count = 0
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno})"
                ) from None
            if problem := check_record(rec, cfg):
                raise DataError(f"{path}:{lineno}: {problem}")
            count += 1
    if count == 0:
        raise DataError(f"{path}: the file holds no records")


def load_records(cfg: DataConfig) -> Any:
    """``cfg.path`` -> a ``datasets.Dataset`` of valid records (first ``max_examples`` only)."""
    import datasets

    path = Path(cfg.path).expanduser()
    if path.is_file():
        if path.suffix not in _BUILDERS:
            raise DataError(f"{path}: unsupported file type; use one of {', '.join(_BUILDERS)}")
        files = [path]
        args: tuple = (_BUILDERS[path.suffix],)
        kwargs: dict[str, Any] = {"data_files": str(path)}
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS)
        if not files:
            raise DataError(f"{path}: no {'/'.join(_BUILDERS)} files in this directory")
        args, kwargs = (str(path),), {}
    elif cfg.path.startswith((".", "/", "~")) or cfg.path.endswith(tuple(_BUILDERS)):
        raise DataError(f"data.path {cfg.path} does not exist")
    else:  # a hub dataset id
        files, args, kwargs = [], (cfg.path, cfg.subset), {}
    for f in files:
        if f.suffix in (".json", ".jsonl"):
            _check_json_file(f, cfg)
    try:
        ds = datasets.load_dataset(*args, split=cfg.split, **kwargs)
    except (ValueError, OSError) as e:  # bad split, missing dataset, no network
        raise DataError(f"cannot load {cfg.path} (split {cfg.split!r}): {e}") from e
    if cfg.max_examples is not None:
        ds = ds.select(range(min(cfg.max_examples, len(ds))))
    if len(ds) == 0:
        raise DataError(f"{cfg.path}: the dataset has no examples")
    for k, rec in enumerate(ds):  # CSV, parquet and hub data get the same record checks
        if problem := check_record(rec, cfg):
            raise DataError(f"{cfg.path}: record {k + 1}: {problem}")
    return ds


def _render(tokenizer: Any, msgs: list[dict], where: str, gen: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    except Exception as e:  # jinja errors, e.g. a template that requires alternating roles
        raise DataError(f"{where}: the chat template failed: {e}") from e


def _chat_spans(
    tokenizer: Any, messages: list[dict], where: str
) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and find each assistant turn as a character span of the result."""
    render = lambda msgs, gen=False: _render(tokenizer, msgs, where, gen)
    full, spans = render(messages), []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        upto = render(messages[: i + 1])
        # A conversation that opens with the assistant has no prefix to render: start at 0.
        head = render(messages[:i], gen=True) if i else ""
        if not (full.startswith(upto) and upto.startswith(head)):
            raise DataError(
                f"{where}: the chat template does not render the conversation up to message {i} "
                "as a prefix of the whole, so assistant turns cannot be located; use "
                "train_on_inputs: true or another template"
            )
        spans.append((len(head), len(upto)))
    return full, spans


@dataclass(frozen=True)
class TokenizeStats:
    records: int
    examples: int
    truncated: int  # cut to max_seq_len + 1 tokens
    dropped: int  # no trained token left (after truncation)
    tokens: int  # positions filled: sum of (len - 1) over kept examples
    trained_tokens: int


def tokenize(
    records: Iterable[dict], tokenizer: Any, cfg: DataConfig
) -> tuple[list[Example], TokenizeStats]:
    """Records -> examples (tokens + trained mask) in ``cfg.format``; rules in the module doc."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("a fast tokenizer is needed: masks come from character offsets")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos_token; examples must end with one")
    if cfg.format == "chat" and not tokenizer.chat_template:
        raise DataError(
            "data.format is chat but the tokenizer has no chat_template; use a chat (instruct) "
            "tokenizer, or data.format alpaca or text"
        )
    texts: list[str] = []
    spans: list[list[tuple[int, int]] | None] = []  # None: every token trained
    for k, rec in enumerate(records):
        if cfg.format == "alpaca":
            prompt = alpaca_prompt(rec[cfg.instruction_field], rec.get(cfg.input_field))
            texts.append(prompt + rec[cfg.output_field])
            spans.append([(len(prompt), len(texts[-1]))])
        elif cfg.format == "text":
            texts.append(rec[cfg.text_field])
            spans.append(None)
        else:
            msgs = [{"role": m["role"], "content": m["content"]} for m in rec[cfg.messages_field]]
            where = f"{cfg.path}: record {k + 1}"
            if cfg.train_on_inputs:
                texts.append(_render(tokenizer, msgs, where))
                spans.append(None)
            else:
                text, found = _chat_spans(tokenizer, msgs, where)
                texts.append(text)
                spans.append(found)
    if not texts:
        raise DataError(f"{cfg.path}: the dataset has no examples")

    limit, truncated, dropped, examples = cfg.max_seq_len + 1, 0, 0, []
    add_eos = cfg.format != "chat"  # a chat template ends each turn itself
    for start in range(0, len(texts), 1024):
        enc = tokenizer(
            texts[start : start + 1024],
            add_special_tokens=cfg.format != "chat",  # chat templates write their own BOS
            return_offsets_mapping=True,
            return_attention_mask=False,
        )
        for ids, offsets, span in zip(
            enc["input_ids"], enc["offset_mapping"], spans[start : start + 1024], strict=True
        ):
            tokens = np.asarray(ids, np.int32)
            if span is None or cfg.train_on_inputs:
                trained = np.ones(len(tokens), bool)
            else:
                off = np.asarray(offsets, np.int64).reshape(-1, 2)  # (tokens, [start, end))
                trained = np.zeros(len(tokens), bool)
                for s, e in span:  # special tokens added by the tokenizer have empty offsets
                    trained |= (off[:, 1] > s) & (off[:, 0] < e) & (off[:, 1] > off[:, 0])
            if add_eos:
                if len(tokens) and tokens[-1] == eos:
                    trained[-1] = True
                else:
                    tokens, trained = np.append(tokens, np.int32(eos)), np.append(trained, True)
            if len(tokens) > limit:
                tokens, trained, truncated = tokens[:limit], trained[:limit], truncated + 1
            trained[:1] = False  # the first token is never a target
            if not trained.any():
                dropped += 1
                continue
            examples.append(Example(tokens, trained))

    stats = TokenizeStats(
        records=len(texts),
        examples=len(examples),
        truncated=truncated,
        dropped=dropped,
        tokens=sum(ex.length for ex in examples),
        trained_tokens=int(sum(ex.trained.sum() for ex in examples)),
    )
    if truncated:
        log.warning(
            "%d of %d examples truncated to max_seq_len=%d", truncated, len(texts), cfg.max_seq_len
        )
    if dropped:
        log.warning("%d of %d examples dropped: no trained token left", dropped, len(texts))
    if not examples:
        raise DataError(
            f"{cfg.path}: none of the {len(texts)} examples has a token to train on after "
            f"truncation to data.max_seq_len={cfg.max_seq_len} ({truncated} truncated); raise "
            "data.max_seq_len, or set data.train_on_inputs"
        )
    return examples, stats


def split_validation(
    examples: list[Example], val_size: int | float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, val): ``val_size`` (a fraction in (0, 1), at least 1 example, or a count) by seed.

    Both keep their original order; the choice depends only on ``seed`` and ``len(examples)``.
    """
    n = len(examples)
    n_val = val_size if isinstance(val_size, int) else max(1, round(val_size * n))
    if n_val == 0:
        return list(examples), []
    if n_val >= n:
        raise DataError(
            f"data.val_size={val_size} takes {n_val} of {n} examples, leaving none to train on"
        )
    is_val = np.zeros(n, bool)
    is_val[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    return [ex for ex, v in zip(examples, is_val, strict=True) if not v], [
        ex for ex, v in zip(examples, is_val, strict=True) if v
    ]


def build_datasets(
    cfg: DataConfig, tokenizer: Any, seed: int
) -> tuple[PackedDataset, PackedDataset | None]:
    """The whole pipeline: ``(train, val)`` packed datasets (``val`` None when ``val_size`` is 0).

    ``val`` holds ``val_size`` examples split off the data, or, when ``cfg.eval_path`` is set,
    every example of that held-out file (tokenized by the same rules).

    Padding positions carry ``tokenizer.pad_token_id`` (0 if it has none); they are masked out
    of the loss and of attention, so the id only has to be a valid embedding row.
    """
    records = load_records(cfg)
    examples, stats = tokenize(records, tokenizer, cfg)
    if cfg.eval_path is None:
        train, val = split_validation(examples, cfg.val_size, seed)
    else:  # a separate held-out file is the validation set (config ensures val_size == 0)
        held_out = dataclasses.replace(cfg, path=cfg.eval_path, max_examples=None)
        train, (val, _) = examples, tokenize(load_records(held_out), tokenizer, held_out)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_ds = PackedDataset.build(train, cfg.max_seq_len, cfg.packing, pad)
    val_ds = PackedDataset.build(val, cfg.max_seq_len, cfg.packing, pad) if val else None
    log.info(
        "data: %d records -> %d train / %d val examples, %d train rows of %d (%.0f%% filled), "
        "%d trained tokens",
        stats.records,
        len(train),
        len(val),
        len(train_ds),
        cfg.max_seq_len,
        100 * sum(ex.length for ex in train) / max(1, len(train_ds) * cfg.max_seq_len),
        train_ds.num_trained_tokens,
    )
    return train_ds, val_ds
