"""Held-out measures (``jaxlora.training.evaluate``): eval loss against a hand computation, the
prompts and answers of alpaca and chat records, exact match against the model's own greedy
answers, prompt formatting, samples, and the before/after report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora import data, lora
from jaxlora.config import Config, DataConfig, ModelConfig, TrainConfig
from jaxlora.models.llama import LlamaForCausalLM, init_params
from jaxlora.sampling import generate
from jaxlora.training import evaluate
from jaxlora.training.step import make_eval_step
from tests._tokenizers import make_tokenizer
from tests.hf_models import tiny_config

DEMO = Path(__file__).resolve().parents[2] / "assets" / "demo"
NEW_TOKENS = 12  # one max_new_tokens for every generation here: one compiled loop per bucket

CFG = tiny_config()


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---- eval_loss -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lora():
    """A tiny Llama with random LoRA on q/v: ``(module, frozen, trainable, params)``."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: init_params(CFG, jax.random.key(0)))
    base = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.normal(size=s.shape), s.dtype), shapes)
    base["lm_head"]["weight"] *= 10  # peaked predictions: per-token losses differ widely
    cfg = lora.LoraConfig(r=2, alpha=4, init="random")
    params = lora.inject(base, cfg, jax.random.key(1))
    frozen, trainable = lora.partition(params, cfg)
    return LlamaForCausalLM(CFG), frozen, trainable, params


def _examples() -> list[data.Example]:
    """Examples of different lengths and trained-token counts (so a mean of means is wrong)."""
    rng = np.random.default_rng(1)
    out = []
    for n, first_trained in [(9, 3), (5, 1), (7, 6), (4, 2), (11, 2), (6, 4), (3, 1)]:
        tokens = rng.integers(0, CFG.vocab_size, n).astype(np.int32)
        out.append(data.Example(tokens, np.arange(n) >= first_trained))
    return out


@jax.jit
def _forward(params, ids, positions, segment_ids):
    return LlamaForCausalLM(CFG).apply({"params": params}, ids, positions, segment_ids)[0]


def _hand_loss(params, examples) -> tuple[float, float]:
    """Token-weighted mean CE with every example alone in its own row (right-padded, no segment
    masking: causal attention keeps the padding out), in float64; and the mean of per-example
    means, what a wrong reduction would give."""
    width = max(ex.length for ex in examples)
    ids = np.zeros((len(examples), width), np.int32)
    for i, ex in enumerate(examples):
        ids[i, : ex.length] = ex.tokens[:-1]
    pos = np.broadcast_to(np.arange(width), ids.shape)
    logits = np.asarray(_forward(params, ids, pos, np.ones_like(ids)), np.float64)
    total, count, means = 0.0, 0.0, []
    for i, ex in enumerate(examples):
        n = ex.length
        logp = logits[i, :n] - logits[i, :n].max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        ce = -logp[np.arange(n), ex.tokens[1:]]
        w = ex.trained[1:].astype(np.float64)
        total, count = total + (ce * w).sum(), count + w.sum()
        means.append((ce * w).sum() / w.sum())
    return total / count, float(np.mean(means))


def test_eval_loss_is_the_token_weighted_mean_ce_over_the_whole_packed_dataset(tiny_lora):
    module, frozen, trainable, params = tiny_lora
    examples = _examples()
    ds = data.PackedDataset.build(examples, seq_len=12, packing=True, pad_id=0)
    assert len(ds) < len(examples)  # rows hold several examples
    want, mean_of_means = _hand_loss(params, examples)
    assert abs(want - mean_of_means) > 1e-3 * want  # the data tells the reductions apart
    eval_step = jax.jit(make_eval_step(module, lora.combine))
    # 1: a row a batch; 3: a short last batch filled with empty rows; 8: all rows, and empty ones
    for batch_size in (1, 3, 8):
        got = evaluate.eval_loss(eval_step, trainable, frozen, ds, batch_size)
        assert isinstance(got, float)
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"batch_size={batch_size}")


def test_eval_loss_uses_the_trainable_half(tiny_lora):
    module, frozen, trainable, _ = tiny_lora
    ds = data.PackedDataset.build(_examples(), seq_len=12, packing=True)
    eval_step = jax.jit(make_eval_step(module, lora.combine))
    zero_b = jax.tree.map(
        lambda w: w.replace(b=jnp.zeros_like(w.b)) if isinstance(w, lora.LoRAWeight) else w,
        trainable,
        is_leaf=lambda x: isinstance(x, lora.LoRAWeight),
    )
    base_only, _ = _hand_loss(lora.combine(frozen, zero_b), _examples())
    got = evaluate.eval_loss(eval_step, zero_b, frozen, ds, 3)
    np.testing.assert_allclose(got, base_only, rtol=1e-5)
    assert abs(got - evaluate.eval_loss(eval_step, trainable, frozen, ds, 3)) > 1e-4


