"""Host offload, compiled for a TPU chip: with ``train.optimizer_offload=host`` the optimizer
state sits in host memory and the device total drops by its size; with ``train.remat=offload``
the residuals ``remat=dots`` keeps on the device are in host memory instead; ``adamw_8bit``'s
state is about a quarter of AdamW's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import LlamaConfig

from tests.targets import _toolchain

pytestmark = [pytest.mark.aot, pytest.mark.slow, pytest.mark.xdist_group("aot")]

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
    # The whole state is a host argument (and the aliased output of the same buffers).
    assert off["host_bytes"] >= state
    # On the device it is gone from the arguments; the update streams it through temporaries
    # per leaf, so the total drops by at least half of it (measured: see docs/memory.md).
    assert off["arguments_bytes"] <= base["arguments_bytes"] - state
    assert off["total_bytes"] <= base["total_bytes"] - state // 2
    dots, roff = plans["remat_dots"], plans["remat_offload"]
    assert dots["host_bytes"] == 0 and roff["host_bytes"] > 0
    assert roff["temp_bytes"] < dots["temp_bytes"]
    q8 = plans["adamw_8bit"]["optimizer_bytes"]
    assert 0.25 <= q8 / state < 0.27
