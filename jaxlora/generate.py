"""``python -m jaxlora.generate model=<dir|hub id> prompt=<text> [key=value ...]``

Greedy (or sampled) completions of one or more prompts with a base model, optionally 4-bit and
with a PEFT adapter::

    python -m jaxlora.generate model=assets/demo/base quant=nf4 adapter=runs/demo/adapter \\
        prompt="Reverse: a b c" [prompt=...] [max_new_tokens=32] [temperature=0] [chat=false]

Arguments use the grammar of every jaxlora command (``key=value``, values read as YAML, a
misspelled key names the nearest one). The library call is :func:`jaxlora.sampling.generate`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

from jaxlora.config import ConfigError, Section, from_argv
from jaxlora.config.typed import GE0, GE1, check
from jaxlora.model import load_model
from jaxlora.sampling import generate

__all__ = ["GenerateArgs", "generate", "main"]


@dataclass(frozen=True)
class GenerateArgs(Section):
    """What ``python -m jaxlora.generate`` takes."""

    _ranges: ClassVar = {"max_new_tokens": GE1, "top_k": GE0, "temperature": GE0}
    model: str
    prompt: tuple[str, ...]
    adapter: str | None = None
    quant: Literal["none", "nf4", "fp4"] = "none"
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    chat: bool = False

    def _validate(self) -> None:
        check(len(self.prompt) > 0, "prompt", "give at least one prompt=<text>")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1]; got {self.top_p}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0 if argv else 2
    try:
        args = from_argv(GenerateArgs, argv, repeatable=("prompt",))
    except ConfigError as e:
        print(f"jaxlora.generate: {e}", file=sys.stderr)
        return 2
    quant = None if args.quant == "none" else args.quant
    model = load_model(args.model, dtype=args.dtype, quant=quant, adapter=args.adapter)
    texts = generate(
        model,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        chat=args.chat,
    )
    for prompt, text in zip(args.prompt, texts, strict=True):
        print(f"### {prompt}\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
