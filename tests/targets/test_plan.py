"""The real train step (NF4 base + LoRA on every linear, packed [accum, batch, seq] batch,
remat, AdamW), built by the run builder ``python -m jaxlora.train`` uses, compiled for a TPU
topology and for 8 H100s from this CPU machine: it compiles, the Pallas NF4 kernel and flash
attention are in the compiled program (on 8 devices, inside shard_map, with no all-gather of
activations for attention), FSDP moves 4-bit codes, and each of 8 devices computes 1/8 of the
work.
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
ATTENTION_KERNELS = {  # forward and backward kernels, by name (hlo.pallas_kernels)
    "tpu": {
        "splash_mha_fwd_segmented_residuals",
        "splash_mha_dq_segmented_no_residuals",
        "splash_mha_dkv_segmented_no_residuals",
    },
    "gpu": {"mha_forward", "mha_backward"},
}
MISSING = _toolchain.missing()
VOCAB, HIDDEN, RANK = 256, 1024, 8  # the model below, and plan_run.py's lora.r


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """config.json only: planning needs no weights. Widths hold a multiple of 8 NF4 blocks of
    64, so FSDP over 8 devices splits ``in`` on whole blocks (else the weight stays whole), and
    every per-device ``in`` is a multiple of 512, the TPU kernel's K tile (a smaller one is
    padded up to it, which the FLOPs count would show as extra work)."""
    d = tmp_path_factory.mktemp("plan_model")
    LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
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
        # flash attention, on one device and on each device's rows and heads of a mesh
        # (shard_map): splash on TPU, Pallas flash for packed rows on GPU, forward and backward
        assert run["kernels"]["attention"] == {"tpu": "splash", "gpu": "pallas_gpu"}[platform]
        assert ATTENTION_KERNELS[platform] <= set(run["pallas_kernels"]), run["pallas_kernels"]
    for run in (fsdp8, mixed, scanned):
        # the kernel runs where the activations already are: no all-gather made for attention
        assert run["attention_gathers"] == [], run["attention_gathers"]
        # FSDP gathers the 4-bit codes and the 8-bit codes of their absmax; the only other
        # gathers are small float leaves: LoRA factors, norms and the unquantized lm_head
        # (XLA may gather those after their cast to the bf16 compute dtype), never a 16-bit
        # copy of a 4-bit weight: every 16-bit array gathered has the LoRA rank as a dimension
        # or is lm_head's [vocab / tensor, hidden]
        assert run["gathered_bytes"].get("u8", 0) > 0, run["gathered_bytes"]
        lm_head = [VOCAB // run["mesh"]["tensor"], HIDDEN]
        for dims in run["gathered_16bit_shapes"]:
            assert RANK in dims or dims == lm_head, run["gathered_16bit_shapes"]
        if run is scanned:  # FLOPs: XLA analyses a scanned layer once, so no ratio to check
            continue
        # each device computes 1/8 of the NF4 matmuls ...
        assert run["nf4_kernel_flops"] * 8 == pytest.approx(one["nf4_kernel_flops"], rel=0.10)
        # ... and of the step: XLA's cost analysis on TPU; on GPU, whose compile-only
        # executables have none, the matmuls counted from the HLO (jaxlora.targets.hlo:
        # dots, NF4 kernel calls, flash attention calls)
        assert run["flops_source"] == {"tpu": "cost_analysis", "gpu": "hlo_matmuls"}[platform]
        ratio = run["flops_per_device"] * 8 / one["flops_per_device"]
        assert 0.9 <= ratio <= 1.1, ratio
        if platform == "gpu":  # each device's flash attention: its batch rows and heads
            assert run["attention_kernel_flops"] * 8 == one["attention_kernel_flops"], run


@pytest.mark.skipif("gpu" in MISSING, reason=MISSING.get("gpu", ""))
def test_plan_command_on_a_gpu_without_flash_kernels_names_the_fallbacks():
    """``python -m jaxlora.plan`` as a user runs it, for a T4 (sm_75): the NF4 matmul
    dequantizes and attention is chunked (neither Triton nor cuDNN flash runs there), the
    step compiles, and the printed plan says so."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-m", "jaxlora.plan", "recipe=demo", "target=t4-1"],
        env=_toolchain.ENV,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "plan for t4-1: 1 device(s)" in out.stdout
    assert "kernels           matmul dequant, attention chunked" in out.stdout
    assert "fits" in out.stdout and "flops per device" in out.stdout
