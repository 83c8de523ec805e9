"""ShareGPT records, named chat templates (data.chat_template), and val_size in the recipes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from jaxlora.config import ConfigError, DataConfig, load_config
from jaxlora.data import (
    DataError,
    alpaca_prompt,
    build_datasets,
    install_template,
    load_records,
    tokenize,
)
from jaxlora.data.templates import NAMED
from tests._tokenizers import CHAT_TEMPLATE, make_tokenizer

# The special tokens of every named template, so one tokenizer can render them all.
ALL_TOKENS = sorted({t for named in NAMED.values() for t in named.tokens})

SHAREGPT = [
    {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "What is two plus three?"},
            {"from": "gpt", "value": "five"},
            {"from": "human", "value": "And plus four?"},
            {"from": "gpt", "value": "nine"},
        ]
    },
    {
        "conversations": [
            {"from": "user", "value": "Name a colour."},
            {"from": "assistant", "value": "blue"},
        ]
    },
]
AS_CHAT = [  # SHAREGPT with chat roles
    {
        "messages": [
            {
                "role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]),
                "content": t["value"],
            }
            for t in rec["conversations"]
        ]
    }
    for rec in SHAREGPT
]


def _jsonl(path: Path, records: list) -> str:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def _cfg(path: str, **kw) -> DataConfig:
    return DataConfig(path=path, **{"max_seq_len": 251, "val_size": 0, **kw})


def _tokenizer(chat_template: bool = False):
    """The test tokenizer with every named template's special tokens (no model needs it)."""
    tok = make_tokenizer(chat_template=chat_template)
    tok.add_special_tokens({"additional_special_tokens": ALL_TOKENS})
    return tok


def test_sharegpt_trains_exactly_as_the_same_chat_records(tmp_path):
    tok = make_tokenizer()
    share = _cfg(_jsonl(tmp_path / "s.jsonl", SHAREGPT), format="sharegpt")
    chat = _cfg(_jsonl(tmp_path / "c.jsonl", AS_CHAT), format="chat")
    got, _ = tokenize(load_records(share), tok, share)
    want, _ = tokenize(load_records(chat), tok, chat)
    assert len(got) == len(want) == 2
    for g, w in zip(got, want, strict=True):
        assert g.tokens.tolist() == w.tokens.tolist() and g.trained.tolist() == w.trained.tolist()
    # Loss on assistant turns only (tests/data/test_data.py checks the chat masks themselves).
    assert tok.decode(got[0].tokens[got[0].trained]) == "five</s>\nnine</s>\n"


def test_sharegpt_field_names_and_extra_roles(tmp_path):
    recs = [
        {"dialog": [{"speaker": "customer", "text": "Hi"}, {"speaker": "bing", "text": "Hello"}]}
    ]
    kw = {"conversations_field": "dialog", "role_field": "speaker", "content_field": "text"}
    path = _jsonl(tmp_path / "s.jsonl", recs)
    with pytest.raises(DataError, match=r's\.jsonl:1: dialog\[0\] has the unknown role "customer"'):
        load_records(_cfg(path, format="sharegpt", **kw))
    roles = {"customer": "user", "bing": "assistant"}
    cfg = _cfg(path, format="sharegpt", sharegpt_roles=roles, **kw)
    (ex,), _ = tokenize(load_records(cfg), make_tokenizer(), cfg)
    assert make_tokenizer().decode(ex.tokens) == "<s><|user|>\nHi\n<|assistant|>\nHello</s>\n"


def test_sharegpt_system_field_is_the_system_turn(tmp_path):
    """LLaMA-Factory's variant keeps the system prompt in a top-level ``system`` field: it
    trains exactly as the same conversation with a system turn first."""
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    beside = _cfg(
        _jsonl(tmp_path / "a.jsonl", [{"system": "Be brief.", "conversations": turns}]),
        format="sharegpt",
    )
    first = [{"from": "system", "value": "Be brief."}, *turns]
    inside = _cfg(_jsonl(tmp_path / "b.jsonl", [{"conversations": first}]), format="sharegpt")
    tok = make_tokenizer()
    (got,), _ = tokenize(load_records(beside), tok, beside)
    (want,), _ = tokenize(load_records(inside), tok, inside)
    assert got.tokens.tolist() == want.tokens.tolist()
    assert got.trained.tolist() == want.trained.tolist()
    both = _cfg(
        _jsonl(tmp_path / "c.jsonl", [{"system": "Be brief.", "conversations": first}]),
        format="sharegpt",
    )
    with pytest.raises(DataError, match=r'c\.jsonl:1: has both a "system" field'):
        load_records(both)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"conversations": []}', r':2: field "conversations" must be a non-empty list'),
        ('{"messages": [{"from": "human", "value": "x"}]}', r':2: field "conversations" must'),
        (
            '{"conversations": [{"value": "x"}]}',
            r':2: conversations\[0\] must be an object with a string "from"',
        ),
        (
            '{"conversations": [{"from": "human"}]}',
            r':2: conversations\[0\] must have a string "value"',
        ),
        (
            '{"conversations": [{"from": "human", "value": "a"}, {"from": "chatgpt", "value": "b"}]}',
            r':2: conversations\[1\] has the unknown role "chatgpt"; known: system, human, user, gpt, '
            r"assistant \(map another with data.sharegpt_roles.chatgpt=",
        ),
    ],
)
def test_malformed_sharegpt_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(SHAREGPT[1]) + "\n" + line + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl" + message):
        load_records(_cfg(str(path), format="sharegpt"))


