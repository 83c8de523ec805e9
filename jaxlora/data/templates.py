"""Named chat templates for ``data.chat_template``: each family's official template, verbatim.

A base model (Llama-3.1-8B, Mistral-7B-v0.1, gemma-2-9b, ...) ships no chat template, yet
``chat`` and ``sharegpt`` data are rendered with one and the model must be prompted with the
same at inference. ``data.chat_template=<name>`` picks the template its instruct sibling uses;
:func:`jaxlora.data.prompts.install_template` puts it on the run's tokenizer, so every export
carries it. Each is the ``chat_template`` of the tokenizer_config.json named below, unchanged:

* ``llama3``: meta-llama/Meta-Llama-3-8B-Instruct (``<|start_header_id|>role<|end_header_id|>``,
  turns closed by ``<|eot_id|>``, contents trimmed).
* ``chatml``: ChatML as transformers' chat-templating guide writes it (OpenHermes, Qwen's
  format without their default system prompt): ``<|im_start|>role\\n...<|im_end|>\\n``.
* ``mistral``: mistralai/Mistral-7B-Instruct-v0.2 = Mixtral-8x7B-Instruct-v0.1
  (``[INST] ... [/INST]answer</s>``; user/assistant only, alternating: no system role).
* ``gemma``: google/gemma-7b-it = gemma-2-*-it (``<start_of_turn>user|model``; no system role).
* ``phi3``: microsoft/Phi-3-mini-4k-instruct = Phi-3.5-mini-instruct (``<|user|>\\n...<|end|>\\n``;
  a conversation without the generation prompt ends with ``eos_token``).
* ``alpaca``: the Stanford Alpaca prompt as a template
  (:func:`jaxlora.data.prompts.alpaca_chat_template`, built there).

A template's special tokens must already be single tokens of the tokenizer; a missing one is
refused by name rather than added, since adding one means resizing the embeddings and training
them (``lora.modules_to_save``) through every export. Where a template closes each turn with
its own token (``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>``) that token becomes the
tokenizer's ``eos_token``, logged, so generation stops at the end of the answer, as the instruct
tokenizers do (Qwen2.5-Instruct's EOS is ``<|im_end|>``). A Jinja file is taken as written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxlora.config.recipe import CHAT_TEMPLATES
from jaxlora.data.packing import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NamedTemplate:
    jinja: str
    tokens: tuple[str, ...]  # special tokens it writes: each must be one token of the tokenizer
    bos: bool  # it writes bos_token, so the tokenizer needs one
    end_of_turn: str | None = None  # the token closing each turn, made the EOS


NAMED: dict[str, NamedTemplate] = {
    "llama3": NamedTemplate(
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        "+ message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
        tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        bos=True,
        end_of_turn="<|eot_id|>",
    ),
    "chatml": NamedTemplate(
        "{% for message in messages %}"
        "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        tokens=("<|im_start|>", "<|im_end|>"),
        bos=False,
        end_of_turn="<|im_end|>",
    ),
    "mistral": NamedTemplate(
        "{{ bos_token }}{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...')"
        " }}{% endif %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
        "{% endif %}{% endfor %}",
        tokens=(),
        bos=True,
    ),
    "gemma": NamedTemplate(
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...')"
        " }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
        "{% else %}{% set role = message['role'] %}{% endif %}"
        "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}",
        tokens=("<start_of_turn>", "<end_of_turn>"),
        bos=True,
        end_of_turn="<end_of_turn>",
    ),
    "phi3": NamedTemplate(
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
        "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
        "{% elif message['role'] == 'assistant' %}"
        "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}"
        "{% endif %}",
        tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        bos=False,
    ),
}


def _is_one_token(tokenizer: Any, token: str) -> bool:
    ids = tokenizer.encode(token, add_special_tokens=False)
    return len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == token


def named(name: str, tokenizer: Any) -> str:
    """The Jinja text of template ``name`` (not ``alpaca``), after checking ``tokenizer`` has
    what it writes; its end-of-turn token becomes ``tokenizer``'s EOS (changed in place)."""
    t = NAMED[name]
    missing = [tok for tok in t.tokens if not _is_one_token(tokenizer, tok)]
    if missing:
        raise DataError(
            f"data.chat_template={name} writes the special tokens {', '.join(missing)}, which "
            "this tokenizer does not have as single tokens; pick a template whose tokens it has "
            "(mistral and alpaca need none) or a tokenizer that has them (model.tokenizer)"
        )
    if t.bos and tokenizer.bos_token is None:
        raise DataError(f"data.chat_template={name} starts with bos_token; the tokenizer has none")
    if t.end_of_turn and tokenizer.eos_token != t.end_of_turn:
        log.warning(
            "data.chat_template=%s: eos_token %s -> %s (the template ends each turn with it, so "
            "generation stops there), in the run's tokenizer and everything it saves",
            name,
            tokenizer.eos_token,
            t.end_of_turn,
        )
        tokenizer.eos_token = t.end_of_turn
    return t.jinja


def from_file(value: str) -> str:
    """The Jinja text of a template file (``data.chat_template=<path>``), as written."""
    path = Path(value).expanduser()
    if not path.is_file():
        raise DataError(
            f"data.chat_template={value}: no such file (the named templates are "
            f"{', '.join(CHAT_TEMPLATES)})"
        )
    return path.read_text(encoding="utf-8")
