"""What a compiled program contains: its computations, kernels and collectives, read from
its HLO text.

``compiled.as_text()`` (after SPMD partitioning, so shapes are per device) is a list of
computations, each a header line, one instruction per line (a Mosaic call's
``kernel_metadata`` runs on over a few more lines) and a closing brace::

    %region_2.57 (arg_tuple.1: (s32[], f32[8,128,1024])) -> (s32[], f32[8,128,1024]) {
      %all-gather.3 = u8[64,128]{1,0} all-gather(%p), channel_id=1, ...
      %ags.1 = (u8[8,128]{1,0}, u8[64,128]{1,0}) all-gather-start(%p), ...
      ROOT %cc = bf16[16,64]{1,0} custom-call(...), custom_call_target="tpu_custom_call", ...
    }

:func:`parse` reads it into :class:`Computation` s of :class:`Instruction` s; the helpers
find the custom-call targets (``tpu_custom_call`` is a Mosaic kernel,
``__gpu$xla.gpu.triton`` a Triton one), the Pallas kernels by name (an NF4 matmul, splash or
Pallas flash attention), and the collectives with their element types and per-device result
bytes, so a test can say "FSDP gathers 4-bit codes, not bf16 weights". What the program
computes, in FLOPs, is :mod:`jaxlora.targets.flops`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

MOSAIC_CALL = "tpu_custom_call"
TRITON_CALL = "__gpu$xla.gpu.triton"

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "bf16": 2,
    "f16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s+(?P<root>ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*(?P<rest>.*)$", re.DOTALL)
_HEADER = re.compile(r"^(?P<entry>ENTRY\s+)?%(?P<name>[\w.\-]+)\s.*\{$")
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")  # shapes hold "T(8,128)" but never " word("
# attributes naming the computations an instruction runs: a fusion's or call's (calls=), a
# reduction's (to_apply=), a loop's (condition=, body=), a conditional's branches
_CALLED = re.compile(
    r"\b(calls|to_apply|condition|body|branch_computations|true_computation|false_computation)"
    r"=(\{[^}]*\}|%[\w.\-]+)"
)


@dataclass(frozen=True)
class Array:
    """One array shape in HLO: element type (``"u8"``, ``"bf16"``) and dimensions."""

    dtype: str
    dims: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.dims) * _BYTES[self.dtype]


@dataclass(frozen=True)
class Collective:
    """A collective instruction: ``op`` without ``-start`` (``"all-gather"``), and the arrays
    it produces on each device (an async ``-start`` yields ``(operands..., results...)``; only
    the results are kept)."""

    op: str
    results: tuple[Array, ...]
    line: str

    @property
    def dtypes(self) -> set[str]:
        return {a.dtype for a in self.results}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.results)

    def bytes_by_dtype(self) -> dict[str, int]:
        """Per-device result bytes of each element type (a combined gather holds several)."""
        out: dict[str, int] = {}
        for a in self.results:
            out[a.dtype] = out.get(a.dtype, 0) + a.nbytes
        return out


@dataclass(frozen=True)
class Instruction:
    """One HLO instruction: its name (without ``%``), result shape text, opcode and whole text
    (continuation lines joined)."""

    name: str
    shape: str
    opcode: str
    text: str
    root: bool = False

    @property
    def operands(self) -> list[str]:
        """Operand names, ``op(%a, %b)``: compiled HLO writes them without their shapes."""
        call = f" {self.opcode}("
        args = self.text[self.text.index(call) + len(call) :]
        return re.findall(r"%([\w.\-]+)", args.split(")", 1)[0])

    @property
    def called(self) -> list[tuple[str, str]]:
        """``(attribute, computation)`` for each computation this instruction runs:
        ``("body", "region_2.57")``, ``("calls", "fused_computation.3")``, ..."""
        if "=%" not in self.text and "={%" not in self.text:  # most instructions: quickly
            return []
        return [
            (attr, name)
            for attr, names in _CALLED.findall(self.text)
            for name in re.findall(r"%([\w.\-]+)", names)
        ]

    def attribute(self, key: str) -> str | None:
        """A ``key=value`` attribute's value (``index``, ``direction``), up to the next comma."""
        m = re.search(r"\b" + re.escape(key) + r"=([^,\s]+)", self.text)
        return m.group(1) if m else None

    @property
    def arrays(self) -> list[Array]:
        """The arrays of the result shape (a tuple's, in order)."""
        return _arrays(self.shape)


@dataclass(frozen=True)
class Computation:
    """One computation of a module: its instructions by name, in order, and its ``ROOT``."""

    name: str
    instructions: dict[str, Instruction]
    entry: bool = False

    @property
    def root(self) -> Instruction:
        return next(i for i in self.instructions.values() if i.root)