# Each family's documented prompt format for transformers' chat-templating example conversation,
# with the generation prompt; BOS is the test tokenizer's <s>, EOS its </s>.
Q1, A1, Q2 = (
    "Hello, how are you?",
    "I'm doing great. How can I help you today?",
    "I'd like to show off how chat templating works!",
)
KNOWN = {
    # llama.meta.com/docs/model-cards-and-prompt-formats/meta-llama-3
    "llama3": f"<s><|start_header_id|>user<|end_header_id|>\n\n{Q1}<|eot_id|>"
    f"<|start_header_id|>assistant<|end_header_id|>\n\n{A1}<|eot_id|>"
    f"<|start_header_id|>user<|end_header_id|>\n\n{Q2}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    # transformers docs, chat templating (ChatML)
    "chatml": f"<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n{A1}<|im_end|>\n"
    f"<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n",
    # transformers docs, chat templating (Mistral-7B-Instruct)
    "mistral": f"<s>[INST] {Q1} [/INST]{A1}</s>[INST] {Q2} [/INST]",
    # ai.google.dev/gemma/docs/formatting
    "gemma": f"<s><start_of_turn>user\n{Q1}<end_of_turn>\n<start_of_turn>model\n{A1}<end_of_turn>\n"
    f"<start_of_turn>user\n{Q2}<end_of_turn>\n<start_of_turn>model\n",
    # huggingface.co/microsoft/Phi-3-mini-4k-instruct (chat format)
    "phi3": f"<|user|>\n{Q1}<|end|>\n<|assistant|>\n{A1}<|end|>\n<|user|>\n{Q2}<|end|>\n<|assistant|>\n",
    "alpaca": f"<s>{alpaca_prompt(Q1)}{A1}</s>{alpaca_prompt(Q2)}",
}
# What each template trains of an assistant turn: the answer and the template's end of turn.
TURN_END = {
    "llama3": "<|eot_id|>",
    "chatml": "<|im_end|>\n",
    "mistral": "</s>",
    "gemma": "<end_of_turn>\n",
    "phi3": "<|end|>\n",
    "alpaca": "</s>",
}


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_named_template_renders_the_documented_format_and_trains_its_answers(tmp_path, name):
    tok = _tokenizer()
    cfg = _cfg("x.jsonl", format="sharegpt", chat_template=name, max_seq_len=1024)
    install_template(tok, cfg)
    convo = [
        {"role": "user", "content": Q1},
        {"role": "assistant", "content": A1},
        {"role": "user", "content": Q2},
    ]
    assert tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=True) == KNOWN[name]
    # Two answered turns: each answer and its end of turn are trained, nothing else (Phi-3 ends
    # the whole conversation with EOS, which belongs to the last turn).
    two = [*convo, {"role": "assistant", "content": "Fine."}]
    rec = {"conversations": [{"from": m["role"], "value": m["content"]} for m in two]}
    (ex,), _ = tokenize([rec], tok, cfg)
    eos = "</s>" if name == "phi3" else ""
    want = A1 + TURN_END[name] + "Fine." + TURN_END[name] + eos
    assert tok.decode(ex.tokens[ex.trained], skip_special_tokens=False) == want
    assert tok.decode(ex.tokens) == tok.apply_chat_template(two, tokenize=False)


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_answers_with_surrounding_whitespace_train_as_the_template_renders_them(name):
    """Llama 3's and Gemma's templates trim each message: an answer with a leading space or a
    trailing newline (common in real data) is located trimmed, not refused."""
    tok = _tokenizer()
    cfg = _cfg("x.jsonl", format="chat", chat_template=name, max_seq_len=1024)
    install_template(tok, cfg)
    convo = [{"role": "user", "content": Q1}, {"role": "assistant", "content": " Fine.\n"}]
    (ex,), _ = tokenize([{"messages": convo}], tok, cfg)
    assert tok.decode(ex.tokens) == tok.apply_chat_template(convo, tokenize=False)
    assert "Fine." in tok.decode(ex.tokens[ex.trained], skip_special_tokens=False)


