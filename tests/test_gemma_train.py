"""Gemma through the data pipeline and the training CLI: Gemma's own chat template shapes the
examples (what happens to a system message), and a short QLoRA run of a tiny Gemma 2 lowers
the loss and writes an adapter that PEFT loads with jaxlora's logits."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest

from jaxlora import train
from jaxlora.config import DataConfig
from jaxlora.data import DataError, load_records, tokenize
from jaxlora.sampling import stop_ids
from tests._tokenizers import GEMMA2_CHAT_TEMPLATE, GEMMA3_CHAT_TEMPLATE, make_tokenizer
from tests.hf_models import make_hf_model, random_ids

pytestmark = pytest.mark.xdist_group("train_cli")

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "It is 5."},
    {"role": "user", "content": "And 4 plus 4?"},
    {"role": "assistant", "content": "It is 8."},
]


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _gemma_tokenizer(template: str):
    """The test tokenizer with Gemma's turn markers as special tokens, as Gemma's has them."""
    tok = make_tokenizer(chat_template=False)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = template
    return tok


def test_gemma_templates_train_model_turns_and_place_the_system_message(tmp_path):
    """Gemma 2's template has no system role: a conversation with one is refused with the
    template's own message. Gemma 3's folds it into the first user turn (not trained). Either
    way only the model turns and their ``<end_of_turn>`` are trained."""
    path = _write(tmp_path / "c.jsonl", [{"messages": CHAT}])
    cfg = DataConfig(path=path, format="chat", max_seq_len=400, val_size=0)
    with pytest.raises(DataError, match="System role not supported"):
        tokenize(load_records(cfg), _gemma_tokenizer(GEMMA2_CHAT_TEMPLATE), cfg)
    no_system = dataclasses.replace(
        cfg, path=_write(tmp_path / "n.jsonl", [{"messages": CHAT[1:]}])
    )
    for template, records in ((GEMMA2_CHAT_TEMPLATE, no_system), (GEMMA3_CHAT_TEMPLATE, cfg)):
        tok = _gemma_tokenizer(template)
        (ex,), _ = tokenize(load_records(records), tok, records)
        trained = tok.decode(list(ex.tokens[ex.trained]), skip_special_tokens=False)
        assert trained == "It is 5.<end_of_turn>\nIt is 8.<end_of_turn>\n"
        untrained = tok.decode(list(ex.tokens[~ex.trained]), skip_special_tokens=False)
        assert untrained.startswith("<s><start_of_turn>user\n")
        if template is GEMMA3_CHAT_TEMPLATE:
            assert "<start_of_turn>user\nAnswer briefly.\n\nWhat is 2 plus 3?" in untrained


def test_generation_stops_at_the_end_of_a_model_turn():
    """Gemma's tokenizer ends sequences with ``<eos>`` but its template ends a model turn with
    ``<end_of_turn>``: sampling stops at either, as ``generation_config.json`` says."""
    tok = _gemma_tokenizer(GEMMA2_CHAT_TEMPLATE)
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    assert stop_ids(tok) == [tok.eos_token_id, end]
    assert stop_ids(make_tokenizer()) == [tok.eos_token_id]  # its template ends turns with EOS


@pytest.fixture(scope="module")
def gemma_run(tmp_path_factory):
    """A tiny Gemma 2 (soft-capped as Gemma 2 is) with Gemma 2's chat template, chat data, and a 10-step
    QLoRA run (NF4 base, LoRA on every linear layer) through ``python -m jaxlora.train``."""
    root = tmp_path_factory.mktemp("gemma_run")
    tok = _gemma_tokenizer(GEMMA2_CHAT_TEMPLATE)
    model_dir = root / "model"
    make_hf_model(
        "gemma2_softcap",
        model_dir,
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        final_logit_softcapping=30.0,  # Gemma 2's own caps: the test family's 0.5 keeps the
        attn_logit_softcapping=50.0,  # logits too flat to learn from
    )
    tok.save_pretrained(model_dir)
    rng = random.Random(0)
    chats = []
    for _ in range(64):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        turns = [("user", f"What is {a} plus {b}?"), ("assistant", f"It is {a + b}.")]
        chats.append({"messages": [{"role": r, "content": c} for r, c in turns]})
    out = root / "run"
    rc = train.main(
        [
            f"model.path={model_dir}",
            f"data.path={_write(root / 'train.jsonl', chats)}",
            "data.format=chat",
            "data.val_size=0",
            "data.eval_path=null",
            "data.max_seq_len=64",
            "quant.type=nf4",
            "lora.target_modules=all-linear",
            "train.batch_size=4",
            "train.max_steps=10",
            "train.lr=3e-3",
            "train.log_every=1",
            "train.save_every=0",  # no Orbax checkpoint: the adapter is written at the end
            "train.sample_every=0",
            "train.exact_match_examples=0",
            f"output_dir={out}",
        ]
    )
    assert rc == 0
    return model_dir, out


def test_short_qlora_run_lowers_the_loss_and_writes_an_adapter_peft_loads(gemma_run):
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    import jaxlora

    model_dir, out = gemma_run
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in m if "loss" in r]
    assert len(losses) == 10
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses  # nats
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf, out / "adapter").eval()
    ids = random_ids(2, 9, vocab=hf.config.vocab_size)
    with torch.no_grad():
        theirs = pm(torch.as_tensor(ids)).logits.numpy()
    ours = jaxlora.load_model(model_dir, adapter=out / "adapter")
    np.testing.assert_allclose(np.asarray(ours(ids)), theirs, atol=1e-4, rtol=0)
