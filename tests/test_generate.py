"""KV-cache decoding equals the full forward pass and transformers' greedy generate."""

from __future__ import annotations

import io
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora import data
from jaxlora.config import ConfigError, from_argv
from jaxlora.generate import GenerateArgs
from jaxlora.generate import main as generate_main
from jaxlora.sampling import _sample, generate, generate_ids, init_caches, stream
from tests.hf_models import assert_greedy_equals_transformers, make_hf_model, random_ids


@pytest.fixture(scope="module", params=["llama3_gqa_tied_rope", "qwen2_window_tied"])
def ckpt(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return make_hf_model(request.param, directory, seed=5), jaxlora.load_model(directory)


def test_cached_decoding_matches_full_forward(ckpt):
    _, model = ckpt
    module = model.module()
    ids = jnp.asarray(random_ids(2, 10, seed=3), jnp.int32)
    full = model(ids)
    caches = init_caches(model.config, 2, 10, jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    seg = jnp.ones((2, 10), jnp.int32)
    first, caches = module.apply(
        {"params": model.params}, ids[:, :6], pos[:, :6], seg[:, :6], caches
    )
    steps = [first]
    for t in range(6, 10):
        out, caches = module.apply(
            {"params": model.params},
            ids[:, t : t + 1],
            pos[:, t : t + 1],
            seg[:, t : t + 1],
            caches,
        )
        steps.append(out)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-4, rtol=0)


def test_greedy_matches_transformers_generate_with_left_padding(ckpt):
    hf_model, model = ckpt
    ids = random_ids(3, 7, seed=4)
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    eos = 60
    assert_greedy_equals_transformers(hf_model, model, ids, mask, 9, eos=eos)


def test_top_k_and_top_p_only_sample_allowed_tokens():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 64))
    keys = jax.random.split(jax.random.key(0), 50)
    k_draws = {int(t) for k in keys for t in _sample(logits, k, 1.0, 2, 1.0)}
    p_draws = {int(t) for k in keys for t in _sample(logits, k, 1.0, 0, 0.7)}
    assert k_draws == {0, 1}
    assert p_draws == {0, 1}  # 0.5 < 0.7 <= 0.8: the two best tokens carry the mass


def test_cli_rejects_unknown_key_with_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'max_new_tokens'"):
        from_argv(GenerateArgs, ["model=x", "prompt=hi", "max_new_token=3"], repeatable=("prompt",))


def test_cli_prompts_are_taken_as_written_and_repeat():
    args = from_argv(
        GenerateArgs,
        ["model=x", "prompt=Reverse: a b c", "prompt=42", "top_k=3", "temperature=0.7"],
        repeatable=("prompt",),
    )
    assert args.prompt == ("Reverse: a b c", "42") and args.top_k == 3


@pytest.mark.parametrize("flag", ["top_k=3", "top_p=0.9"])
def test_cli_refuses_sampling_filters_on_greedy_decoding(flag):
    """``top_k`` / ``top_p`` with the default temperature 0 would change nothing (greedy):
    said, not ignored (transformers warns on the same)."""
    with pytest.raises(ConfigError, match="temperature=0 decodes greedily"):
        from_argv(GenerateArgs, ["model=x", "prompt=hi", flag], repeatable=("prompt",))


def test_sampling_settings_are_checked_and_top_k_past_the_vocabulary_keeps_every_token(demo):
    for kw, needle in [
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(temperature=1.0, top_k=-2), "top_k must be >= 0"),
        (dict(temperature=1.0, top_p=0.0), "top_p must be in"),
    ]:
        with pytest.raises(ValueError, match=needle):
            generate(demo, ["Hi"], max_new_tokens=2, **kw)
        with pytest.raises(ValueError, match=needle):
            next(stream(demo, ["Hi"], max_new_tokens=2, **kw))
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 64))
    keys = jax.random.split(jax.random.key(1), 50)
    draws = {int(t) for k in keys for t in _sample(logits, k, 1.0, 100, 1.0)}
    assert draws == {0, 1, 2, 3}


@pytest.mark.parametrize(
    "argv",
    [
        ["model=x"],
        ["model=x", "prompt=a", "interactive=true"],
        ["model=x", "prompt=a", "prompts=f"],
    ],
)
def test_cli_takes_exactly_one_source_of_prompts(argv):
    with pytest.raises(ConfigError, match="one of them"):
        from_argv(GenerateArgs, argv, repeatable=("prompt",))