def test_eval_loss_without_a_dataset_is_none(tiny_lora):
    _, frozen, trainable, _ = tiny_lora

    def never_called(*args):
        raise AssertionError("no dataset, no eval step")

    assert evaluate.eval_loss(never_called, trainable, frozen, None, 4) is None


# ---- prompts_and_answers, format_prompt ----------------------------------------------------------

ALPACA = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Name a colour.", "input": "sky", "output": " The sky is blue. "},
    {"instruction": "What is two plus three?", "output": "It is five."},  # no input field
]


@pytest.mark.parametrize("fields", ["default", "renamed"])
def test_prompts_and_answers_for_alpaca_records(tmp_path, fields):
    records, kw = ALPACA, {}
    if fields == "renamed":
        names = {"instruction": "question", "input": "context", "output": "answer"}
        records = [{names[k]: v for k, v in r.items()} for r in ALPACA]
        kw = {"instruction_field": "question", "input_field": "context", "output_field": "answer"}
    cfg = DataConfig(path=str(_write_jsonl(tmp_path / "eval.jsonl", records)), **kw)
    prompts, answers = evaluate.prompts_and_answers(cfg, limit=10)
    assert prompts == [
        [{"role": "user", "content": "Name a colour."}],
        [{"role": "user", "content": "Name a colour.", "input": "sky"}],
        [{"role": "user", "content": "What is two plus three?"}],
    ]
    # rendered by the run's template (installed on the tokenizer as every run does): the
    # Alpaca prompt the model was trained on, after the BOS this tokenizer adds
    tok = data.install_template(make_tokenizer(), cfg)
    assert [data.render_prompt(tok, p) for p in prompts] == [
        "<s>Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a colour.\n\n### Response:\n",
        "<s>Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName a colour.\n\n### Input:\nsky\n\n### Response:\n",
        "<s>" + data.alpaca_prompt("What is two plus three?"),
    ]
    assert answers == ["Blue.", " The sky is blue. ", "It is five."]  # as written
    assert evaluate.prompts_and_answers(cfg, limit=2) == (prompts[:2], answers[:2])
    assert evaluate.prompts_and_answers(cfg, limit=0) == ([], [])


def test_prompts_and_answers_for_chat_records_end_at_the_last_assistant_turn(tmp_path):
    records = [
        {
            "messages": [
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."},
            ]
        },
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is two plus three?"},
                {"role": "assistant", "content": "It is five."},
                {"role": "user", "content": "And two plus two?"},
                {"role": "assistant", "content": "Four."},
                {"role": "user", "content": "Thanks."},
            ]
        },
    ]
    cfg = DataConfig(path=str(_write_jsonl(tmp_path / "chat.jsonl", records)), format="chat")
    prompts, answers = evaluate.prompts_and_answers(cfg, limit=5)
    assert prompts == [records[0]["messages"][:1], records[1]["messages"][:4]]
    assert [data.render_prompt(make_tokenizer(), p) for p in prompts] == [
        "<s><|user|>\nName a colour.\n<|assistant|>\n",
        "<s><|system|>\nBe brief.\n<|user|>\nWhat is two plus three?\n<|assistant|>\nIt is five."
        "</s>\n<|user|>\nAnd two plus two?\n<|assistant|>\n",
    ]
    assert answers == ["Blue.", "Four."]


def test_prompts_and_answers_refuses_text_records(tmp_path):
    path = _write_jsonl(tmp_path / "text.jsonl", [{"text": "The sky is blue."}])
    cfg = DataConfig(path=str(path), format="text")
    with pytest.raises(ValueError, match="exact match needs question/answer records"):
        evaluate.prompts_and_answers(cfg, limit=1)


def test_prompts_and_answers_names_a_chat_record_without_an_answer(tmp_path):
    records = [{"messages": [{"role": "user", "content": "Name a colour."}]}]
    cfg = DataConfig(path=str(_write_jsonl(tmp_path / "chat.jsonl", records)), format="chat")
    with pytest.raises(data.DataError, match="assistant"):
        evaluate.prompts_and_answers(cfg, limit=1)


@pytest.mark.parametrize(
    "fmt, want",
    [
        (
            "alpaca",
            "<s>Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\nName a colour.\n\n### Response:\n",
        ),
        ("chat", "<s><|user|>\nName a colour.\n<|assistant|>\n"),
        ("text", "Name a colour."),
    ],
)
def test_format_prompt_renders_as_the_training_data(fmt, want):
    cfg = DataConfig(path="unused.jsonl", format=fmt)
    tok = data.install_template(make_tokenizer(), cfg)
    prompt = evaluate.format_prompt(cfg, "Name a colour.")
    assert data.render_prompt(tok, prompt) == want


