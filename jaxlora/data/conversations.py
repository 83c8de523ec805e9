"""Conversation records -> chat messages: ``chat`` (``{role, content}`` lists) and ShareGPT.

ShareGPT is the shape of the ShareGPT/Vicuna dumps and of the many datasets built like them
(OpenHermes, SlimOrca, WizardLM, LLaMA-Factory's and Axolotl's ``sharegpt`` type)::

    {"conversations": [{"from": "system", "value": "..."},
                       {"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}

The speaker names seen in those files are ``human``/``gpt``/``system``, and in later dumps the
chat names ``user``/``assistant`` themselves; :data:`SHAREGPT_ROLES` maps all five. Any other
speaker (``bing``, ``chatgpt``, ``observation``, ``function_call``, ...) is refused, naming the
record and the role, unless ``data.sharegpt_roles`` maps it (``data.sharegpt_roles.bing=
assistant``). Field names are ``data.conversations_field``, ``data.role_field`` and
``data.content_field``. The messages then take the chat path (:mod:`jaxlora.data.tokenize`).
"""

from __future__ import annotations

from jaxlora.config import DataConfig

CHAT_FORMATS = ("chat", "sharegpt")  # record formats rendered with a chat template

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


def roles(cfg: DataConfig) -> dict[str, str]:
    """ShareGPT speaker name -> chat role: the standard names plus ``data.sharegpt_roles``."""
    return {**SHAREGPT_ROLES, **cfg.sharegpt_roles}


def check_sharegpt(rec: dict, cfg: DataConfig) -> str | None:
    """What is wrong with one ShareGPT record, or None if nothing."""
    name, role, content = cfg.conversations_field, cfg.role_field, cfg.content_field
    turns = rec.get(name)
    if not isinstance(turns, list) or not turns:
        return f'field "{name}" must be a non-empty list of {{"{role}", "{content}"}} objects'
    known = roles(cfg)
    for j, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get(role), str):
            return f'{name}[{j}] must be an object with a string "{role}"'
        if t[role] not in known:
            return (
                f'{name}[{j}] has the unknown role "{t[role]}"; known: {", ".join(known)} '
                f"(map another with data.sharegpt_roles.{t[role]}=user|assistant|system|tool)"
            )
        if not isinstance(t.get(content), str):
            return f'{name}[{j}] must have a string "{content}"'
    system = rec.get("system")
    if system is not None and not isinstance(system, str):
        return 'field "system" (the conversation\'s system prompt) must be a string'
    if system and any(known[t[role]] == "system" for t in turns):
        return f'has both a "system" field and a system turn in "{name}"; keep one'
    return None


def messages(rec: dict, cfg: DataConfig) -> list[dict[str, str]]:
    """A checked ``chat`` or ``sharegpt`` record as ``[{role, content}, ...]``."""
    if cfg.format == "sharegpt":
        to_role = roles(cfg)
        # LLaMA-Factory's ShareGPT variant keeps the system prompt beside the conversation
        system = [{"role": "system", "content": rec["system"]}] if rec.get("system") else []
        return system + [
            {"role": to_role[t[cfg.role_field]], "content": t[cfg.content_field]}
            for t in rec[cfg.conversations_field]
        ]
    return [{"role": m["role"], "content": m["content"]} for m in rec[cfg.messages_field]]