def test_generate_buckets_shapes_and_each_row_matches_its_own_run():
    """``generate`` pads batch and prompt width to powers of two: prompts of other lengths and
    counts in the same bucket reuse one compiled loop, and a row's completion does not depend on
    the rows (or padding) beside it."""
    demo = Path(__file__).resolve().parents[1] / "assets" / "demo" / "base"
    model = jaxlora.load_model(demo)
    prompts = ["In which town does", "What kind of pet does Funbil Tenmi", "Describe"]
    new = 7  # a max_new_tokens no other test uses: the compile counts below are this test's own
    before = generate_ids._cache_size()
    together = generate(model, prompts, max_new_tokens=new)  # 3 rows -> 4, width -> 16
    alone = [generate(model, [p], max_new_tokens=new)[0] for p in prompts]  # 1 row, width 16
    assert together == alone
    assert generate_ids._cache_size() == before + 2
    generate(model, prompts[:2] + ["Where"], max_new_tokens=new)  # the 4-row bucket again
    generate(model, prompts + ["Who", "Why"], max_new_tokens=new)  # 5 rows -> 8: new shape
    assert generate_ids._cache_size() == before + 3


# ---- the command: templates, streaming, prompts files, the REPL (the demo base: real tokenizer) --

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo" / "base"
NEW = 6


@pytest.fixture(scope="module")
def demo():
    return jaxlora.load_model(DEMO)


def _run(capsys, *argv, stdin=None):
    rc = generate_main([f"model={DEMO}", f"max_new_tokens={NEW}", *argv], stdin=stdin)
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_prompt_is_a_user_turn_of_the_chat_template_unless_raw(demo, capsys):
    q = "In which town does Malmi Galpus live?"
    templated = generate(demo, [data.user_prompt(q)], max_new_tokens=NEW)[0]
    raw = generate(demo, [q], max_new_tokens=NEW)[0]
    assert data.encode_prompt(demo.tokenizer, data.user_prompt(q)) != data.encode_prompt(
        demo.tokenizer, q
    )  # the demo base has a chat template: the two prompts differ
    assert _run(capsys, f"prompt={q}") == (0, f"### {q}\n{templated}\n", "")
    assert _run(capsys, f"prompt={q}", "raw=true")[1] == f"### {q}\n{raw}\n"


def test_stream_yields_growing_text_that_ends_as_generate(demo):
    prompts = [data.user_prompt("Describe Fivas Runson in one sentence."), "In which"]
    partials = list(stream(demo, prompts, max_new_tokens=NEW))
    final = generate(demo, prompts, max_new_tokens=NEW)
    assert partials[-1].texts == final
    for before, after in zip(partials, partials[1:], strict=False):
        for b, a in zip(before.texts, after.texts, strict=True):
            assert a.startswith(b.rstrip("\ufffd"))
    assert len(partials) <= NEW


def test_streamed_and_whole_answers_print_the_same(capsys):
    qs = [f"prompt={q}" for q in ("Where does Malmi Galpus live?", "Name a town.", "Hi")]
    rc, streamed, _ = _run(capsys, *qs, "batch_size=2")
    assert rc == 0
    assert _run(capsys, *qs, "stream=false")[1] == streamed
    assert streamed.count("### ") == 3


