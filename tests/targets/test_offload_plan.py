"""Host offload, compiled for a TPU chip: with ``train.optimizer_offload=host`` the optimizer
state is in host memory, not among the device's arguments and outputs; with
``train.remat=offload`` the residuals ``remat=dots`` keeps on the device are in host memory
(``adamw_8bit``'s state, a quarter of AdamW's, is a figure of the state's tree, not of a
compile: tests/training/test_optimizers.py). The offloaded state comes to the device
one parameter's state at a time, after the backward, so the step's device memory (HBM:
arguments, temporaries, outputs) drops by about the state's size (docs/memory.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import LlamaConfig

from tests.targets import _toolchain

pytestmark = [pytest.mark.aot, pytest.mark.slow]

SCRIPT = Path(__file__).parent / "offload_run.py"
MISSING = _toolchain.missing()


@pytest.mark.skipif("tpu" in MISSING, reason=MISSING.get("tpu", ""))
def test_offloaded_state_and_residuals_are_in_host_memory(tmp_path):
    model = tmp_path / "model"
    LlamaConfig(
        vocab_size=256,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=512,
    ).save_pretrained(model)
    out = tmp_path / "plans.json"
    _toolchain.run_script(SCRIPT, "--model", str(model), "--out", str(out))
    plans = {k: v["per_device"] for k, v in json.loads(out.read_text()).items()}
    base, off = plans["base"], plans["optimizer_offload"]
    state = base["optimizer_bytes"]
    assert base["host_bytes"] == 0
    # The whole state is a host argument (aliased to the host output of the same buffers), and
    # neither a device argument nor a device output: it is not resident between steps.
    assert off["host_bytes"] >= state
    assert off["arguments_bytes"] <= base["arguments_bytes"] - state
    assert off["output_bytes"] <= base["output_bytes"] - state
    # Device memory (HBM; the donated inputs counted once: trainable params and, resident, the
    # state). Streamed, the state is on the device one parameter's moments at a time: at most
    # the largest parameter's (a [2, 64, 1024] or [2, 1024, 64] float32 LoRA factor, 0.5 MiB:
    # 1 MiB of moments) old and new, plus that much of update temporaries.
    hbm = lambda p, donated: p["arguments_bytes"] + p["temp_bytes"] + p["output_bytes"] - donated
    stage = 2 * 2 * 64 * 1024 * 4
    base_hbm = hbm(base, base["trainable_bytes"] + state)
    assert hbm(off, off["trainable_bytes"]) <= base_hbm - state + 3 * stage
    # remat=offload keeps dots' residuals in host memory; dots keeps them on the device.
    dots, roff = plans["remat_dots"], plans["remat_offload"]
    assert dots["host_bytes"] == 0 and roff["host_bytes"] > 0


@pytest.mark.skipif("gpu" in MISSING, reason=MISSING.get("gpu", ""))
def test_host_offload_for_a_gpu_target_is_refused_not_planned_on_the_device():
    """JAX 0.10.2's compile-only GPU devices report no host memory space, and JAX then drops a
    sharding's ``pinned_host`` kind without a word: the plan would show the state on the
    device as if offload did nothing. ``python -m jaxlora.plan`` refuses it, naming why."""
    out = _toolchain.run_plan("recipe=demo", "train.optimizer_offload=host", "target=h100-1")
    assert out.returncode != 0, out.stdout[-2000:]
    assert "train.optimizer_offload=host" in out.stderr
    assert "report no host memory space" in out.stderr, out.stderr[-2000:]
