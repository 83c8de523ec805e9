"""A compiled step's matmul FLOPs per device, counted from its HLO text: every matmul
instruction's FLOPs × the number of times its computation runs.

XLA's own cost analysis (``compiled.cost_analysis()``) sees a ``while`` loop's body once,
whatever its trip count; on TPU it counts a Mosaic kernel by the cost estimate the kernel
declares, and splash attention declares none (XLA counts a splash call at about nothing:
2.1e6 against the 5.4e8 of its two ``[S, S]`` products, B 8, H 16, S 128, D 64); and a
compile-only GPU executable gives no cost analysis at all. XLA's figure cannot be corrected
by the trip counts either: it comes as one total, not per computation. A step that scans its
layers runs them in a ``while`` loop (``model.scan_layers``); the chunked loss and gradient
accumulation are loops too. So the FLOPs are counted here, on TPU and GPU alike:

* a computation runs once per run of its caller (a fusion's, a ``call``'s, an async op's),
  a loop body once per iteration of its loop: nested loops multiply;
* a loop's trip count is the one XLA wrote on it (``backend_config={"known_trip_count":
  {"n":"32"}}``: XLA:GPU does), else the one its induction variable gives — the canonical
  loop XLA's own ``ComputeWhileLoopTripCount`` recognises: a tuple element that starts at a
  constant, is increased by a constant each iteration and compared with a constant by the
  condition (``i < n``). XLA:TPU writes no trip count, so there it is read this way. A loop
  neither gives raises :class:`FlopsUnknown` naming it: a trip count is never guessed;
* matmul instructions (:data:`KINDS`): ``dot`` s ``2·|out|·|contracted|`` (XLA:GPU's GEMM
  fusions keep their dots), ``convolution`` s ``2·|out|·|rhs| / rhs_o`` (XLA:TPU writes its
  dots as convolutions), the NF4 kernel calls ``2·m·n·k`` and flash attention calls
  ``2·B·H·S²·D`` per ``[S, S]`` product (:data:`ATTENTION_PRODUCTS`), from their operand
  shapes. A kernel call of a family that computes (Mosaic, Triton, cuDNN, cuBLAS) that is not
  one of these raises :class:`FlopsUnknown`;
* a ``conditional`` counts its most expensive branch (which one runs depends on the data, not
  in the program): an upper bound. The chunked loss skips the chunks past the batch's last
  loss token this way (``jaxlora.training.loss``), so the count is the step's with every
  token in the loss.

Elementwise work is not counted: a few percent of a transformer step, split over devices as
the matmuls are.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from jaxlora.targets.hlo import Computation, Instruction, kernel_name, operand_arrays, parse

KINDS = ("dot", "convolution", "nf4", "attention")

# Flash attention kernels, by kernel name (hlo.kernel_name) or custom-call target, and how
# many [S, S] matmuls each makes. jaxlora's Pallas GPU flash (jaxlora.kernels.attention_gpu):
# the forward QKᵀ and PV; dq recomputes QKᵀ and forms dO·Vᵀ, dS·K; dkv recomputes QKᵀ and forms
# dO·Vᵀ, Pᵀ·dO, dSᵀ·Q. cuDNN's fused attention: the forward's two, its backward five. TPU
# splash: as jaxlora's GPU kernel (jaxlora's splash leaves ``use_fused_bwd_kernel`` off: two
# backward kernels).
ATTENTION_PRODUCTS = {
    "flash_fwd": 2,
    "flash_dq": 3,
    "flash_dkv": 4,
    "__cudnn$fmhaSoftmaxBackward": 5,
    "__cudnn$fmhaSoftmax": 2,
    "splash_fwd": 2,
    "splash_dq": 3,
    "splash_dkv": 4,
}
# custom-call families that compute: a call of one of these must be counted, or refused
_COMPUTING = ("tpu_custom_call", "__gpu$xla.gpu.triton", "__cudnn$", "__cublas$")


class FlopsUnknown(ValueError):
    """The step's FLOPs cannot be counted: a loop without a trip count, a kernel whose FLOPs
    are not known here, a conditional that computes."""


@dataclass(frozen=True)
class Loop:
    """A ``while`` instruction: the computation holding it, its body, and its trip count as XLA
    wrote it (``known``, or ``None``) and as its induction variable gives it (``derived``)."""

    name: str
    computation: str
    body: str
    known: int | None
    derived: int | None

    @property
    def trips(self) -> int | None:
        return self.known if self.known is not None else self.derived


def matmul_flops(hlo_text: str) -> int:
    """The step's per-device matmul FLOPs: every kind of :func:`flops_by_kind` together."""
    return sum(flops_by_kind(hlo_text).values())


