"""An Ollama ``Modelfile`` for an exported GGUF: FROM, ADAPTER, TEMPLATE and stop tokens.

Ollama prompts with a Go ``text/template``, not the tokenizer's Jinja chat template, so the
template is translated. Rather than parse Jinja, the chat template is *measured*: rendered on
conversations whose contents are markers, it yields each role's text before and after the
content, the text once at the start and the generation prompt (:func:`turn_format`). That
covers every template that wraps each message the same way wherever it stands — the Alpaca
template jaxlora installs (:mod:`jaxlora.data.prompts`), ChatML (Qwen), Llama 3 — and the
measurement is checked by rendering a longer conversation both ways: a template with any other
logic (a default system prompt, a system message folded into the first user turn) fails the
check and is refused by name (:class:`TemplateError`), never translated approximately.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
_MARK = "\ue000{}\ue001"  # a content no template changes (private-use characters, not space)


class TemplateError(ValueError):
    """A chat template that cannot be written as an Ollama template."""


@dataclasses.dataclass(frozen=True)
class TurnFormat:
    """A chat template as text around each message: ``head`` once, then per message
    ``before[role] + content + after[role]``, then ``generation`` (the assistant's cue)."""

    head: str
    before: dict[str, str]
    after: dict[str, str]
    generation: str

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        body = "".join(
            self.before[m["role"]] + m["content"] + self.after[m["role"]] for m in messages
        )
        return self.head + body + (self.generation if add_generation_prompt else "")


def _render(tokenizer: Any, roles: list[str], generation: bool = False) -> str:
    messages = [{"role": r, "content": _MARK.format(f"{r}{i}")} for i, r in enumerate(roles)]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _render_system(tokenizer: Any) -> str | None:
    """A system + user conversation rendered, or ``None`` when the template refuses a system
    message (Alpaca's raises: it has none)."""
    try:
        return _render(tokenizer, ["system", "user"])
    except Exception:  # jinja's raise_exception, whatever error type the tokenizer wraps it in
        return None


def _between(text: str, *roles_at: str) -> list[str]:
    """``text`` split at the markers ``roles_at`` (``"user0"``, ...), which must all occur."""
    parts, rest = [], text
    for r in roles_at:
        mark = _MARK.format(r)
        if mark not in rest:
            raise TemplateError(f"the chat template does not render message {r!r} as written")
        head, rest = rest.split(mark, 1)
        parts.append(head)
    return [*parts, rest]


def _strip(text: str, prefix: str = "", suffix: str = "") -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)) or len(text) < len(prefix + suffix):
        raise TemplateError("the chat template wraps a message differently depending on its place")
    return text[len(prefix) : len(text) - len(suffix)]


def turn_format(tokenizer: Any) -> TurnFormat:
    """Measure ``tokenizer``'s chat template as a :class:`TurnFormat`; :class:`TemplateError`
    when it is not one (checked on a conversation with every role, the user and assistant twice)."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the tokenizer has no chat template")
    try:
        head_u, between_ua, after_a = _between(
            _render(tokenizer, ["user", "assistant"]), "user0", "assistant1"
        )
        _, _, between_au, after_u = _between(
            _render(tokenizer, ["user", "assistant", "user"]), "user0", "assistant1", "user2"
        )
        plain = _render(tokenizer, ["user"])
        generation = _strip(_render(tokenizer, ["user"], generation=True), prefix=plain)
        before_u = _strip(between_au, prefix=after_a)
        before = {"user": before_u, "assistant": _strip(between_ua, prefix=after_u)}
        after = {"user": after_u, "assistant": after_a}
        head = _strip(head_u, suffix=before_u)
        if (system := _render_system(tokenizer)) is not None:
            head_s, between_su, _ = _between(system, "system0", "user1")
            before["system"] = _strip(head_s, prefix=head)
            after["system"] = _strip(between_su, suffix=before_u)
        fmt = TurnFormat(head, before, after, generation)
        roles = [r for r in ("system",) if r in before] + ["user", "assistant"] * 2 + ["user"]
        messages = [{"role": r, "content": _MARK.format(f"{r}{i}")} for i, r in enumerate(roles)]
        expected = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    except TemplateError as e:
        raise TemplateError(f"cannot translate the chat template for Ollama: {e}") from None
    if fmt.render(messages) != expected:
        raise TemplateError(
            "cannot translate the chat template for Ollama: it does not wrap every message the "
            "same way (e.g. a default system prompt, or a system message merged into a turn)"
        )
    return fmt


def _go_literal(text: str) -> str:
    if "{{" in text or "}}" in text:
        raise TemplateError(f"the chat template's text {text!r} holds '{{{{' or '}}}}'")
    return text


def go_template(fmt: TurnFormat, *, drop: str = "") -> str:
    """``fmt`` as an Ollama (Go ``text/template``) TEMPLATE over ``.Messages``. ``drop``: text
    removed from the start of ``head`` (the BOS token, which llama.cpp adds itself)."""
    head = fmt.head.removeprefix(drop)
    branches = []
    for i, role in enumerate(r for r in ROLES if r in fmt.before):
        keyword = "if" if i == 0 else "else if"
        branches.append(
            f'{{{{ {keyword} eq .Role "{role}" }}}}{_go_literal(fmt.before[role])}'
            f"{{{{ .Content }}}}{_go_literal(fmt.after[role])}"
        )
    return (
        _go_literal(head)
        + "{{ range .Messages }}"
        + "".join(branches)
        + "{{ end }}{{ end }}"
        + _go_literal(fmt.generation)
    )


def stop_tokens(fmt: TurnFormat, eos_token: str | None) -> list[str]:
    """Where a reply ends: the EOS token and the text that closes an assistant turn."""
    stops = [eos_token or "", fmt.after["assistant"].strip()]
    return list(dict.fromkeys(s for s in stops if s))


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile(
    tokenizer: Any, model_file: str, *, adapter_file: str | None = None, add_bos: bool
) -> str:
    """The Modelfile text. ``add_bos``: llama.cpp puts BOS first itself (the GGUF's
    ``tokenizer.ggml.add_bos_token``), so a template's leading BOS is dropped. Raises
    :class:`TemplateError` for a chat template it cannot translate."""
    fmt = turn_format(tokenizer)
    bos = tokenizer.bos_token if add_bos and tokenizer.bos_token else ""
    lines = [f"FROM ./{model_file}"]
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    lines.append(f'TEMPLATE """{go_template(fmt, drop=bos)}"""')
    lines += [f"PARAMETER stop {_quote(s)}" for s in stop_tokens(fmt, tokenizer.eos_token)]
    return "\n".join(lines) + "\n"


def write_modelfile(directory: str | Path, text: str) -> Path:
    """``directory/Modelfile`` (written to a temporary name and renamed)."""
    path = Path(directory) / "Modelfile"
    tmp = path.with_name(".Modelfile.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
