"""Records -> tokenized, loss-masked examples, in one of three formats.

* ``alpaca``: ``instruction``, optional ``input``, ``output``, in the Alpaca prompt template
  (``ALPACA_TEMPLATE``; ``ALPACA_TEMPLATE_NO_INPUT`` when the input is empty) as alpaca-lora's
  ``templates/alpaca.json`` writes it: Stanford Alpaca's ``train.py`` text with a newline
  after ``### Response:``. Tokens are ``BOS? + prompt + output + EOS``; the loss covers
  the output and EOS.
* ``chat``: ``messages`` (a list of ``{role, content}``) rendered with the tokenizer's chat
  template. The loss covers the assistant turns: the characters between the rendered prefix
  ``messages[:i]`` with the generation prompt and the rendered ``messages[:i+1]``, which
  includes the template's end-of-turn marker (so no extra EOS is appended).
* ``sharegpt``: ``conversations`` (a list of ``{from, value}``) mapped to chat messages
  (:mod:`jaxlora.data.conversations`), then as ``chat``.
* ``text``: ``text``; ``BOS? + text + EOS``, every token trained.

``BOS?`` is whatever ``add_special_tokens`` adds for this tokenizer. A token is trained when its
characters overlap a trained span (character offsets need a fast tokenizer).
``train_on_inputs`` trains every token. **Truncation**: an example longer than
``max_seq_len + 1`` tokens is cut from the right to ``max_seq_len + 1`` (it then fills exactly
``max_seq_len`` positions and may lose its EOS); an example left without any trained token is
dropped. Both counts are logged. If no example survives, :class:`DataError`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxlora.config import DataConfig
from jaxlora.config.recipe import CHAT_TEMPLATES
from jaxlora.data import conversations
from jaxlora.data.conversations import CHAT_FORMATS
from jaxlora.data.packing import DataError, Example

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


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """The Alpaca prompt (everything before the response); use it to sample from a model."""
    if input:
        return ALPACA_TEMPLATE.format(instruction=instruction, input=input)
    return ALPACA_TEMPLATE_NO_INPUT.format(instruction=instruction)


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
        eos = tokenizer.eos_token
        if not full.startswith(upto) and eos and full.startswith(upto.removesuffix(eos)):
            # The template closes only a whole conversation with EOS (Phi-3's does): this turn
            # ends before it, the last turn's span keeps it.
            upto = upto.removesuffix(eos)
        # A conversation that opens with the assistant has no prefix to render: start at 0.
        head = render(messages[:i], gen=True) if i else ""
        end = len(upto)
        if not (full.startswith(upto) and upto.startswith(head)):
            raise DataError(
                f"{where}: the chat template does not render the conversation up to message {i} "
                "as a prefix of the whole, so assistant turns cannot be located; use "
                "train_on_inputs: true or another template"
            )
        # Templates may trim the content (Llama 3's and Gemma's `| trim`): look for it trimmed.
        if m["content"].strip() not in upto[len(head) :]:
            raise DataError(
                f"{where}: the chat template does not render message {i}'s content in its turn "
                "(it rewrites or drops it), so the trained span cannot be checked; use "
                "train_on_inputs: true or another template"
            )
        spans.append((len(head), end))
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
    _check_tokenizer(tokenizer, cfg)
    texts, spans = render_records(records, tokenizer, cfg)
    if not texts:
        raise DataError(f"{cfg.path}: the dataset has no examples")
    examples, truncated, dropped = _encode(texts, spans, tokenizer, cfg)
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


def _check_tokenizer(tokenizer: Any, cfg: DataConfig) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("a fast tokenizer is needed: masks come from character offsets")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token; examples must end with one")
    if cfg.format in CHAT_FORMATS and not tokenizer.chat_template:
        raise DataError(
            f"data.format is {cfg.format} but the tokenizer has no chat_template; name one with "
            f"data.chat_template ({', '.join(CHAT_TEMPLATES)}, or a Jinja file), "
            "use a chat (instruct) tokenizer, or data.format alpaca or text"
        )


Spans = list[tuple[int, int]] | None  # trained character spans of a text; None: all of it


def render_records(
    records: Iterable[dict], tokenizer: Any, cfg: DataConfig
) -> tuple[list[str], list[Spans]]:
    """Each record as the text the model reads and the character spans it is trained on."""
    texts: list[str] = []
    spans: list[Spans] = []
    for k, rec in enumerate(records):
        if cfg.format == "alpaca":
            prompt = alpaca_prompt(rec[cfg.instruction_field], rec.get(cfg.input_field))
            texts.append(prompt + rec[cfg.output_field])
            spans.append([(len(prompt), len(texts[-1]))])
        elif cfg.format == "text":
            texts.append(rec[cfg.text_field])
            spans.append(None)
        else:
            msgs = conversations.messages(rec, cfg)
            where = f"{cfg.path}: record {k + 1}"
            if cfg.train_on_inputs:
                texts.append(_render(tokenizer, msgs, where))
                spans.append(None)
            else:
                text, found = _chat_spans(tokenizer, msgs, where)
                texts.append(text)
                spans.append(found)
    return texts, spans


def _encode(
    texts: list[str], spans: list[Spans], tokenizer: Any, cfg: DataConfig
) -> tuple[list[Example], int, int]:
    """Tokenize, mask, append EOS, truncate: ``(examples, truncated, dropped)``."""
    eos = tokenizer.eos_token_id
    limit, truncated, dropped, examples = cfg.max_seq_len + 1, 0, 0, []
    add_eos = cfg.format not in CHAT_FORMATS  # a chat template ends each turn itself
    for start in range(0, len(texts), 1024):
        enc = tokenizer(
            texts[start : start + 1024],
            add_special_tokens=add_eos,  # chat templates write their own BOS
            return_offsets_mapping=True,
            return_attention_mask=False,
        )
        for ids, offsets, span in zip(
            enc["input_ids"], enc["offset_mapping"], spans[start : start + 1024], strict=True
        ):
            tokens = np.asarray(ids, np.int32)
            trained = _trained_mask(offsets, span, len(tokens), cfg.train_on_inputs)
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
    return examples, truncated, dropped


def _trained_mask(offsets, span: Spans, n: int, train_on_inputs: bool) -> np.ndarray:
    """A token is trained when its characters overlap a trained span."""
    if span is None or train_on_inputs:
        return np.ones(n, bool)
    off = np.asarray(offsets, np.int64).reshape(-1, 2)  # (tokens, [start, end))
    trained = np.zeros(n, bool)
    for s, e in span:  # special tokens added by the tokenizer have empty offsets
        trained |= (off[:, 1] > s) & (off[:, 0] < e) & (off[:, 1] > off[:, 0])
    return trained


def tokenize_record(rec: dict, tokenizer: Any, cfg: DataConfig) -> tuple[Example | None, bool]:
    """One record -> ``(example, truncated)``, the rules of :func:`tokenize`, for examples made
    as a stream reaches them; ``example`` is None when no trained token is left."""
    texts, spans = render_records([rec], tokenizer, cfg)
    examples, truncated, _ = _encode(texts, spans, tokenizer, cfg)
    return (examples[0] if examples else None), truncated > 0


def check_tokenizer(tokenizer: Any, cfg: DataConfig) -> None:
    """What :func:`tokenize` checks first; a stream checks it before its first record."""
    _check_tokenizer(tokenizer, cfg)