def flops_by_kind(hlo_text: str) -> dict[str, int]:
    """Per-device FLOPs of each kind of :data:`KINDS`, every instruction's × the times its
    computation runs (loop trip counts multiplied through nested loops). Raises
    :class:`FlopsUnknown` where that cannot be told."""
    comps = parse(hlo_text)
    entry = next(c for c in comps.values() if c.entry)
    return _inclusive(entry, comps, {})


def loops(hlo_text: str) -> list[Loop]:
    """Every ``while`` of the module, with its trip counts."""
    comps = parse(hlo_text)
    return [
        _loop(i, c, comps)
        for c in comps.values()
        for i in c.instructions.values()
        if i.opcode == "while"
    ]


_BRANCHES = ("branch_computations", "true_computation", "false_computation")


def _inclusive(
    comp: Computation, comps: dict[str, Computation], memo: dict[str, dict[str, int]]
) -> dict[str, int]:
    """FLOPs by kind of one run of ``comp``, what it calls included."""
    if comp.name in memo:
        return memo[comp.name]
    total = dict.fromkeys(KINDS, 0)
    for instr in comp.instructions.values():
        counted = instruction_flops(instr, comp)
        if counted is not None:
            total[counted[0]] += counted[1]
        loop = _loop(instr, comp, comps) if instr.opcode == "while" else None
        if instr.opcode in ("async-update", "async-done"):  # run once, named by async-start
            continue
        branches = [_inclusive(comps[n], comps, memo) for a, n in instr.called if a in _BRANCHES]
        if branches:  # the most expensive branch: an upper bound, as no branch is known
            for kind, n in max(branches, key=lambda b: sum(b.values())).items():
                total[kind] += n
        for attr, name in instr.called:
            if attr in _BRANCHES:  # counted above
                continue
            inner = _inclusive(comps[name], comps, memo)
            if not any(inner.values()):
                continue
            if attr == "body":
                if loop.trips is None:
                    raise FlopsUnknown(
                        f"while loop %{instr.name} (body %{name}) computes but its trip count "
                        "is unknown: XLA wrote none and its condition is not `i < constant` "
                        "over an induction variable with constant start and step"
                    )
                times = loop.trips
            else:
                times = 1
            for kind, n in inner.items():
                total[kind] += times * n
    memo[comp.name] = total
    return total


def instruction_flops(instr: Instruction, comp: Computation) -> tuple[str, int] | None:
    """``(kind, FLOPs)`` of one run of a matmul instruction, ``None`` for any other."""
    if instr.opcode == "dot":
        lhs = comp.instructions[instr.operands[0]].arrays[0]
        contracted = math.prod(lhs.dims[d] for d in _dims(instr, "lhs_contracting_dims"))
        return "dot", 2 * math.prod(instr.arrays[0].dims) * contracted
    if instr.opcode == "convolution":
        # each output element sums |rhs| / (rhs output features) products, whatever the
        # window, feature or batch grouping
        rhs = comp.instructions[instr.operands[1]].arrays[0]
        labels = instr.attribute("dim_labels")  # "bf_oi->bf": lhs_rhs->out
        o = rhs.dims[labels.split("_")[1].split("->")[0].index("o")]
        return "convolution", 2 * math.prod(instr.arrays[0].dims) * math.prod(rhs.dims) // o
    if instr.opcode != "custom-call":
        return None
    target = re.search(r'custom_call_target="([^"]+)"', instr.text).group(1)
    kernel = kernel_name(instr) or target
    if kernel.startswith("nf4_matmul"):
        # out [m, c] = lhs [m, r] · W: forward x [m, k] -> [m, n], input gradient dy -> dx
        out, lhs = instr.arrays[0], operand_arrays(instr)[0]
        return "nf4", 2 * out.dims[0] * out.dims[1] * lhs.dims[1]
    products = _attention_products(kernel)
    if products is not None:
        return "attention", products * _attention_product_flops(instr, kernel)
    if any(target.startswith(family) for family in _COMPUTING):
        raise FlopsUnknown(
            f"custom call %{instr.name} runs {kernel!r} ({target}), whose FLOPs "
            "jaxlora.targets.flops does not know"
        )
    return None


def _attention_products(kernel: str) -> int | None:
    splash = re.match(r"splash_m[hq]a_(fwd|dq|dkv)", kernel)
    if splash:
        return ATTENTION_PRODUCTS["splash_" + splash.group(1)]
    return next((n for key, n in ATTENTION_PRODUCTS.items() if kernel.startswith(key)), None)