# ---- exact_match, print_samples (the demo model: a real tokenizer and vocabulary) ----------------


@pytest.fixture(scope="module")
def demo():
    """The demo base, two held-out alpaca prompts and the base's own greedy answers."""
    model = jaxlora.load_model(DEMO / "base")
    # as a run on alpaca data has it (training.run.load_base): the Alpaca chat template
    data.install_template(model.tokenizer, DataConfig(path="unused.jsonl", format="alpaca"))
    records = [json.loads(line) for line in (DEMO / "data" / "eval.jsonl").read_text().splitlines()]
    prompts = [data.alpaca_prompt(r["instruction"], r["input"]) for r in records[:2]]
    return model, prompts, generate(model, prompts, max_new_tokens=NEW_TOKENS)


def test_exact_match_scores_the_models_own_answers_one_and_an_altered_one_zero(demo):
    model, prompts, own = demo
    assert evaluate.exact_match(model, prompts, own, NEW_TOKENS) == (1.0, own)
    # surrounding whitespace does not count; inner text does
    padded = [f"  {a}\n" for a in own]
    assert evaluate.exact_match(model, prompts, padded, NEW_TOKENS)[0] == 1.0
    altered = [own[0], f"not {own[1]}"]
    assert evaluate.exact_match(model, prompts, altered, NEW_TOKENS) == (0.5, own)
    # one prompt a batch: the same answers
    altered = [own[0] + "x", own[1]]
    assert evaluate.exact_match(model, prompts, altered, NEW_TOKENS, batch_size=1) == (0.5, own)


def test_exact_match_of_nothing_is_nan(demo):
    model, _, _ = demo
    score, outs = evaluate.exact_match(model, [], [], NEW_TOKENS)
    assert np.isnan(score) and outs == []


def test_exact_match_needs_one_answer_per_prompt(demo):
    model, prompts, own = demo
    with pytest.raises(ValueError):
        evaluate.exact_match(model, prompts, own[:1], NEW_TOKENS)


def test_print_samples_writes_one_line_per_prompt(demo):
    model, _, _ = demo
    questions = ("In which town does Malmi Galpus live?", "Describe Fivas Runson in one sentence.")
    cfg = Config(
        model=ModelConfig(path=str(DEMO / "base")),
        data=DataConfig(path="unused.jsonl", format="alpaca"),
        train=TrainConfig(sample_prompts=questions, sample_max_new_tokens=NEW_TOKENS),
    )
    lines: list[str] = []
    evaluate.print_samples(model, cfg, lines.append, step=30)
    outs = generate(model, [data.alpaca_prompt(q) for q in questions], max_new_tokens=NEW_TOKENS)
    assert lines == [
        f"[sample @ step 30] {q!r} -> {o!r}" for q, o in zip(questions, outs, strict=True)
    ]


# ---- Report --------------------------------------------------------------------------------------


def _set_b(trainable, scale: float, seed: int):
    """The trainable half with every LoRA B drawn at ``scale`` (what training would move)."""
    rng = np.random.default_rng(seed)
    draw = lambda b: jnp.asarray(scale * rng.normal(size=b.shape), b.dtype)
    return jax.tree.map(
        lambda w: w.replace(b=draw(w.b)) if isinstance(w, lora.LoRAWeight) else w,
        trainable,
        is_leaf=lambda x: isinstance(x, lora.LoRAWeight),
    )


