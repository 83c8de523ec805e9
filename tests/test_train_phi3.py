"""A tiny Phi-3 through ``python -m jaxlora.train``: QLoRA on the fused projections with chat
data in Phi-3's template; the loss falls and the adapter loads in PEFT with jaxlora's logits."""

from __future__ import annotations

import json

import numpy as np
import peft
import torch

import jaxlora
from jaxlora import train
from tests._tokenizers import make_phi3_tokenizer
from tests.hf_models import make_hf_model, random_ids


def _chats(path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = (int(x) for x in rng.integers(1, 10, size=2))
            msgs = [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"It is {a + b}."},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")


def test_phi3_qlora_run_lowers_the_loss_and_writes_a_peft_adapter(tmp_path):
    tok = make_phi3_tokenizer()
    model_dir = tmp_path / "model"
    hf = make_hf_model("phi3", model_dir, vocab_size=len(tok), bos_token_id=tok.bos_token_id)
    tok.save_pretrained(model_dir)
    _chats(tmp_path / "train.jsonl", 64, seed=0)
    _chats(tmp_path / "eval.jsonl", 8, seed=1)
    out = tmp_path / "run"
    rc = train.main(
        [
            f"model.path={model_dir}",
            f"data.path={tmp_path / 'train.jsonl'}",
            f"data.eval_path={tmp_path / 'eval.jsonl'}",
            "data.format=chat",
            "data.val_size=0",
            "data.max_seq_len=64",
            "quant.type=nf4",
            "lora.target_modules=[qkv_proj,o_proj,gate_up_proj,down_proj]",
            "train.batch_size=4",
            "train.max_steps=40",
            "train.lr=2e-2",
            "train.log_every=1",
            "train.eval_every=40",
            "train.save_every=40",
            "train.sample_every=0",
            "train.exact_match_examples=0",
            f"output_dir={out}",
        ]
    )
    assert rc == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    # The format is learnt: 0.3 nats lower over 40 steps. (Measured 5.50 -> 5.08, with dropout 0.05
    # and with 0; at 10 steps the drop was 0.22-0.35 depending on the dropout stream alone.)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
    # PEFT reads the adapter onto the dense transformers base with the numbers jaxlora gives
    # the same adapter on the same dense base (the run trained it over the NF4 base).
    pm = peft.PeftModel.from_pretrained(hf, out / "adapter").eval()
    ids = random_ids(2, 9, vocab=len(tok))
    with torch.no_grad():
        theirs = pm(torch.as_tensor(ids)).logits.numpy()
    ours = jaxlora.load_model(model_dir, adapter=out / "adapter")(ids)
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)