def _attention_product_flops(instr: Instruction, kernel: str) -> int:
    """``2·B·H·S²·D`` of one ``[S, S]`` product, dense (the causal blocks a kernel skips are not
    subtracted), from q: the call's first floating operand, ``[B, S, H, D]`` for cuDNN, ``[B, H,
    S, D]`` for splash (``[H, S, D]`` unbatched), ``[B, KV, G, S, D]`` for jaxlora's GPU flash."""
    q = next(a for a in operand_arrays(instr) or instr.arrays if a.dtype[0] in "fb")
    if kernel.startswith(("splash", "flash")):
        *b, h, s, d = q.dims
    else:
        *b, s, h, d = q.dims
    return 2 * math.prod(b) * h * s * s * d


def _dims(instr: Instruction, key: str) -> tuple[int, ...]:
    m = re.search(key + r"=\{([0-9,]*)\}", instr.text)
    return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()


def _loop(instr: Instruction, comp: Computation, comps: dict[str, Computation]) -> Loop:
    called = dict(instr.called)
    known = None
    at = instr.text.find("backend_config={")
    if at >= 0:  # XLA:GPU's {"known_trip_count":{"n":"32"},"known_init_step":{...},...}
        config, _ = json.JSONDecoder().raw_decode(instr.text, at + len("backend_config="))
        if "known_trip_count" in config:
            known = int(config["known_trip_count"]["n"])
    derived = _induction_trips(instr, comp, called["condition"], called["body"], comps)
    return Loop(instr.name, comp.name, called["body"], known, derived)


# Reading the induction variable: a value as ("const", v), ("elem", k) (element k of the
# computation's tuple parameter), ("add", a, b), ("lt", a, b); None when it is anything else,
# or further than _DEPTH instructions back. Copies and bitcasts pass their operand through; a
# fusion is read through its computation, its parameters standing for the fusion's operands.
_PASS = ("copy", "bitcast", "copy-start", "copy-done")
_DEPTH = 16


def _value(name: str, comp: Computation, comps: dict[str, Computation], args=None, depth=0):
    i = comp.instructions[name]
    if depth > _DEPTH:
        return None
    read = lambda operand: _value(operand, comp, comps, args, depth + 1)
    if i.opcode in _PASS:
        return read(i.operands[0])
    if i.opcode == "parameter" and args is not None:  # inside a fusion: its caller's operand
        return args(int(re.search(r"parameter\((\d+)\)", i.text).group(1)))
    if i.opcode == "constant" and not i.shape.startswith("("):
        m = re.search(r"constant\((-?\d+)\)", i.text)
        return ("const", int(m.group(1))) if m else None
    if i.opcode == "get-tuple-element" and args is None:
        source = comp.instructions[i.operands[0]]
        return ("elem", int(i.attribute("index"))) if source.opcode == "parameter" else None
    if i.opcode == "add":
        return ("add", *map(read, i.operands))
    if i.opcode == "compare" and i.attribute("direction") in ("LT", "GT"):
        a, b = map(read, i.operands)
        return ("lt", a, b) if i.attribute("direction") == "LT" else ("lt", b, a)
    if i.opcode == "fusion":
        inner = comps[dict(i.called)["calls"]]
        return _value(inner.root.name, inner, comps, lambda n: read(i.operands[n]), depth + 1)
    return None


def _induction_trips(
    instr: Instruction, comp: Computation, cond: str, body: str, comps: dict[str, Computation]
) -> int | None:
    """The trip count of ``for (i = start; i < limit; i += step)`` with constant start, step >
    0 and limit, read from the loop's condition, body and initial tuple; None otherwise."""
    cond, body = comps[cond], comps[body]
    test = _value(cond.root.name, cond, comps)
    if not (test and test[0] == "lt" and test[1] and test[1][0] == "elem"):
        return None
    k, limit = test[1][1], test[2]
    update = body.root
    if update.opcode != "tuple" or limit is None or limit[0] != "const":
        return None
    step = _value(update.operands[k], body, comps)
    if not (step and step[0] == "add" and ("elem", k) in step[1:]):
        return None
    step = step[2] if step[1] == ("elem", k) else step[1]
    init = comp.instructions[instr.operands[0]]
    start = _value(init.operands[k], comp, comps) if init.opcode == "tuple" else None
    if not (step and step[0] == "const" and step[1] > 0 and start and start[0] == "const"):
        return None
    return max(0, -(-(limit[1] - start[1]) // step[1]))
