"""Compiled for the target, verified without the device (DESIGN.md): the sharded NF4 stack,
forward and backward, compiled for 8 v5e chips and 8 H100s from this CPU machine.

Each platform compiles in its own process (tests/targets/compile_run.py), so a failure or a
plugin's global state stays there; the coexistence test puts both in one process. The compile
packages (the ``aot`` extra in pyproject.toml) are found in the test venv or, as ``.ci/run``
installs them, in a side directory put on those processes' ``PYTHONPATH`` only
(``$JAXLORA_AOT_TOOLCHAIN``, default ``.aot-toolchain/``): installed in the venv itself, every
JAX process would try to start the TPU and CUDA backends. Skipped where a platform's compile
package is missing (``jaxlora.targets.missing_toolchains``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxlora.targets import hlo
from tests.targets import _toolchain

pytestmark = [pytest.mark.aot, pytest.mark.slow]

SCRIPT = Path(__file__).parent / "compile_run.py"
KERNEL_CALL = {"tpu": hlo.MOSAIC_CALL, "gpu": hlo.TRITON_CALL}
LAYERS, D, F = 2, 512, 1024  # as in tests/targets/compile_run.py
MISSING = _toolchain.missing()


def _needs(*platforms):
    missing = [f"{p}: {MISSING[p]}" for p in platforms if p in MISSING]
    return pytest.mark.skipif(bool(missing), reason="; ".join(missing))


def _run(tmp_path, *args) -> dict:
    out = tmp_path / "out.json"
    cmd = [sys.executable, str(SCRIPT), *args, "--out", str(out)]
    proc = subprocess.run(cmd, env=_toolchain.ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    "platform", [pytest.param("tpu", marks=_needs("tpu")), pytest.param("gpu", marks=_needs("gpu"))]
)
def test_sharded_nf4_step_compiles_for_8_devices(tmp_path, platform):
    one, *eight = _run(tmp_path, "--platform", platform)["runs"]
    assert one["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    assert {tuple(r["mesh"].values()) for r in eight} == {(1, 8, 1), (2, 2, 2)}
    for run in (one, *eight):
        assert KERNEL_CALL[platform] in run["custom_calls"], run
    for run in eight:
        # FSDP gathers the 4-bit codes and the 8-bit codes of their double-quantized absmax
        # (u8), dequantized on each device after the gather; no bf16 or float32 weight moves
        assert set(run["gathered_bytes"]) == {"u8"}, run
        # ... once in the forward and once more in the backward pass (not kept alive between):
        # each layer's up [F/t, D] and down [D, F/t]: 4 bits a weight + 8 bits per 64 weights
        weights = 2 * LAYERS * 2 * F * D // run["mesh"]["tensor"]
        assert run["gathered_bytes"]["u8"] == weights // 2 + weights // 64, run
        # against a bf16 FSDP gather of the same weights: 16 / 4.125 bits = 3.88x fewer bytes
        # (the nested float32 scales, 32 bits per 256 blocks, are replicated, not gathered)
        assert 2 * weights / run["gathered_bytes"]["u8"] == pytest.approx(16 / 4.125, rel=1e-9)
        # each device computes its eighth: the kernel calls' FLOPs ...
        assert run["hlo_flops"] * 8 == one["hlo_flops"], run
        # ... and XLA's cost analysis where the backend has one (TPU; the Mosaic kernels
        # carry a cost estimate; compile-only GPU executables report none)
        if platform == "tpu":
            assert run["cost_flops"] * 8 == pytest.approx(one["cost_flops"], rel=0.1), run
    if platform == "tpu":
        # the matmuls counted from the HLO (jaxlora.targets.flops) are what XLA counts for
        # them (the NF4 kernel's cost estimate is the same 2·m·n·k), which it adds elementwise
        # work to: never more than XLA's figure
        for run in (one, *eight):
            assert run["hlo_flops"] <= run["matmul_flops"] <= run["cost_flops"], run


@_needs("tpu")
def test_every_tpu_target_compiles_the_mosaic_kernels(tmp_path):
    runs = _run(tmp_path, "--platform", "tpu", "--mode", "targets")["runs"]
    assert {r["target"] for r in runs} >= {
        "tpu-v5e-1",
        "tpu-v5e-8",
        "tpu-v4-8",
        "tpu-v5p-8",
        "tpu-v6e-1",
        "tpu-v6e-8",
    }
    for r in runs:
        assert r["kernel"] == "mosaic" and r["custom_calls"] == hlo.MOSAIC_CALL, r


@_needs("gpu")
def test_every_gpu_target_config_is_accepted_and_t4_falls_back(tmp_path):
    runs = {
        r["target"]: r for r in _run(tmp_path, "--platform", "gpu", "--mode", "targets")["runs"]
    }
    assert set(runs) >= {
        "h100-1",
        "h100-8",
        "h200-1",
        "a100-40g-1",
        "a100-80g-1",
        "l4-1",
        "rtx4090-1",
        "t4-1",
    }
    for name, r in runs.items():
        if name == "t4-1":
            assert r["kernel"] == "dequant" and hlo.TRITON_CALL not in r["custom_calls"], r
            assert "compute capability 8.0" in r["triton_refused"], r
        else:
            assert r["kernel"] == "triton" and r["custom_calls"] == hlo.TRITON_CALL, r
            # flash attention fits the block's shared memory at every row width (float32 and
            # head_dim 256 too: at 128 rows XLA refused float32 / 128 on an H100 and an L4)
            assert set(r["attention_tiles"].values()) == {"ok"}, r["attention_tiles"]


@_needs("tpu", "gpu")
def test_tpu_and_gpu_compile_in_one_process(tmp_path):
    tpu, gpu = _run(tmp_path, "--mode", "both")["runs"]
    assert hlo.MOSAIC_CALL in tpu["custom_calls"] and hlo.TRITON_CALL in gpu["custom_calls"]
    assert tpu["hlo_flops"] == gpu["hlo_flops"]
