"""``python -m jaxlora.export checkpoint=<run> format=peft|merged|bnb4|gguf out=<dir> [step=N]``

``checkpoint`` is a run directory, its ``checkpoints/`` directory or one step's directory;
``step`` defaults to the latest; ``dtype=float32|bfloat16|float16`` sets the written weights'
dtype. ``peft`` writes the adapter (with the tokenizer), ``merged`` a dense Hugging Face
checkpoint with the adapter folded in, ``bnb4`` the 4-bit base as a bitsandbytes checkpoint plus
the adapter in ``out/adapter``. ``gguf`` writes ``out`` (a ``.gguf`` file) for llama.cpp with an
Ollama ``Modelfile`` beside it: ``gguf.type=f16|bf16|q8_0|f32`` (default f16), and
``gguf.lora=true`` for the base in ``out`` plus the adapter as a GGUF LoRA in
``<stem>-lora.gguf`` instead of the merged model. Arguments use the grammar of every
jaxlora command (``key=value``; a misspelled key names the nearest one). The library call is
:func:`jaxlora.training.export.export_checkpoint`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from jaxlora.config import ConfigError, Section, from_argv
from jaxlora.interop.safetensors import CheckpointError
from jaxlora.training.checkpoint import ResumeError
from jaxlora.training.export import export_checkpoint

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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
