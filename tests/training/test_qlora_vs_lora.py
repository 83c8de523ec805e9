"""The demo task trained with QLoRA ends close to the eval loss of the same run in 16-bit (here
float32) LoRA: NF4 + double quantization costs the fine-tune little. Both are the full demo
recipe (200 steps): QLoRA is the README's demo run (shared with tests/test_readme_demo.py), LoRA
the same recipe with ``quant.type=none``.

How close is measured, not assumed. Final eval loss, QLoRA / LoRA, same seed (``train.seed``
also orders the data), this repository on an Intel Xeon, 2 cores (2026-12-02):

    seed 0: 0.1590 / 0.1344 = 1.18    seed 2: 0.1402 / 0.1406 = 1.00
    seed 1: 0.1570 / 0.1386 = 1.13    seed 3: 0.1803 / 0.1437 = 1.25
    mean:   0.159  / 0.139  = 1.14    (seed 0 without dropout: 0.1599 / 0.1480 = 1.08)

LoRA ends within 0.134-0.144 whatever the seed; QLoRA spreads over 0.140-0.180: on this 3 M
model the 4-bit base costs ~14 % of the final eval loss on average. The run is chaotic in its
last bits (the dropout stream alone, or another CPU's rounding, moves a seed's ratio by
~0.1: an earlier dropout-key scheme gave 0.99 at seed 0), so one seed's ratio is a draw from that
spread and the bound sits above its largest measured value.
"""

from __future__ import annotations

import json

import pytest

from tests.processes import run_train

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("demo")]


def _final_eval_loss(out) -> float:
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in evals if "eval_loss" in r][-1]


def test_demo_qlora_ends_close_to_lora(demo_run, tmp_path):
    # QLoRA: the README's demo run (tests/conftest.py); LoRA: the same recipe with a float32
    # base, without samples, exact match and checkpoints, which do not change the training
    off = ["train.sample_every=0", "train.exact_match_examples=0", "train.save_every=0"]
    out = tmp_path / "lora"
    run_train("recipe=demo", *off, "quant.type=none", f"output_dir={out}")
    qlora, lora = _final_eval_loss(demo_run), _final_eval_loss(out)
    assert lora < 1.0  # both runs actually learned the task (the base starts near 6.1)
    # QLoRA must not end more than 35 % worse (measured 1.00-1.25 over four seeds, above). A
    # broken 4-bit path does not land here: the NF4 layout and matmul are checked against
    # bitsandbytes to float32 tolerance elsewhere; this is the end-to-end cost of 4 bits.
    assert qlora <= 1.35 * lora, (qlora, lora)
