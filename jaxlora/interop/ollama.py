"""An Ollama ``Modelfile`` for an exported GGUF: FROM, ADAPTER, TEMPLATE and stop tokens.

Ollama prompts with a Go ``text/template``, not the tokenizer's Jinja chat template, so the
template is translated. Rather than parse Jinja, the chat template is *measured*: rendered on
conversations whose contents are markers, it yields each role's text before and after the
content, the text once at the start, the generation prompt and a default system prompt the
template inserts when a conversation has none (Qwen2.5's; the Modelfile's ``SYSTEM``)
(:func:`turn_format`). That covers every template that wraps each message the same way wherever
it stands — the Alpaca template jaxlora installs (:mod:`jaxlora.data.prompts`), ChatML (Qwen),
Llama 3 — and the measurement is checked by rendering longer conversations, with and without a
system message, both ways: a template with other logic (a system message folded into the first
user turn, dates written into the system turn) fails the check and is refused by name
(:class:`TemplateError`), never translated approximately.
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
    default_system: str = ""  # the system prompt used when a conversation has none

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt for ``messages`` (ending with the generation prompt), as Ollama builds it:
        the default system prompt first when there is no system message."""
        if self.default_system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system}, *messages]
        body = "".join(
            self.before[m["role"]] + m["content"] + self.after[m["role"]] for m in messages
        )
        return self.head + body + self.generation


def _messages(roles: list[str]) -> list[dict[str, str]]:
    return [{"role": r, "content": _MARK.format(f"{r}{i}")} for i, r in enumerate(roles)]


def _render(tokenizer: Any, roles: list[str], generation: bool = False) -> str:
    return tokenizer.apply_chat_template(
        _messages(roles), tokenize=False, add_generation_prompt=generation
    )


def _split(tokenizer: Any, roles: list[str]) -> list[str]:
    """The text around each message of a conversation of ``roles`` (one more part than roles)."""
    parts, rest = [], _render(tokenizer, roles)
    for i, r in enumerate(roles):
        mark = _MARK.format(f"{r}{i}")
        if mark not in rest:
            raise TemplateError(f"the chat template does not render a {r} message as written")
        head, rest = rest.split(mark, 1)
        parts.append(head)
    return [*parts, rest]


def _takes_system(tokenizer: Any) -> bool:
    """Whether the template renders a system message (Alpaca's raises: it has none)."""
    try:
        _render(tokenizer, ["system", "user"])
    except Exception:  # jinja's raise_exception, whatever error type the tokenizer wraps it in
        return False
    return True


def _strip(text: str, prefix: str = "", suffix: str = "") -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)) or len(text) < len(prefix + suffix):
        raise TemplateError("the chat template wraps a message differently depending on its place")
    return text[len(prefix) : len(text) - len(suffix)]


def turn_format(tokenizer: Any) -> TurnFormat:
    """Measure ``tokenizer``'s chat template as a :class:`TurnFormat`; :class:`TemplateError`
    when it is not one (checked on conversations with and without a system message)."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the tokenizer has no chat template")
    try:
        fmt = _measure(tokenizer)
    except TemplateError as e:
        raise TemplateError(f"cannot translate the chat template for Ollama: {e}") from None
    checks = [["user", "assistant", "user", "assistant", "user"]]
    if "system" in fmt.before:
        checks.append(["system", *checks[0]])
    for roles in checks:
        expected = _render(tokenizer, roles, generation=True)
        if fmt.render(_messages(roles)) != expected:
            raise TemplateError(
                "cannot translate the chat template for Ollama: it does not wrap every message "
                "the same way (e.g. a system message merged into a turn, or text that changes)"
            )
    return fmt


def _measure(tokenizer: Any) -> TurnFormat:
    """The pieces of :class:`TurnFormat`, from conversations that start with a system message
    when the template takes one (so no default system prompt is inserted into them)."""
    first = ["system"] if _takes_system(tokenizer) else []
    n = len(first)
    one = _split(tokenizer, [*first, "user", "assistant"])
    two = _split(tokenizer, [*first, "user", "assistant", "user"])
    after = {"user": two[-1], "assistant": one[-1]}
    before = {"user": _strip(two[n + 2], prefix=after["assistant"])}
    before["assistant"] = _strip(one[n + 1], prefix=after["user"])
    only_user = _split(tokenizer, ["user"])[0]  # head (+ a default system turn) + before user
    plain = _render(tokenizer, ["user"])
    generation = _strip(_render(tokenizer, ["user"], generation=True), prefix=plain)
    if not first:
        return TurnFormat(_strip(only_user, suffix=before["user"]), before, after, generation)
    after["system"] = _strip(one[1], suffix=before["user"])
    head_and_before_system = one[0]
    default = only_user.removesuffix(before["user"])
    if default.startswith(head_and_before_system) and default.endswith(after["system"]):
        default_system = _strip(default, prefix=head_and_before_system, suffix=after["system"])
        if not default_system:
            raise TemplateError("the template writes an empty system turn when there is none")
        bos = tokenizer.bos_token or ""
        head = bos if bos and head_and_before_system.startswith(bos) else ""
    else:  # no default: what precedes the user turn alone is the head
        head, default_system = _strip(only_user, suffix=before["user"]), ""
    before["system"] = _strip(head_and_before_system, prefix=head)
    return TurnFormat(head, before, after, generation, default_system)


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
    if fmt.default_system:
        if '"""' in fmt.default_system:
            raise TemplateError('the default system prompt holds """, which a Modelfile cannot')
        lines.append(f'SYSTEM """{fmt.default_system}"""')
    lines += [f"PARAMETER stop {_quote(s)}" for s in stop_tokens(fmt, tokenizer.eos_token)]
    return "\n".join(lines) + "\n"


def write_modelfile(directory: str | Path, text: str) -> Path:
    """``directory/Modelfile`` (written to a temporary name and renamed)."""
    path = Path(directory) / "Modelfile"
    tmp = path.with_name(".Modelfile.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