@pytest.fixture(scope="module")
def report_run(demo, tmp_path_factory):
    """A tiny run on the demo base: LoRA at init (B = 0, the base's answers) before, moved B
    after. The held-out file's answers are what the moved model says to the first two
    questions, so its exact match is 1 and the base's is whatever it shares with it."""
    base, _, _ = demo
    tmp = tmp_path_factory.mktemp("report")
    cfg_lora = lora.LoraConfig(r=4, alpha=8, target_modules="all-linear")
    model = base.apply_lora(cfg_lora, key=jax.random.key(0))
    frozen, before = lora.partition(model.params, cfg_lora)
    after = _set_b(before, 0.05, seed=1)

    records = [json.loads(line) for line in (DEMO / "data" / "eval.jsonl").read_text().splitlines()]
    records = records[:3]
    prompts = [data.alpaca_prompt(r["instruction"], r["input"]) for r in records]
    moved = model.replace(params=lora.combine(frozen, after))
    outs_after = generate(moved, prompts[:2], max_new_tokens=NEW_TOKENS)
    outs_before = generate(base, prompts[:2], max_new_tokens=NEW_TOKENS)
    assert outs_after != outs_before  # the move changed at least one answer
    for r, out in zip(records[:2], outs_after, strict=True):
        r["output"] = out
    eval_path = _write_jsonl(tmp / "eval.jsonl", records)

    cfg = Config(
        model=ModelConfig(path=str(DEMO / "base"), dtype="float32", compute_dtype="float32"),
        data=DataConfig(path=str(eval_path), eval_path=str(eval_path), val_size=0, max_seq_len=128),
        train=TrainConfig(exact_match_examples=2, sample_max_new_tokens=NEW_TOKENS, batch_size=2),
        lora=cfg_lora,
        output_dir=str(tmp / "run"),
    )
    (tmp / "run").mkdir()
    examples, _ = data.tokenize(data.load_records(cfg.data), model.tokenizer, cfg.data)
    val_ds = data.PackedDataset.build(examples, 128, True, model.tokenizer.pad_token_id)
    eval_step = jax.jit(make_eval_step(model.module(), lora.combine))
    loss_fn = lambda tr: evaluate.eval_loss(eval_step, tr, frozen, val_ds, 2)
    report = evaluate.Report(cfg, model, frozen, before, loss_fn)
    want = {
        "before": {
            "eval_loss": loss_fn(before),
            "exact_match": float(
                np.mean(
                    [b.strip() == a.strip() for b, a in zip(outs_before, outs_after, strict=True)]
                )
            ),
        },
        "after": {"eval_loss": loss_fn(after), "exact_match": 1.0},
    }
    return cfg, report, before, after, want, prompts[:2], outs_before, outs_after


def test_report_measures_before_and_after_prints_the_table_and_writes_report_json(
    report_run, capsys
):
    cfg, report, _, after, want, prompts, outs_before, outs_after = report_run
    # the held-out questions as conversations, which the run's Alpaca template renders into
    # exactly the prompts the answers were generated from (after the tokenizer's BOS)
    rendered = [data.render_prompt(report.model.tokenizer, p) for p in report.prompts]
    assert rendered == ["<s>" + p for p in prompts] and report.answers == outs_after
    summary = report.finish(after)
    assert summary == want  # per-example outputs stay out of the summary
    assert json.loads((Path(cfg.output_dir) / "report.json").read_text()) == want
    out = capsys.readouterr().out
    b, a = want["before"], want["after"]
    assert "held-out results (2 examples):" in out
    assert f"  {'measure':<12} {'before':>10} {'after':>10}\n" in out
    assert f"  {'eval loss':<12} {b['eval_loss']:>10.4f} {a['eval_loss']:>10.4f}\n" in out
    assert f"  {'exact match':<12} {b['exact_match']:>10.4f} {a['exact_match']:>10.4f}\n" in out
    for p, ref, ob, oa in zip(prompts, outs_after, outs_before, outs_after, strict=True):
        assert (
            f"--- prompt ---\n<s>{p}\n--- reference: {ref!r}\n--- before:    {ob!r}\n"
            f"--- after:     {oa!r}"
        ) in out


def test_report_finish_without_printing_writes_nothing(report_run, capsys):
    cfg, report, _, after, want, *_ = report_run
    (Path(cfg.output_dir) / "report.json").unlink(missing_ok=True)
    assert report.finish(after, print_it=False) == want
    assert capsys.readouterr().out == ""
    assert not (Path(cfg.output_dir) / "report.json").exists()


def test_report_without_held_out_answers_has_only_the_loss_row(tmp_path, capsys):
    cfg = Config(
        model=ModelConfig(path="unused"),
        data=DataConfig(path="unused.jsonl"),
        output_dir=str(tmp_path),
    )
    losses = iter([2.5, 1.25])
    report = evaluate.Report(cfg, None, None, None, loss_fn=lambda tr: next(losses))
    assert report.finish(None) == {"before": {"eval_loss": 2.5}, "after": {"eval_loss": 1.25}}
    out = capsys.readouterr().out
    assert "held-out results (val examples):" in out
    assert f"  {'eval loss':<12} {2.5:>10.4f} {1.25:>10.4f}\n" in out
    assert "exact match" not in out and "--- prompt ---" not in out
    # no validation set at all: a header, no rows, and a report of None
    report = evaluate.Report(cfg, None, None, None, loss_fn=lambda tr: None)
    assert report.finish(None) == {"before": {"eval_loss": None}, "after": {"eval_loss": None}}
    assert "eval loss" not in capsys.readouterr().out


def test_report_exact_match_examples_ignore_the_training_max_examples(report_run, monkeypatch):
    cfg, report, before, *_ = report_run
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_examples=1))
    # which questions are asked is the point here, not the answers
    monkeypatch.setattr(evaluate, "exact_match", lambda m, p, a, n, b: (0.0, [""] * len(p)))
    r = evaluate.Report(cfg, report.model, report.frozen, before, loss_fn=lambda tr: None)
    assert len(r.prompts) == 2
