"""``python -m jaxlora.generate model=<dir|hub id> [adapter=<dir>] prompt=<text> [key=value ...]``

Ask a model (4-bit with ``quant=nf4``, with a PEFT adapter) and see the answer as it is
produced::

    python -m jaxlora.generate model=assets/demo/base quant=nf4 adapter=runs/demo/adapter \\
        prompt="In which town does Malmi Galpus live?"

* The prompt is a user turn rendered with the model's chat template — an adapter saved by a
  jaxlora run carries the prompt format it was trained with (the Alpaca prompt, or the chat
  template of chat data), so the model is asked the way it learned. ``raw=true`` sends the text
  as written (base models, text-format runs); a model without any chat template gets the text
  as written too, and a note says so.
* Several ``prompt=`` are answered as one batch; ``prompts=<file.jsonl>`` reads one prompt a
  line: ``{"prompt": text}``, ``{"messages": [{"role", "content"}, ...]}`` or Alpaca's
  ``{"instruction", "input"}``, answered in batches of ``batch_size``; ``output=<file.jsonl>``
  also writes ``{"prompt", "completion"}`` lines.
* ``interactive=true``: a conversation on the terminal (``/reset`` starts over, ``/exit`` or
  end of input quits); each answer joins the conversation.
* One ``adapter=``: a command answers with one model. Several adapters on one base, switched
  between prompts, are the Python API (``Model.load_adapter(dir, name=...)``, ``set_adapter``;
  docs/interop.md), which loads the base once for all of them.
* Tokens are printed as they are produced (``stream=false``: each answer when it is complete).
  Greedy by default; ``temperature``, ``top_k``, ``top_p``, ``seed`` sample.

Arguments use the grammar of every jaxlora command (``key=value``, values read as YAML, a
misspelled key names the nearest one). The library calls are :func:`jaxlora.sampling.generate`
and :func:`jaxlora.sampling.stream`; prompts are encoded by :mod:`jaxlora.data.prompts`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TextIO

from jaxlora import data
from jaxlora.config import ConfigError, DataConfig, Section, from_argv
from jaxlora.config.typed import GE0, GE1, check
from jaxlora.model import Model, load_model
from jaxlora.sampling import generate, stream

__all__ = ["GenerateArgs", "generate", "main", "read_prompts"]


@dataclass(frozen=True)
class GenerateArgs(Section):
    """What ``python -m jaxlora.generate`` takes."""

    _ranges: ClassVar = {
        "max_new_tokens": GE1,
        "top_k": GE0,
        "temperature": GE0,
        "batch_size": GE1,
    }
    model: str
    prompt: tuple[str, ...] = ()
    prompts: str | None = None
    interactive: bool = False
    raw: bool = False
    adapter: str | None = None
    quant: Literal["none", "nf4", "fp4"] = "none"
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stream: bool = True
    batch_size: int = 8
    output: str | None = None

    def _validate(self) -> None:
        given = [bool(self.prompt), self.prompts is not None, self.interactive]
        check(
            sum(given) == 1,
            "prompt",
            "give prompt=<text> (repeatable), prompts=<file.jsonl> or interactive=true — one of "
            "them",
        )
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1]; got {self.top_p}")
        check(
            self.temperature > 0 or (self.top_k == 0 and self.top_p == 1),
            "temperature",
            f"top_k={self.top_k} / top_p={self.top_p} choose among sampled tokens, and "
            "temperature=0 decodes greedily; set temperature > 0 (e.g. 0.7) to sample",
        )
        check(
            self.output is None or not self.interactive,
            "output",
            "interactive=true writes nothing; use prompt= or prompts= with output=",
        )


@dataclass(frozen=True)
class Item:
    """One prompt to answer: what the model is sent, and how it is shown (the user's words).
    ``plain`` marks free text (``prompt=``, a ``prompt`` line), which becomes a user turn
    where the model has a chat template (:meth:`for_model`)."""

    prompt: data.Prompt
    label: str
    plain: bool = False

    def for_model(self, has_template: bool, raw: bool, where: str) -> Item:
        if self.plain:
            as_turn = has_template and not raw
            return Item(data.user_prompt(self.label) if as_turn else self.label, self.label)
        if not has_template:
            raise ConfigError(
                f"{where}: a conversation needs a chat template and the model has none; give "
                'the prompt as text ({"prompt": ...})'
            )
        return self


def read_prompts(path: str | Path) -> list[tuple[str, Item]]:
    """``(where, item)`` for each line of a ``.jsonl`` file of prompts (blank lines skipped);
    a malformed line is refused naming its number. ``prompt`` lines are text (a user turn
    unless ``raw=true``); ``messages`` and ``instruction`` lines are conversations, which
    always go through the chat template."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompts: {path} is not a file")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON ({e.msg})") from None
        items.append((where, _item(rec, where)))
    if not items:
        raise ConfigError(f"prompts: {path} has no prompts")
    return items


_CHAT = DataConfig(path="prompts", format="chat")  # a prompts line with "messages"


def _item(rec: Any, where: str) -> Item:
    text = lambda v, key: v if isinstance(v, str) else _bad(where, f"{key!r} must be a string")
    if not isinstance(rec, dict):
        _bad(where, "expected a JSON object")
    if "prompt" in rec:
        p = text(rec["prompt"], "prompt")
        return Item(p, p, plain=True)
    if "messages" in rec:
        # the check training data gets (data.check_record), for a chat record
        if problem := data.check_record(rec, _CHAT):
            _bad(
                where,
                f"'messages' must be a non-empty list of {{role, content}} strings: {problem}",
            )
        msgs = rec["messages"]
        return Item(
            [{"role": m["role"], "content": m["content"]} for m in msgs], msgs[-1]["content"]
        )
    if "instruction" in rec:
        inst = text(rec["instruction"], "instruction")
        inp = text(rec.get("input") or "", "input")
        return Item(data.user_prompt(inst, inp), f"{inst} [{inp}]" if inp else inst)
    _bad(where, "expected a 'prompt', 'messages' or 'instruction' field")
    raise AssertionError  # unreachable: _bad raises


