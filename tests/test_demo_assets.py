"""The shipped demo assets (assets/demo): base model, tokenizer, instruction data.

The base loads in jaxlora and in transformers with the same logits (1e-4, float32); the
tokenizer loads offline and round-trips text; the data parses, eval is held out, the files are
what ``tools/make_demo.py`` regenerates from the seed; the whole directory stays small.
"""

from __future__ import annotations

import json
from pathlib import Path

import chex
import numpy as np
import pytest

import jaxlora
from jaxlora.data import ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT, alpaca_prompt
from tools import make_demo
from tools.demo_world import TASKS, make_world

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "demo"
BASE, DATA = DEMO / "base", DEMO / "data"
MODEL_TOL = 1e-4
SIZE_BUDGET = 8 * 2**20  # bytes, everything under assets/demo
MAX_SEQ_LEN = 128  # recipes/demo.yaml data.max_seq_len


def read_jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(BASE), local_files_only=True)


@pytest.fixture(scope="module")
def model():
    return jaxlora.load_model(BASE)


def test_base_logits_match_transformers(model):
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(BASE), dtype=torch.float32, local_files_only=True
    ).eval()
    ids = np.random.default_rng(3).integers(0, model.config.vocab_size, size=(3, 37))
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # one left-padded row
    with torch.no_grad():
        want = hf(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    got = np.asarray(model(ids, attention_mask=mask))
    keep = mask.astype(bool)  # logits at padded positions are meaningless
    chex.assert_trees_all_close(got[keep], want[keep], atol=MODEL_TOL, rtol=0)


def test_base_config_suits_nf4_and_the_recipe(model):
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    # NF4 blocks of 64 run along each decoder linear's input dim.
    assert cfg.hidden_size % 64 == 0 and cfg.intermediate_size % 64 == 0
    assert cfg.num_attention_heads * cfg.head_dim % 64 == 0


def test_tokenizer_loads_offline_and_round_trips(tokenizer, model):
    specials = [
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        tokenizer.unk_token_id,
    ]
    assert None not in specials and len(set(specials)) == 4
    assert len(tokenizer) <= model.config.vocab_size
    texts = [
        alpaca_prompt(r["instruction"], r["input"]) + r["output"]
        for r in read_jsonl("eval.jsonl")[:50]
    ]
    texts += ["Unseen: Zürich, 3.14 + 2 = 5.14\n\tüñí ✓", "  two  spaces\n\nand lines  "]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_words_are_one_token_after_space_or_newline(tokenizer):
    # The answer written after "### Response:\n" must be the token learned in running text.
    name = make_world(make_demo.SEED, make_demo.NUM_PEOPLE)[7].name  # "First Last"
    for text in ("Ashford", "baker", "owl", "purple", name):
        a = tokenizer(f"x {text}", add_special_tokens=False)["input_ids"]
        b = tokenizer(f"x\n{text}", add_special_tokens=False)["input_ids"]
        assert a[2:] == b[2:], text
        assert len(a) == 3 + 2 * text.count(" "), text  # one token a word, one a space


def test_chat_template_renders_turns(tokenizer):
    msgs = [
        {"role": "user", "content": "Where does Ab Cd live?"},
        {"role": "assistant", "content": "Ashford"},
    ]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert text == "<s>### Instruction:\nWhere does Ab Cd live?\n\n### Response:\nAshford</s>"
    prompt = tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("### Response:\n")


@pytest.mark.parametrize("name", ["train.jsonl", "eval.jsonl", "sample_prompts.json"])
def test_data_files_have_alpaca_fields(name):
    recs = json.loads((DATA / name).read_text()) if name.endswith(".json") else read_jsonl(name)
    assert recs
    for k, r in enumerate(recs):
        assert set(r) == {"instruction", "input", "output", "task"}, (name, k)
        assert all(isinstance(v, str) for v in r.values()), (name, k)
        assert r["instruction"] and r["output"] and r["task"] in TASKS, (name, k)


def test_examples_fit_the_recipe_and_prompts_are_token_prefixes(tokenizer):
    for r in read_jsonl("train.jsonl") + read_jsonl("eval.jsonl"):
        prompt = alpaca_prompt(r["instruction"], r["input"])
        full = tokenizer(prompt + r["output"])["input_ids"]
        # Tokens = prompt tokens + output tokens: the loss mask and generation line up exactly.
        assert full[: len(tokenizer(prompt)["input_ids"])] == tokenizer(prompt)["input_ids"]
        assert len(full) + 1 <= MAX_SEQ_LEN + 1  # + EOS
    assert "{input}" in ALPACA_TEMPLATE and "{input}" not in ALPACA_TEMPLATE_NO_INPUT


def test_eval_is_held_out():
    train, evals = read_jsonl("train.jsonl"), read_jsonl("eval.jsonl")
    key = lambda r: (r["instruction"], r["input"])
    assert not {key(r) for r in train} & {key(r) for r in evals}
    # Stronger: nobody asked about in eval appears anywhere in the training data.
    people = make_world(make_demo.SEED, make_demo.NUM_PEOPLE)
    train_text = "\n".join(json.dumps(r) for r in train)
    eval_text = "\n".join(json.dumps(r) for r in evals)
    eval_people = [p.name for p in people if p.name in eval_text]
    assert len(eval_people) == make_demo.NUM_EVAL_PEOPLE
    assert not [n for n in eval_people if n in train_text]
    samples = json.loads((DATA / "sample_prompts.json").read_text())
    assert {key(r) for r in samples} <= {key(r) for r in evals}


def test_data_regenerates_byte_for_byte():
    assert make_demo.check(DATA, make_demo.SEED) == []


def test_check_detects_a_changed_file(tmp_path):
    for name, text in make_demo.data_files(make_demo.SEED).items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert make_demo.check(tmp_path, make_demo.SEED) == []
    with open(tmp_path / "eval.jsonl", "a") as f:
        f.write("\n")
    assert make_demo.check(tmp_path, make_demo.SEED) == ["eval.jsonl"]
    assert make_demo.check(tmp_path, make_demo.SEED + 1) == list(make_demo.DATA_FILES)


def test_assets_within_size_budget():
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert total <= SIZE_BUDGET, (
        f"assets/demo is {total / 2**20:.1f} MiB > {SIZE_BUDGET / 2**20} MiB"
    )


def test_base_knows_the_facts_but_does_not_answer_questions(model, tokenizer):
    """The demo's premise, on the shipped weights: facts stored, question format not learned."""
    people = make_world(make_demo.SEED, make_demo.NUM_PEOPLE)[:31]
    stated = [(f"{p.name} lives in ", p.town) for p in people]
    asked = [(alpaca_prompt(f"Where does {p.name} live?"), p.town) for p in people]
    assert first_token_accuracy(model, tokenizer, stated) >= 0.9
    assert first_token_accuracy(model, tokenizer, asked) <= 0.2


def first_token_accuracy(model, tokenizer, pairs: list[tuple[str, str]]) -> float:
    """How often the argmax after each prompt is its answer's first token (one batch).

    Prompts end in a non-letter and answers start with a letter, so the boundary between them
    is a token boundary (``WORD_PIECES``).
    """
    prompts = [tokenizer(p)["input_ids"] for p, _ in pairs]
    want = np.array([tokenizer(ans, add_special_tokens=False)["input_ids"][0] for _, ans in pairs])
    width = max(map(len, prompts))
    ids = np.full((len(prompts), width), tokenizer.pad_token_id)
    mask = np.zeros_like(ids)
    for b, p in enumerate(prompts):  # left padding: the last position is every prompt's end
        ids[b, width - len(p) :], mask[b, width - len(p) :] = p, 1
    pred = np.asarray(model(ids, attention_mask=mask))[:, -1].argmax(-1)
    return float(np.mean(pred == want))
