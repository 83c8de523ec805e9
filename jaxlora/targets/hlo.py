"""What a compiled program contains: kernels and collectives, read from its HLO text.

``compiled.as_text()`` (after SPMD partitioning, so shapes are per device) has one
instruction per line::

    %all-gather.3 = u8[64,128]{1,0} all-gather(u8[8,128]{1,0} %p), channel_id=1, ...
    %ags.1 = (u8[8,128]{1,0}, u8[64,128]{1,0}) all-gather-start(u8[8,128]{1,0} %p), ...
    %cc = bf16[16,64]{1,0} custom-call(...), custom_call_target="tpu_custom_call", ...

These helpers find the custom-call targets (``tpu_custom_call`` is a Mosaic kernel,
``__gpu$xla.gpu.triton`` a Triton one), the Pallas kernels by name (an NF4 matmul, splash or
Pallas flash attention), the collectives with their element types and per-device result
bytes, so a test can say "FSDP gathers 4-bit codes, not bf16 weights", and a step's matmul
FLOPs counted from its instructions (:func:`matmul_flops`), which is what a compile-only GPU
executable offers in place of XLA's cost analysis.
"""

from __future__ import annotations

import math
import re
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
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<rest>.*)$")
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")  # shapes hold "T(8,128)" but never " word("


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


def _instructions(hlo_text: str):
    """``(name, shape text, opcode, line)`` for each instruction line of the module."""
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m is None:
            continue
        rest = m.group("rest")
        op = _OPCODE.search(rest)
        if op is not None:
            yield m.group("name"), rest[: op.start()], op.group(1), line.strip()


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
    for _, shape, opcode, line in _instructions(hlo_text):
        base = opcode.removesuffix("-start")
        if base not in COLLECTIVES or opcode.endswith("-done") or (op and base != op):
            continue
        arrays = _arrays(shape)
        if opcode.endswith("-start") and len(arrays) % 2 == 0:
            arrays = arrays[len(arrays) // 2 :]
        found.append(Collective(base, tuple(arrays), line))
    return found


def nf4_kernel_flops(hlo_text: str) -> int:
    """Per-device matmul FLOPs of the NF4 Pallas kernel calls (Mosaic or Triton) in a module.

    Each call is ``out [m, c] = lhs [m, r] · W``: forward ``x [m, k] -> [m, n]``, input
    gradient ``dy [m, n] -> [m, k]``, so ``2·m·c·r`` (with padding on TPU). The calls are
    found by the ``nf4_matmul`` kernel name in their metadata, their operand shapes in
    ``operand_layout_constraints``. XLA's own cost analysis is unavailable for compile-only
    GPU executables, so this is how a GPU compile is checked for "each device computes only
    its share".
    """
    total = 0
    for _, shape, opcode, line in _instructions(hlo_text):
        if opcode != "custom-call" or "nf4_matmul" not in line:
            continue
        operands = re.search(r"operand_layout_constraints=\{([^}]*)\}", line)
        if operands is None:
            raise ValueError(f"NF4 kernel call without operand shapes: {line[:200]}")
        out, lhs = _arrays(shape)[0], _arrays(operands.group(1))[0]
        total += 2 * out.dims[0] * out.dims[1] * lhs.dims[1]
    return total


def _ops_in(line: str) -> list[str]:
    """The operand names of an instruction line, ``op(%a, %b)`` or ``op(f32[..] %a, ...)``."""
    args = line[line.index("(", line.index("=")) :]
    return re.findall(r"%([\w.\-]+)", args.split(")", 1)[0])


def _dims(line: str, key: str) -> tuple[int, ...]:
    m = re.search(key + r"=\{([0-9,]*)\}", line)
    return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()


def dot_flops(hlo_text: str) -> int:
    """``2 · |out| · |contracted|`` summed over the module's ``dot`` instructions (those in
    fused computations included: XLA:GPU keeps its GEMM fusions as dots in the text). Operand
    shapes come from where each operand is defined in the same computation."""
    total, shapes = 0, {}
    for line in hlo_text.splitlines():
        if line.endswith("{") and "=" not in line.split("(", 1)[0]:  # a computation starts
            shapes = dict(re.findall(r"([\w.\-]+): ([a-z]+[0-9]*\[[0-9,]*\])", line))
            continue
        m = _INSTR.match(line)
        if m is None:
            continue
        rest = m.group("rest")
        op = _OPCODE.search(rest)
        if op is None:
            continue
        shapes[m.group("name")] = rest[: op.start()]
        if op.group(1) != "dot":
            continue
        out = _arrays(rest[: op.start()])[0]
        lhs = _arrays(shapes[_ops_in(line)[0]])[0]
        contracted = math.prod(lhs.dims[d] for d in _dims(line, "lhs_contracting_dims"))
        total += 2 * math.prod(out.dims) * contracted
    return total


# Pallas flash attention kernels on GPU (jax.experimental.pallas.ops.gpu.attention), by the
# name in their metadata, and how many [S, S] matmuls each makes: the forward QKᵀ and PV; the
# backward recomputes QKᵀ and forms dO·Vᵀ, Pᵀ·dO, dSᵀ·Q and dS·K (the preprocessing call is
# elementwise). cuDNN's fused attention, by custom-call target, does the same products.
ATTENTION_MATMULS = {
    "mha_forward/": 2,
    "mha_backward/": 5,
    "__cudnn$fmhaSoftmaxBackward": 5,
    "__cudnn$fmhaSoftmax": 2,
}


def attention_kernel_flops(hlo_text: str) -> int:
    """Per-device matmul FLOPs of the GPU flash attention kernel calls: ``2·B·H·S²·D`` per
    ``[S, S]`` product (:data:`ATTENTION_MATMULS`) from the call's ``q [B, S, H, D]``, counted
    dense (the causal blocks a kernel skips are not subtracted)."""
    total = 0
    for _, shape, opcode, line in _instructions(hlo_text):
        if opcode != "custom-call":
            continue
        products = next((n for key, n in ATTENTION_MATMULS.items() if key in line), 0)
        if not products:
            continue
        operands = re.search(r"operand_layout_constraints=\{([^}]*)\}", line)
        q = _arrays(operands.group(1) if operands else shape)[0]
        b, s, h, d = q.dims
        total += products * 2 * b * h * s * s * d
    return total


def matmul_flops(hlo_text: str) -> int:
    """A step's per-device matmul FLOPs counted from its compiled HLO: XLA's dots, the NF4
    kernel calls and the GPU flash attention calls. Elementwise work is not counted: it is a
    few percent of a transformer step's FLOPs and splits over the devices as the matmuls do."""
    return dot_flops(hlo_text) + nf4_kernel_flops(hlo_text) + attention_kernel_flops(hlo_text)


def pallas_kernels(hlo_text: str) -> dict[str, int]:
    """How many calls of each Pallas kernel (Mosaic or Triton) the module makes, by kernel
    name: Mosaic calls are named after their kernel (``splash_mha_fwd_segmented_residuals``,
    ``nf4_matmul_fwd_tpu``); Triton calls are ``pallas_call`` s whose metadata path ends in
    the kernel (``.../mha_forward/pallas_call``)."""
    counts: dict[str, int] = {}
    for name, _, opcode, line in _instructions(hlo_text):
        if opcode != "custom-call" or not (MOSAIC_CALL in line or TRITON_CALL in line):
            continue
        kernel = re.sub(r"\.[0-9]+$", "", name)
        if kernel == "pallas_call":
            m = re.search(r'op_name="[^"]*?([\w\-]+)/pallas_call"', line)
            kernel = m.group(1) if m else kernel
        counts[kernel] = counts.get(kernel, 0) + 1
    return counts
