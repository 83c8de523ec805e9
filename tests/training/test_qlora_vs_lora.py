"""The demo task trained with QLoRA ends within 3 % of the eval loss of the same run in 16-bit
(here float32) LoRA: NF4 + double quantization costs the fine-tune almost nothing. Both are the
full demo recipe (200 steps), sampling and exact match off."""

from __future__ import annotations

import json

import pytest

from jaxlora import train

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("qlora_vs_lora")]


def _final_eval_loss(out) -> float:
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in evals if "eval_loss" in r][-1]


def test_demo_qlora_within_3_percent_of_lora(tmp_path):
    common = [
        "train.sample_every=0",
        "train.exact_match_examples=0",
        "train.save_every=0",
        "train.eval_every=100",
    ]
    assert train.main(["recipe=demo", *common, f"output_dir={tmp_path / 'q'}"]) == 0
    assert (
        train.main(["recipe=demo", *common, "quant.type=none", f"output_dir={tmp_path / 'l'}"]) == 0
    )
    qlora, lora = _final_eval_loss(tmp_path / "q"), _final_eval_loss(tmp_path / "l")
    assert lora < 1.0  # both runs actually learned the task (the base starts near 6.1)
    # QLoRA must not end more than 3 % worse. (It may end better: measured 0.130 vs 0.136 on
    # the full demo, inside the run's own seed-to-seed spread of ~15 %.)
    assert qlora <= 1.03 * lora, (qlora, lora)