def test_a_template_that_rewrites_the_answer_is_refused_by_message(tmp_path):
    path = tmp_path / "upper.jinja"
    path.write_text(CHAT_TEMPLATE.replace("{{ m['content'] }}", "{{ m['content'] | upper }}"))
    tok = make_tokenizer(chat_template=False)
    cfg = _cfg("x.jsonl", format="chat", chat_template=str(path))
    install_template(tok, cfg)
    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Fine."}]
    with pytest.raises(DataError, match="does not render message 1's content in its turn"):
        tokenize([{"messages": convo}], tok, cfg)


def test_phi3_without_the_generation_prompt_ends_with_eos():
    tok = _tokenizer()
    install_template(tok, _cfg("x.jsonl", format="chat", chat_template="phi3"))
    convo = [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1}]
    assert (
        tok.apply_chat_template(convo, tokenize=False)
        == f"<|user|>\n{Q1}<|end|>\n<|assistant|>\n{A1}<|end|>\n</s>"
    )


def test_end_of_turn_token_becomes_eos_and_the_override_is_logged(caplog):
    tok = _tokenizer(chat_template=True)
    with caplog.at_level(logging.WARNING):
        install_template(tok, _cfg("x.jsonl", format="chat", chat_template="chatml"))
    assert tok.chat_template == NAMED["chatml"].jinja
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == tok.convert_tokens_to_ids(
        "<|im_end|>"
    )
    assert "replaces the tokenizer's own chat template" in caplog.text
    assert "eos_token </s> -> <|im_end|>" in caplog.text


def test_a_template_file_is_installed_as_written(tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text(CHAT_TEMPLATE)
    tok = make_tokenizer(chat_template=False)
    install_template(tok, _cfg("x.jsonl", format="sharegpt", chat_template=str(path)))
    assert tok.chat_template == CHAT_TEMPLATE
    with pytest.raises(DataError, match=r"data.chat_template=.*gone.jinja: no such file .*llama3"):
        install_template(
            tok, _cfg("x.jsonl", format="chat", chat_template=str(tmp_path / "gone.jinja"))
        )


def test_missing_special_tokens_and_missing_template_are_refused(tmp_path):
    with pytest.raises(DataError, match="writes the special tokens <start_of_turn>, <end_of_turn>"):
        install_template(
            make_tokenizer(chat_template=False),
            _cfg("x.jsonl", format="chat", chat_template="gemma"),
        )
    cfg = _cfg(_jsonl(tmp_path / "s.jsonl", SHAREGPT), format="sharegpt")
    with pytest.raises(DataError, match="no chat_template; name one with data.chat_template"):
        tokenize(load_records(cfg), make_tokenizer(chat_template=False), cfg)


@pytest.mark.parametrize(
    "kw, needle",
    [
        (
            {"format": "chat", "chat_template": "chatlm"},
            "'chatlm' is neither a named template (llama3, chatml,",
        ),
        (
            {"format": "alpaca", "chat_template": "chatml"},
            "needs data.format chat or sharegpt, not alpaca",
        ),
        ({"format": "sharegpt", "sharegpt_roles": {"bot": "model"}}, "data.sharegpt_roles.bot"),
    ],
)
def test_bad_template_and_role_values_are_refused_naming_the_choices(kw, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_config("demo", [f"data.{k}={json.dumps(v)}" for k, v in kw.items()])
    assert needle in str(e.value)


# ---- the shipped recipes hold out a fraction, so a small file of one's own fits --------------


@pytest.mark.parametrize("recipe", ["llama_qlora", "llama_lora"])
def test_shipped_recipe_with_a_300_example_file_holds_out_two_percent(tmp_path, recipe):
    records = [
        {"instruction": f"What is {i} plus 1?", "output": f"It is {i + 1}."} for i in range(300)
    ]
    cfg = load_config(recipe, [f"data.path={_jsonl(tmp_path / 'mine.jsonl', records)}"])
    assert cfg.data.val_size == 0.02
    train, val = build_datasets(cfg.data, make_tokenizer(), cfg.data_seed)
    assert (len(train.examples), len(val.examples)) == (294, 6)


def test_sharegpt_held_out_records_become_exact_match_prompts(tmp_path):
    from jaxlora.training.evaluate import prompts_and_answers

    cfg = _cfg(_jsonl(tmp_path / "s.jsonl", SHAREGPT), format="sharegpt")
    prompts, answers = prompts_and_answers(cfg, 5)
    assert answers == ["nine", "blue"]
    assert prompts == [AS_CHAT[0]["messages"][:4], AS_CHAT[1]["messages"][:1]]