def test_prompts_file_of_each_kind_and_output_jsonl(demo, tmp_path, capsys):
    msgs = [{"role": "user", "content": "Name a town."}]
    lines = [
        {"prompt": "Where does Malmi Galpus live?"},
        {"messages": msgs},
        {"instruction": "Name this person's job.", "input": "Malmi Galpus"},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    out = tmp_path / "answers.jsonl"
    rc, printed, _ = _run(capsys, f"prompts={path}", f"output={out}")
    want = generate(
        demo,
        [
            data.user_prompt("Where does Malmi Galpus live?"),
            msgs,
            data.user_prompt("Name this person's job.", "Malmi Galpus"),
        ],
        max_new_tokens=NEW,
    )
    labels = [
        "Where does Malmi Galpus live?",
        "Name a town.",
        "Name this person's job. [Malmi Galpus]",
    ]
    assert rc == 0
    assert printed == "\n".join(f"### {lab}\n{w}\n" for lab, w in zip(labels, want, strict=True))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows == [{"prompt": lab, "completion": w} for lab, w in zip(labels, want, strict=True)]


@pytest.mark.parametrize(
    "line, needle",
    [
        ('{"prompt": "a"', "not valid JSON"),
        ('{"question": "a"}', "expected a 'prompt', 'messages' or 'instruction' field"),
        ('{"messages": [{"role": "user"}]}', "{role, content}"),
        ('["a"]', "expected a JSON object"),
        ('{"prompt": 3}', "'prompt' must be a string"),
    ],
)
def test_a_malformed_prompts_line_is_named_and_nothing_is_written(tmp_path, capsys, line, needle):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    out = tmp_path / "answers.jsonl"
    out.write_text("kept\n")
    rc, printed, err = _run(capsys, f"prompts={path}", f"output={out}")
    assert rc == 2 and printed == "" and f"{path}:2" in err and needle in err
    assert out.read_text() == "kept\n"


def test_interactive_keeps_the_conversation_and_reset_starts_over(demo, capsys):
    stdin = io.StringIO("Where does Malmi Galpus live?\nAnd his pet?\n/reset\nName a town.\n")
    rc, printed, err = _run(capsys, "interactive=true", stdin=stdin)
    first = [{"role": "user", "content": "Where does Malmi Galpus live?"}]
    (r1,) = generate(demo, [first], max_new_tokens=NEW)
    second = [
        *first,
        {"role": "assistant", "content": r1},
        {"role": "user", "content": "And his pet?"},
    ]
    (r2,) = generate(demo, [second], max_new_tokens=NEW)
    (r3,) = generate(demo, [data.user_prompt("Name a town.")], max_new_tokens=NEW)
    assert rc == 0 and printed == f"{r1}\n{r2}\n{r3}\n"
    assert "/reset" in err and "conversation cleared" in err


def test_interactive_raw_continues_one_transcript(demo, capsys):
    stdin = io.StringIO("Malmi Galpus lives in\n and\n")
    rc, printed, _ = _run(capsys, "interactive=true", "raw=true", stdin=stdin)
    (r1,) = generate(demo, ["Malmi Galpus lives in"], max_new_tokens=NEW)
    (r2,) = generate(demo, ["Malmi Galpus lives in" + r1 + " and"], max_new_tokens=NEW)
    assert rc == 0 and printed == f"{r1}\n{r2}\n"


def test_a_model_without_a_chat_template_gets_text_as_written(tmp_path, capsys):
    model_dir = tmp_path / "no_template"
    base = jaxlora.load_model(DEMO)
    base.tokenizer.chat_template = None
    base.tokenizer.save_pretrained(model_dir)
    for f in DEMO.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (model_dir / f.name).write_bytes(f.read_bytes())
    rc = generate_main([f"model={model_dir}", f"max_new_tokens={NEW}", "prompt=Hello"])
    out, err = capsys.readouterr()
    (want,) = generate(base, ["Hello"], max_new_tokens=NEW)
    assert rc == 0 and out == f"### Hello\n{want}\n" and "no chat template" in err
    path = tmp_path / "p.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "Hello"}]}\n')
    rc = generate_main([f"model={model_dir}", f"prompts={path}"])
    assert rc == 2 and "needs a chat template" in capsys.readouterr().err


def test_generation_stops_at_every_eos_of_generation_config_as_transformers(tmp_path):
    """``generation_config.json`` may list more ids than the tokenizer's EOS (Llama-3.1-Instruct:
    ``[128001, 128008, 128009]``): transformers' ``generate`` stops at each, and so does
    jaxlora's. The extra id here is a token the demo's greedy answer produces, so stopping
    there is visible; a merged export keeps the file and the ids."""
    import shutil

    import torch
    import transformers

    base = tmp_path / "base"
    shutil.copytree(DEMO, base)
    prompt = data.user_prompt("In which town does Malmi Galpus live?")
    model = jaxlora.load_model(base)
    ids = data.encode_prompt(model.tokenizer, prompt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    full = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :]
    eos = model.tokenizer.eos_token_id
    extra = int(full[3])  # the 4th token of the free-running answer
    assert extra != eos
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, extra]}))
    model = jaxlora.load_model(base)
    assert model.generation.eos_ids == [eos, extra]
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    want = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :]
    cut = want.tolist().index(extra)
    assert cut <= 3
    text = model.tokenizer.decode(want[:cut], skip_special_tokens=True)
    assert generate(model, [prompt], max_new_tokens=12) == [text]

    out = model.save_merged(tmp_path / "merged")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [eos, extra]
    src, dst = (json.loads((d / "config.json").read_text()) for d in (base, out))
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert dst.get(k) == src.get(k), k
    assert jaxlora.load_model(out).generation == model.generation


def test_an_alpaca_input_reaches_a_template_that_has_no_place_for_it(demo):
    """``{"instruction", "input"}`` prompt lines: jaxlora's Alpaca template renders the input
    in its own block; any other template (the demo base's) gets it after the instruction, a
    blank line between, instead of dropping it."""
    import copy

    tok = demo.tokenizer
    with_input = data.user_prompt("Name this person's job.", "Malmi Galpus")
    folded = data.user_prompt("Name this person's job.\n\nMalmi Galpus")
    assert data.encode_prompt(tok, with_input) == data.encode_prompt(tok, folded)
    alpaca = copy.deepcopy(tok)
    alpaca.chat_template = data.alpaca_chat_template(bos=False)
    text = data.render_prompt(alpaca, with_input)
    assert text == data.alpaca_prompt("Name this person's job.", "Malmi Galpus")
