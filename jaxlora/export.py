"""``python -m jaxlora.export checkpoint=<run> format=peft|merged|bnb4|gguf out=<dir> [step=N]``

``checkpoint`` is a run directory, its ``checkpoints/`` directory or one step's directory;
``step`` defaults to the latest; ``dtype=float32|bfloat16|float16`` sets the written weights'
dtype (``merged``, ``bnb4``). ``peft`` writes the adapter (with the tokenizer), ``merged`` a
dense Hugging Face checkpoint with the adapter folded in, ``bnb4`` the 4-bit base as a
bitsandbytes checkpoint plus the adapter in ``out/adapter``. ``gguf`` writes ``out`` (a
``.gguf`` file) for llama.cpp with an Ollama ``Modelfile`` beside it:
``gguf.type=f16|bf16|q8_0|f32`` (default f16), and ``gguf.lora=true`` for the base in ``out``
plus the adapter as a GGUF LoRA in ``<stem>-lora.gguf`` instead of the merged model.
``push_to_hub=<user/repo> [private=true]`` then uploads the export with a model card
(``README.md``: base, data, recipe, held-out numbers, how to load it) to the Hugging Face Hub (a
token from ``hf auth login`` or ``HF_TOKEN``; ``private`` applies to a new repository).
Arguments use the grammar of every jaxlora command (``key=value``; a misspelled key names the
nearest one). The library call is :func:`jaxlora.training.export.export_checkpoint`.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from jaxlora.config import ConfigError, Section, from_argv
from jaxlora.config.typed import check
from jaxlora.interop.hub import HubError
from jaxlora.interop.safetensors import CheckpointError
from jaxlora.training.checkpoint import ResumeError
from jaxlora.training.export import export_checkpoint, push_to_hub

__all__ = ["ExportArgs", "export_checkpoint", "main"]


@dataclass(frozen=True)
class GGUFArgs(Section):
    """``gguf.*``: the GGUF export's options."""

    _prefix: ClassVar[str] = "gguf."

    type: Literal["f16", "bf16", "q8_0", "f32"] = "f16"
    lora: bool = False


@dataclass(frozen=True)
class ExportArgs(Section):
    """What ``python -m jaxlora.export`` takes."""

    checkpoint: str
    format: Literal["peft", "merged", "bnb4", "gguf"]
    out: str
    step: int | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    gguf: GGUFArgs = field(default_factory=GGUFArgs)
    push_to_hub: str | None = None  # a Hub repository id, user/name
    private: bool = False

    def _validate(self) -> None:
        repo = self.push_to_hub
        check(
            repo is None or re.fullmatch(r"[\w.-]+/[\w.-]+", repo) is not None,
            "push_to_hub",
            f"must be a Hub repository id <user or org>/<name>; got {repo!r}",
        )
        check(not self.private or repo is not None, "private", "applies only with push_to_hub")
        check(
            self.dtype is None or self.format in ("merged", "bnb4"),
            "dtype",
            f"applies to format=merged or bnb4; format={self.format} writes the adapter in its "
            "trained lora.dtype (gguf: gguf.type)",
        )


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        args = from_argv(ExportArgs, argv)
        out = export_checkpoint(
            args.checkpoint,
            args.format,
            args.out,
            step=args.step,
            dtype=args.dtype,
            gguf_type=args.gguf.type,
            gguf_lora=args.gguf.lora,
        )
    except (ValueError, ConfigError, CheckpointError, ResumeError, FileNotFoundError) as e:
        print(f"jaxlora.export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.format} export to {out}")
    if args.push_to_hub:
        try:
            url = push_to_hub(
                args.checkpoint,
                args.format,
                out,
                args.push_to_hub,
                step=args.step,
                private=args.private,
            )
        except HubError as e:
            print(f"jaxlora.export: {e}", file=sys.stderr)
            return 1
        print(f"pushed to {url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