def _bad(where: str, msg: str):
    raise ConfigError(f"{where}: {msg}")


class Printer:
    """Writes answers in prompt order while the batch decodes: the first unfinished answer's
    tokens as they come, each later one as soon as those before it are complete."""

    def __init__(self, items: Sequence[Item], out: TextIO, header: bool = True, first: int = 0):
        self.items, self.out, self.header, self.first = items, out, header, first
        self.current, self.shown = 0, ""
        self._start()

    def _start(self) -> None:
        if self.header and self.current < len(self.items):
            gap = "\n" if self.first + self.current else ""  # blank lines between answers only
            self.out.write(f"{gap}### {self.items[self.current].label}\n")
            self.out.flush()

    def update(self, texts: Sequence[str], done: Sequence[bool]) -> None:
        while self.current < len(self.items):
            text = texts[self.current]
            # hold back a trailing partial character (a token that ends inside a UTF-8 sequence)
            stable = text if done[self.current] else text.rstrip("\ufffd")
            if stable.startswith(self.shown):
                self.out.write(stable[len(self.shown) :])
                self.shown = stable
            if not done[self.current]:
                self.out.flush()
                return
            self.out.write("\n")
            self.current, self.shown = self.current + 1, ""
            self._start()
        self.out.flush()

    def finish(self, texts: Sequence[str]) -> None:
        self.update(texts, [True] * len(texts))


def answer(
    model: Model, items: Sequence[Item], args: GenerateArgs, out: TextIO, header: bool = True
) -> list[str]:
    """Answer ``items`` in batches of ``args.batch_size``, printing as they are produced, each
    under a ``### prompt`` line (``header=False``: the answers alone)."""
    kw = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    texts: list[str] = []
    for start in range(0, len(items), args.batch_size):
        batch = list(items[start : start + args.batch_size])
        prompts = [it.prompt for it in batch]
        if args.stream:
            printer, last = Printer(batch, out, header, first=start), [""] * len(batch)
            for partial in stream(model, prompts, **kw):
                printer.update(partial.texts, partial.done)
                last = partial.texts
            printer.finish(last)
            texts += last
        else:
            outs = generate(model, prompts, **kw)
            for i, (it, text) in enumerate(zip(batch, outs, strict=True), start):
                gap = "\n" if i else ""
                out.write(f"{gap}### {it.label}\n{text}\n" if header else f"{text}\n")
            out.flush()
            texts += outs
    return texts


def converse(model: Model, args: GenerateArgs, stdin: TextIO, out: TextIO) -> None:
    """The interactive loop: each line is a user turn of one conversation (or, raw, a
    continuation of one transcript); each answer is streamed and joins it."""
    templated = not args.raw and data.has_template(model.tokenizer)
    print(
        "jaxlora.generate: type a message; /reset starts over, /exit or end of input quits",
        file=sys.stderr,
    )
    history: list[dict] = []
    transcript = ""
    interactive_tty = stdin.isatty()
    while True:
        if interactive_tty:
            out.write("> ")
            out.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return
        line = line.rstrip("\n")
        if line.strip() == "/reset":
            history, transcript = [], ""
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        prompt: data.Prompt = (
            [*history, {"role": "user", "content": line}] if templated else transcript + line
        )
        (reply,) = answer(model, [Item(prompt, line)], args, out, header=False)
        if templated:
            history = [*prompt, {"role": "assistant", "content": reply}]
        else:
            transcript = prompt + reply


def _write_jsonl(path: Path, items: Sequence[Item], texts: Sequence[str]) -> None:
    """Write the answers next to a temporary name, then rename: an existing file is replaced
    whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for it, text in zip(items, texts, strict=True):
            f.write(json.dumps({"prompt": it.label, "completion": text}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _read_items(args: GenerateArgs) -> list[tuple[str, Item]]:
    if args.prompts is not None:
        return read_prompts(args.prompts)
    return [(f"prompt {i + 1}", Item(p, p, plain=True)) for i, p in enumerate(args.prompt)]


def main(argv: Sequence[str] | None = None, stdin: TextIO | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0 if argv else 2
    try:
        args = from_argv(GenerateArgs, argv, repeatable=("prompt",))
        read = [] if args.interactive else _read_items(args)  # a bad file fails before loading
    except ConfigError as e:
        print(f"jaxlora.generate: {e}", file=sys.stderr)
        return 2
    quant = None if args.quant == "none" else args.quant
    model = load_model(args.model, dtype=args.dtype, quant=quant, adapter=args.adapter)
    has_template = data.has_template(model.tokenizer)
    if not args.raw and not has_template:
        print(
            "jaxlora.generate: the model has no chat template; prompts are sent as written",
            file=sys.stderr,
        )
    try:
        items = [it.for_model(has_template, args.raw, where) for where, it in read]
    except ConfigError as e:
        print(f"jaxlora.generate: {e}", file=sys.stderr)
        return 2
    out = sys.stdout
    if args.interactive:
        converse(model, args, stdin or sys.stdin, out)
        return 0
    texts = answer(model, items, args, out)
    if args.output:
        _write_jsonl(Path(args.output), items, texts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
