"""The real train step (NF4 base + LoRA on every linear, packed [accum, batch, seq] batch,
remat, AdamW), built by the run builder ``python -m jaxlora.train`` uses, compiled for a TPU
topology and for 8 H100s from this CPU machine: it compiles, the Pallas NF4 kernel is in the
compiled program, FSDP moves 4-bit codes, and each of 8 devices computes 1/8 of the work.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import LlamaConfig

from jaxlora.targets import hlo
from tests.targets import _toolchain

pytestmark = [pytest.mark.aot, pytest.mark.slow, pytest.mark.xdist_group("aot")]

SCRIPT = Path(__file__).parent / "plan_run.py"
KERNEL_CALL = {"tpu": hlo.MOSAIC_CALL, "gpu": hlo.TRITON_CALL}
MISSING = _toolchain.missing()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """config.json only: planning needs no weights. Widths hold a multiple of 8 NF4 blocks of
    64, so FSDP over 8 devices splits ``in`` on whole blocks (else the weight stays whole), and
    every per-device ``in`` is a multiple of 512, the TPU kernel's K tile (a smaller one is
    padded up to it, which the FLOPs count would show as extra work)."""
    d = tmp_path_factory.mktemp("plan_model")
    LlamaConfig(
        vocab_size=256,
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=512,
    ).save_pretrained(d)
    return d


@pytest.mark.parametrize(
    "platform",
    [
        pytest.param(p, marks=pytest.mark.skipif(p in MISSING, reason=MISSING.get(p, "")))
        for p in ("tpu", "gpu")
    ],
)
def test_real_step_compiles_sharded_with_the_kernel(tmp_path, model_dir, platform):
    out = tmp_path / "plan.json"
    _toolchain.run_script(
        SCRIPT, "--platform", platform, "--model", str(model_dir), "--out", str(out)
    )
    one, fsdp8, mixed, scanned = json.loads(out.read_text())
    assert (one["devices"], fsdp8["devices"], mixed["devices"]) == (1, 8, 8)
    assert fsdp8["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert mixed["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert not any(r["scan_layers"] for r in (one, fsdp8, mixed)) and scanned["scan_layers"]
    for run in (one, fsdp8, mixed, scanned):
        assert run["kernels"]["matmul"] == {"tpu": "mosaic", "gpu": "triton"}[platform]
        assert KERNEL_CALL[platform] in run["custom_calls"], run["custom_calls"]
    # flash attention: the platform's Pallas kernel on one device (splash on TPU, Pallas flash
    # for packed rows on GPU); on a mesh, flash attention in plain JAX, which XLA partitions
    assert one["kernels"]["attention"] == {"tpu": "splash", "gpu": "pallas_gpu"}[platform]
    assert fsdp8["kernels"]["attention"] == mixed["kernels"]["attention"] == "chunked"
    for run in (fsdp8, mixed, scanned):
        # FSDP gathers the 4-bit codes; the only other gathers are small float leaves (absmax
        # dequantized by the caller, LoRA factors), never a 16-bit copy of a frozen weight
        assert run["gathered_bytes"].get("u8", 0) > 0, run["gathered_bytes"]
        assert "bf16" not in run["gathered_bytes"], run["gathered_bytes"]
        if run is scanned:  # FLOPs: XLA analyses a scanned layer once, so no ratio to check
            continue
        # each device computes 1/8 of the NF4 matmuls (XLA's cost analysis covers TPU only)
        assert run["nf4_kernel_flops"] * 8 == pytest.approx(one["nf4_kernel_flops"], rel=0.10)
        if one["flops_per_device"] and platform == "tpu":
            ratio = run["flops_per_device"] * 8 / one["flops_per_device"]
            assert 0.9 <= ratio <= 1.1, ratio
