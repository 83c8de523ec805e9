"""The prompt format a run trains with, as a chat template that travels with what it exports.

A fine-tuned model only answers well when it is prompted the way it was trained. For ``chat``
data that is the tokenizer's own chat template; for ``alpaca`` data it is the Stanford Alpaca
prompt, which this module writes *as* a chat template (:func:`alpaca_chat_template`): a user
turn is the instruction (and, in the message's optional ``input`` key, the input), the assistant
turn is the output followed by EOS. Installed on the run's tokenizer (:func:`install_template`),
it is saved with every export, so ``tokenizer.apply_chat_template`` in transformers, vLLM's chat
endpoint and ``python -m jaxlora.generate`` all build the token ids the model was trained on.

Everything that prompts a model — generate, the held-out exact match, the samples printed
during training, the notebook — goes through :func:`encode`: a ``str`` is sent as written, a
list of messages is rendered with the tokenizer's chat template.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from jaxlora.config import DataConfig
from jaxlora.data import templates
from jaxlora.data.packing import DataError
from jaxlora.data.tokenize import ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT

log = logging.getLogger(__name__)

Message = dict[str, Any]  # {"role": "system"|"user"|"assistant", "content": str[, "input": str]}
Prompt = str | Sequence[Message]  # text sent as written, or a conversation to template


def _literal(text: str) -> str:
    """``text`` as a Jinja expression (a quoted string: no tag or whitespace rule can touch it)."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return "{{ '" + escaped + "' }}"


def _split(template: str, *fields: str) -> list[str]:
    """``template``'s literal text between its ``{field}`` slots, in order."""
    parts, rest = [], template
    for f in fields:
        head, rest = rest.split("{" + f + "}")
        parts.append(head)
    return [*parts, rest]


def alpaca_chat_template(bos: bool) -> str:
    """The Alpaca prompt as a Jinja chat template.

    One user turn (``content`` = instruction, optional ``input``) renders exactly
    :func:`jaxlora.data.alpaca_prompt`, which ends with ``### Response:\\n``, so the generation
    prompt is already there; an assistant turn renders its content and ``eos_token``, as training
    appends EOS to the output. ``bos``: start with ``bos_token``, for tokenizers that add one
    (the template's text is tokenized without special tokens, as chat templates are). Further
    turns repeat the block; a system message is refused (Alpaca has none).
    """
    with_input = _split(ALPACA_TEMPLATE, "instruction", "input")
    no_input = _split(ALPACA_TEMPLATE_NO_INPUT, "instruction")
    return "".join(
        [
            "{{ bos_token }}" if bos else "",
            "{% for message in messages %}",
            "{% if message['role'] == 'user' %}",
            "{% if message.input is defined and message.input %}",
            _literal(with_input[0]),
            "{{ message['content'] }}",
            _literal(with_input[1]),
            "{{ message.input }}",
            _literal(with_input[2]),
            "{% else %}",
            _literal(no_input[0]),
            "{{ message['content'] }}",
            _literal(no_input[1]),
            "{% endif %}",
            "{% elif message['role'] == 'assistant' %}",
            "{{ message['content'] }}{{ eos_token }}",
            "{% else %}",
            "{{ raise_exception('the alpaca prompt format has only user and assistant turns, "
            "got ' + message['role']) }}",
            "{% endif %}",
            "{% endfor %}",
        ]
    )


def adds_bos(tokenizer: Any) -> bool:
    """Whether encoding text with special tokens puts ``bos_token`` first (Llama: yes; Qwen: no)."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return bos is not None and len(ids) > 0 and ids[0] == bos


def install_template(tokenizer: Any, cfg: DataConfig) -> Any:
    """Give ``tokenizer`` the chat template of the prompt format ``cfg`` trains with.

    ``alpaca``: the Alpaca template (replacing the model's own, which the log says); ``chat``: the
    tokenizer's own template, unchanged (tokenization already requires one); ``text``: unchanged —
    the model trains on raw text. ``data.chat_template`` (chat and sharegpt data) replaces any of
    these: :func:`install_chosen`. Returns the same tokenizer, changed in place.
    """
    if cfg.chat_template is not None:
        return install_chosen(tokenizer, cfg.chat_template)
    if cfg.format != "alpaca":
        return tokenizer
    template = alpaca_chat_template(adds_bos(tokenizer))
    own = getattr(tokenizer, "chat_template", None)
    if own and own != template:
        log.warning(
            "data.format=alpaca: the run's Alpaca prompt template replaces the tokenizer's own "
            "chat template in everything it saves (adapter, merged, bnb4)"
        )
    tokenizer.chat_template = template
    return tokenizer


def install_chosen(tokenizer: Any, choice: str) -> Any:
    """Put the template ``data.chat_template=choice`` (a name in
    :mod:`~jaxlora.data.templates` or a Jinja file) on ``tokenizer``, logging what it replaces."""
    if choice == "alpaca":
        template = alpaca_chat_template(adds_bos(tokenizer))
    elif choice in templates.NAMED:
        template = templates.named(choice, tokenizer)
    else:
        template = templates.from_file(choice)
    own = getattr(tokenizer, "chat_template", None)
    if own and own != template:
        log.warning(
            "data.chat_template=%s replaces the tokenizer's own chat template in the run and in "
            "everything it saves (adapter, merged, bnb4)",
            choice,
        )
    tokenizer.chat_template = template
    return tokenizer


def user(instruction: str, input: str | None = None) -> list[Message]:
    """A one-turn conversation: the user's ``instruction`` (with Alpaca's ``input`` if given)."""
    msg: Message = {"role": "user", "content": instruction}
    if input:
        msg["input"] = input
    return [msg]


def has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer: Any, prompt: Prompt) -> str:
    """The text the model reads for ``prompt`` (a conversation ends with the generation prompt)."""
    if isinstance(prompt, str):
        return prompt
    if not has_template(tokenizer):
        raise DataError(
            "a conversation prompt needs a chat template, and the tokenizer has none; send the "
            "prompt as plain text (generate: raw=true)"
        )
    try:
        return tokenizer.apply_chat_template(
            _fold_inputs(tokenizer, prompt), tokenize=False, add_generation_prompt=True
        )
    except Exception as e:  # jinja errors: a role the template refuses, non-alternating turns
        raise DataError(f"the chat template failed on the prompt: {e}") from e


def _fold_inputs(tokenizer: Any, prompt: Sequence[Message]) -> list[Message]:
    """The messages as the template reads them: an Alpaca ``input`` (:func:`user`) is a field
    only jaxlora's Alpaca template renders; for any other template it joins the content after
    a blank line, so it is not silently left out."""
    template = tokenizer.chat_template
    alpaca = any(template == alpaca_chat_template(bos) for bos in (True, False))
    if alpaca or not any(m.get("input") for m in prompt):
        return list(prompt)
    return [
        {k: v for k, v in m.items() if k != "input"}
        | ({"content": f"{m['content']}\n\n{m['input']}"} if m.get("input") else {})
        for m in prompt
    ]


def encode(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of ``prompt``: text with the tokenizer's special tokens (BOS) as training adds
    them, a conversation rendered by the chat template (which writes its own)."""
    text = render(tokenizer, prompt)
    return list(tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"])
