"""``python -m jaxlora.train`` on a tiny Falcon: LoRA and QLoRA runs lower the loss and write an
adapter PEFT loads onto the transformers model, giving jaxlora's logits."""

from __future__ import annotations

import chex
import numpy as np
import pytest
import torch

import jaxlora
from jaxlora import train
from tests.hf_models import make_run_assets, random_ids
from tests.test_train_cli import _args, _metrics

pytestmark = pytest.mark.xdist_group("train_cli")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_run_assets(tmp_path_factory.mktemp("falcon_assets"), falcon="falcon7b_mqa")


@pytest.mark.parametrize("quant", ["nf4"])  # QLoRA: LoRA on a 4-bit base, the superset
def test_short_falcon_run_lowers_loss_and_peft_loads_the_adapter(assets, tmp_path, quant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    extra = ["train.max_steps=8", "train.lr=3e-3", "lora.target_modules=all-linear"]
    assert train.main(_args(assets, out, *extra, f"quant.type={quant}")) == 0
    losses = [r["loss"] for r in _metrics(out)]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses  # nats, as test_train_cli

    base = AutoModelForCausalLM.from_pretrained(str(assets["model"]), dtype=torch.float32)
    pm = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    wrapped = {n.rsplit(".", 1)[-1] for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    ids = random_ids(2, 9, vocab=pm.config.vocab_size)
    ours = jaxlora.load_model(assets["model"], adapter=out / "adapter")
    with torch.no_grad():
        theirs = pm(torch.as_tensor(ids)).logits.numpy()
    # the adapter on the float32 base, in both: one model's numbers, 1e-4
    chex.assert_trees_all_close(np.asarray(ours(ids)), theirs, atol=1e-4, rtol=0)
