"""What one more scanned decoder layer adds to the compiled QLoRA step's temporaries on a TPU:
what a rematerialized layer must keep, never a copy of its frozen 4-bit weight.

``python -m jaxlora.plan`` compiles the real step (NF4 base, LoRA on every linear, full remat,
layers scanned, AdamW) of the same tiny model at 2 and 3 layers for one v5e chip; the difference
of the two programs' temporaries is the cost of one layer. Before the NF4 TPU kernel pinned its
relayout of the codes to each call (``jaxlora.kernels.nf4_tpu.tile_layout``), XLA's TPU layout
assignment gave the loop-carried stack of codes the transposed layout instead: one relayout copy
of every layer's codes, before the loops, alive through the step (8B: 104 MiB a layer,
3.2 GiB of the 6.4 GiB of temporaries at S = 2048). The tiled MLP (``train.mlp_chunk``) calls the
kernel inside a loop over tiles, where the same happened to the MLP's codes until each layer
laid them out once, before the tiles (``NF4Tensor.staged``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import LlamaConfig

from tests.targets import _toolchain

pytestmark = [pytest.mark.aot, pytest.mark.slow]

MISSING = _toolchain.missing()
HIDDEN, FFN, SEQ, RANK, TILE = 1024, 2048, 256, 8, 64


def plan(model_dir: Path, mlp_chunk: int = 0) -> dict:
    """``python -m jaxlora.plan`` for one v5e chip, as a user runs it: per-device bytes."""
    out = _toolchain.run_plan(
        "recipe=llama_qlora",
        f"model.path={model_dir}",
        "model.tokenizer=null",
        f"data.max_seq_len={SEQ}",
        "train.batch_size=1",
        "train.grad_accum=1",
        f"lora.r={RANK}",
        f"lora.alpha={2 * RANK}",
        "target=tpu-v5e-1",
        f"train.mlp_chunk={mlp_chunk}",
        "format=json",
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["scan_layers"] and result["kernels"]["matmul"] == "mosaic", result
    return result["per_device"]


@pytest.mark.skipif("tpu" in MISSING, reason=MISSING.get("tpu", ""))
def test_a_scanned_layer_adds_what_remat_keeps_not_its_weights(tmp_path):
    per_device = {}
    for layers in (2, 3):
        d = tmp_path / f"layers{layers}"
        LlamaConfig(
            vocab_size=256,
            hidden_size=HIDDEN,
            intermediate_size=FFN,
            num_hidden_layers=layers,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=64,
            max_position_embeddings=512,
        ).save_pretrained(d)
        for chunk in (0, TILE):
            per_device[layers, chunk] = plan(d, chunk)
    one_more, tiled = (
        {k: per_device[3, c][k] - per_device[2, c][k] for k in per_device[2, c] if k != "fits"}
        for c in (0, TILE)
    )
    lora = one_more["trainable_bytes"]  # the layer's LoRA factors, float32
    # What the layer must keep through the step: its input [1, SEQ, HIDDEN] in bf16, saved by
    # the scan for the backward pass (remat recomputes everything else); its LoRA gradient
    # (float32); AdamW's new parameter, mu and nu beside the old ones until the step's
    # non-finite guard picks one (3 float32 copies); bf16 copies of its factors for the
    # TPU's matmuls (half a float32 copy).
    bound = SEQ * HIDDEN * 2 + (1 + 3 + 0.5) * lora
    assert one_more["temp_bytes"] <= bound, (one_more, bound)
    # The bound is tight enough to see a copy of the layer's 4-bit codes (its frozen bytes)
    assert one_more["frozen_bytes"] > bound, (one_more, bound)
    # Tiled (4 tiles of 64 tokens), a layer adds less than a copy of its MLP's codes more
    # (measured: 1.26 MB more, against 3 MiB of codes; 6.8 MB more when each tile's call laid
    # the codes out)
    mlp_codes = 3 * HIDDEN * FFN // 2
    assert tiled["temp_bytes"] - one_more["temp_bytes"] < mlp_codes, (tiled, one_more)