def parse(hlo_text: str) -> dict[str, Computation]:
    """The module's computations by name. An instruction's lines after its first (a Mosaic
    call's ``kernel_metadata``) are joined to it."""
    comps: dict[str, Computation] = {}
    lines: list[str] = []  # the current computation's instructions
    header = None
    for line in hlo_text.splitlines():
        if header is None:
            header = _HEADER.match(line)
            lines = []
        elif line == "}":
            comps[header.group("name")] = _computation(header, lines)
            header = None
        elif _INSTR.match(line):
            lines.append(line)
        elif lines:
            lines[-1] += "\n" + line
    return comps


def _computation(header: re.Match, lines: list[str]) -> Computation:
    instructions = {}
    for text in lines:
        m = _INSTR.match(text)
        rest = m.group("rest")
        op = _OPCODE.search(rest)
        if op is None:
            raise ValueError(f"an HLO instruction without an opcode: {text[:200]}")
        name = m.group("name")
        instructions[name] = Instruction(
            name, rest[: op.start()], op.group(1), text.strip(), root=bool(m.group("root"))
        )
    return Computation(header.group("name"), instructions, entry=bool(header.group("entry")))


def instructions(hlo_text: str) -> Iterator[Instruction]:
    """Every instruction of the module, computation after computation."""
    for comp in parse(hlo_text).values():
        yield from comp.instructions.values()


def _arrays(shape: str) -> list[Array]:
    return [
        Array(t, tuple(int(d) for d in dims.split(",") if d))
        for t, dims in _ARRAY.findall(shape)
        if t in _BYTES
    ]


def custom_call_targets(hlo_text: str) -> set[str]:
    """Every ``custom_call_target`` in the module."""
    return set(re.findall(r'custom_call_target="([^"]+)"', hlo_text))


def collectives(hlo_text: str, op: str | None = None) -> list[Collective]:
    """The collectives of a compiled module (``op`` filters, e.g. ``"all-gather"``).

    A synchronous collective yields its result arrays; ``<op>-start`` yields a tuple of its
    operands and results, of which the second half is kept; ``<op>-done`` is skipped.
    Collectives inside fusions (XLA:TPU's async collective fusions) are found the same way,
    since every computation of the module is in the text.
    """
    found = []
    for i in instructions(hlo_text):
        base = i.opcode.removesuffix("-start")
        if base not in COLLECTIVES or i.opcode.endswith("-done") or (op and base != op):
            continue
        arrays = i.arrays
        if i.opcode.endswith("-start") and len(arrays) % 2 == 0:
            arrays = arrays[len(arrays) // 2 :]
        found.append(Collective(base, tuple(arrays), i.text))
    return found


def kernel_name(instr: Instruction) -> str | None:
    """The Pallas kernel a custom call runs (Mosaic or Triton), ``None`` for any other
    instruction: Mosaic calls are named after their kernel (``splash_mha_fwd_segmented_residuals``,
    ``nf4_matmul_fwd_tpu``); Triton calls are ``pallas_call`` s whose metadata path ends in
    the kernel, bare or inside the transformations that made it (``.../flash_fwd/pallas_call``,
    ``.../transpose(jvp(flash_dq))/pallas_call``)."""
    calls = (MOSAIC_CALL, TRITON_CALL)
    if instr.opcode != "custom-call" or not any(c in instr.text for c in calls):
        return None
    kernel = re.sub(r"\.[0-9]+$", "", instr.name)
    if kernel == "pallas_call":
        m = re.search(r'op_name="[^"]*?([\w\-]+)\)*/pallas_call"', instr.text)
        kernel = m.group(1) if m else kernel
    return kernel


def operand_arrays(instr: Instruction) -> list[Array]:
    """A custom call's operand shapes, from its ``operand_layout_constraints`` (compiled HLO
    names operands without shapes); empty where it has none."""
    start = instr.text.find("operand_layout_constraints={")
    if start < 0:
        return []
    start, depth = start + len("operand_layout_constraints={"), 1
    for end in range(start, len(instr.text)):
        depth += {"{": 1, "}": -1}.get(instr.text[end], 0)
        if depth == 0:
            return _arrays(instr.text[start:end])
    raise ValueError(f"unbalanced operand_layout_constraints: {instr.text[:200]}")


def pallas_kernels(hlo_text: str) -> dict[str, int]:
    """How many calls of each Pallas kernel (Mosaic or Triton) the module makes, by kernel
    name (:func:`kernel_name`)."""
    counts: dict[str, int] = {}
    for i in instructions(hlo_text):
        kernel = kernel_name(i)
        if kernel is not None:
            counts[kernel] = counts.get(kernel, 0) + 1
    return counts
