"""Data: records -> tokenized, loss-masked examples -> packed rows -> resumable batches.

``build_datasets(cfg.data, tokenizer, seed)`` runs the whole pipeline:

1. :func:`~jaxlora.data.records.load_records`: a local ``.json``/``.jsonl``/``.csv``/
   ``.parquet`` file, a directory of them, or a hub dataset id, every record checked.
2. :func:`~jaxlora.data.tokenize.tokenize`: each record becomes an
   :class:`~jaxlora.data.packing.Example` (``alpaca``, ``chat``, ``sharegpt`` or ``text``;
   rules there; :mod:`~jaxlora.data.conversations` maps ShareGPT records to chat messages).
3. :func:`split_validation`: ``val_size`` (fraction or count) examples, chosen by ``seed``;
   or, with ``eval_path``, that held-out file is the validation set.
4. :meth:`PackedDataset.build <jaxlora.data.packing.PackedDataset.build>` and
   :func:`~jaxlora.data.packing.batches`: rows, batches, the checkpointable iterator.

With ``data.streaming`` or ``data.sources`` the same steps run per example as the records
arrive instead (:mod:`~jaxlora.data.streams`: hub streams, weighted mixtures, their position).

:mod:`~jaxlora.data.prompts` is the other direction: the prompt format a run trains with, as
the chat template its exports carry (:mod:`~jaxlora.data.templates`: the named templates of
``data.chat_template``), and the one prompt encoder everything that samples uses.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from jaxlora.config import DataConfig
from jaxlora.data.conversations import CHAT_FORMATS
from jaxlora.data.conversations import messages as conversation
from jaxlora.data.packing import BatchIterator, DataError, Example, PackedDataset, batches
from jaxlora.data.prompts import Prompt, alpaca_chat_template, has_template, install_template
from jaxlora.data.prompts import encode as encode_prompt
from jaxlora.data.prompts import render as render_prompt
from jaxlora.data.prompts import user as user_prompt
from jaxlora.data.records import check_record, held_out, load_records, load_tokenizer
from jaxlora.data.streams import ExampleStream, MixtureSampler, StreamIterator, build_stream
from jaxlora.data.tokenize import (
    ALPACA_TEMPLATE,
    ALPACA_TEMPLATE_NO_INPUT,
    TokenizeStats,
    alpaca_prompt,
    tokenize,
)

__all__ = [
    "ALPACA_TEMPLATE",
    "ALPACA_TEMPLATE_NO_INPUT",
    "BatchIterator",
    "CHAT_FORMATS",
    "DataError",
    "Example",
    "ExampleStream",
    "MixtureSampler",
    "PackedDataset",
    "Prompt",
    "StreamIterator",
    "TokenizeStats",
    "alpaca_chat_template",
    "alpaca_prompt",
    "batches",
    "build_datasets",
    "build_stream",
    "check_record",
    "held_out",
    "conversation",
    "encode_prompt",
    "has_template",
    "install_template",
    "load_records",
    "load_tokenizer",
    "render_prompt",
    "split_validation",
    "tokenize",
    "user_prompt",
]

log = logging.getLogger(__name__)


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
) -> tuple[PackedDataset | ExampleStream, PackedDataset | None]:
    """The whole pipeline: ``(train, val)`` packed datasets (``val`` None when ``val_size`` is 0).

    ``val`` holds ``val_size`` examples split off the data, or, when ``cfg.eval_path`` is set,
    every example of that held-out file (tokenized by the same rules). A streamed dataset or a
    mixture (``cfg.is_stream``) gives an :class:`ExampleStream` instead: see :func:`build_stream`.

    Padding positions carry ``tokenizer.pad_token_id`` (0 if it has none); they are masked out
    of the loss and of attention, so the id only has to be a valid embedding row.
    """
    if cfg.is_stream:
        return build_stream(cfg, tokenizer, seed)
    records = load_records(cfg)
    examples, stats = tokenize(records, tokenizer, cfg)
    if cfg.eval_path is None:
        train, val = split_validation(examples, cfg.val_size, seed)
    else:  # a separate held-out file is the validation set (config ensures val_size == 0)
        held = held_out(cfg)
        train, (val, _) = examples, tokenize(load_records(held), tokenizer, held)
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
