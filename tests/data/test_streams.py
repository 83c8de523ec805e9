"""Streams and mixtures: the sampler's weights and determinism, the held-out records, and a
position that resumes exactly (jaxlora.data.streams). The CLI runs are in test_train_cli.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

from jaxlora.config import ConfigError, DataConfig, load_config
from jaxlora.data import DataError, MixtureSampler, batches, build_datasets, held_out
from jaxlora.data.streams import BLOCK
from tests._tokenizers import make_tokenizer

N_RECORDS = 18  # alpaca records; 12 text records: a few batches cross epochs of each


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Parquet shards of alpaca records (3 shards) and a JSON Lines file of text records; each
    record says which one it is, so tests can tell where an example came from."""
    d = tmp_path_factory.mktemp("streams")
    alpaca = [
        {"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i % 7)))}
        for i in range(N_RECORDS)
    ]
    shards = d / "shards"
    shards.mkdir()
    for s in range(3):
        Dataset.from_list(alpaca[s::3]).to_parquet(shards / f"part-{s}.parquet")
    texts = d / "texts.jsonl"
    texts.write_text(
        "".join(json.dumps({"body": f"text {i} " + "fox " * (i % 5)}) + "\n" for i in range(12))
    )
    return {"shards": shards, "texts": texts}


def _mixture(files, **kw) -> DataConfig:
    sources = [
        {"path": str(files["shards"]), "weight": 2},
        {"path": str(files["texts"]), "weight": 1, "format": "text", "text_field": "body"},
    ]
    return DataConfig(sources=sources, max_seq_len=256, shuffle_buffer=8, **kw)


# ---- the sampler ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampler_realizes_the_weights_within_a_binomial_bound(seed):
    weights, n = [3.0, 1.0, 0.5], 20_000
    p = np.asarray(weights) / sum(weights)
    sampler = MixtureSampler(weights, seed)
    counts = np.bincount([next(sampler) for _ in range(n)], minlength=len(p))
    # Each count is Binomial(n, p_i) when the draws are i.i.d. with probabilities p, so
    # |count - n p_i| > 5 sigma_i has probability < 6e-7: a correct sampler passes for any seed.
    # A wrong one does not: weights ignored (uniform) or an off-by-one bucket moves >= 3,000 draws
    # of a source, where 5 sigma is at most 333.
    sigma = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) <= 5 * sigma), (counts, n * p, sigma)


def test_sampler_is_deterministic_by_seed_and_resumes_across_a_block():
    draw = lambda s, k: [next(s) for _ in range(k)]
    a, b = draw(MixtureSampler([1, 1], 7), 2 * BLOCK), draw(MixtureSampler([1, 1], 7), 2 * BLOCK)
    assert a == b
    assert a != draw(MixtureSampler([1, 1], 8), 2 * BLOCK)
    resumed = MixtureSampler([1, 1], 7, draws=BLOCK - 3)  # continues into the next block
    assert draw(resumed, 10) == a[BLOCK - 3 : BLOCK + 7]


# ---- a stream's position ----------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "loaded"])
def test_resumed_stream_gives_the_batches_of_an_uninterrupted_one(files, tok, streaming):
    """A 2-source mixture (streamed parquet shards and a text file, or both loaded whole),
    packed with carry-over; stopped after 3 batches, its JSON state restored into a fresh
    stream, the next batches equal the uninterrupted run's, across epochs of both sources."""
    cfg = _mixture(files, streaming=streaming, val_size=2)
    stream, _ = build_datasets(cfg, tok, seed=5)
    it = stream.batches(4)
    ref = [next(it) for _ in range(8)]
    assert all(s.epoch >= 1 for s in stream.sources), "the batches should cross an epoch"

    first, _ = build_datasets(cfg, tok, seed=5)
    it = first.batches(4)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.state()))  # as a checkpoint's metadata holds it
    assert state["carry"], "packing should carry an example over into the next batch"
    again, _ = build_datasets(cfg, tok, seed=5)
    resumed = again.batches(4)
    resumed.restore(state)
    for want in ref[3:]:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # the position, the realized counts per source included, continues from the checkpoint
    assert resumed.state() == json.loads(json.dumps(_advance(it, 5).state()))


def _advance(it, n):
    for _ in range(n):
        next(it)
    return it


def test_state_from_other_data_or_batching_is_refused(files, tok):
    stream, _ = build_datasets(_mixture(files, streaming=True, val_size=0), tok, seed=0)
    state = stream.batches(4).state()
    with pytest.raises(ValueError, match="batch_size=4, this run has 2"):
        stream.batches(2).restore(state)
    with pytest.raises(ValueError, match="read its data whole"):
        stream.batches(4).restore({"epoch": 0, "index": 3, "seed": 0})


def test_held_out_records_are_never_trained_and_max_examples_is_honoured(files, tok):
    """Streamed with data.max_examples=10 and data.val_size=2: the first 2 records are the
    validation set, and an epoch of training reads exactly the other 8."""
    cfg = DataConfig(
        path=str(files["texts"]),
        format="text",
        text_field="body",
        streaming=True,
        max_examples=10,
        val_size=2,
    )
    stream, val = build_datasets(cfg, tok, seed=0)
    (source,) = stream.sources
    held = [r["body"] for r in source.held_out]
    trained = [r["body"] for r in source._epoch_records(0, 0)]
    assert held == ["text 0 ", "text 1 fox "]
    assert sorted(trained, key=lambda t: int(t.split()[1])) == [
        "text " + str(i) + " " + "fox " * (i % 5) for i in range(2, 10)
    ]
    assert trained != sorted(trained), "the buffer shuffle should reorder the epoch"
    assert len(val.examples) == 2


def test_stream_config_errors_name_the_key_and_the_choices():
    base = ["data.eval_path=null", "train.exact_match_examples=0"]
    cases = {
        "data.val_size: a fraction (0.1)": [*base, "data.streaming=true", "data.val_size=0.1"],
        "train.max_steps: a streamed dataset": [*base, "data.streaming=true", "train.max_steps=-1"],
        "data.sources[1]: weight: must be > 0": [
            *base,
            "data.path=null",
            "data.sources=[{path: a.jsonl, weight: 1}, {path: b.jsonl, weight: 0}]",
        ],
        "data.sources[0]: unknown key 'wieght'; did you mean 'weight'?": [
            *base,
            "data.path=null",
            "data.sources=[{path: a.jsonl, wieght: 1}]",
        ],
        "data.sources[0]: format: must be one of alpaca, chat, sharegpt, text": [
            *base,
            "data.path=null",
            "data.sources=[{path: a.jsonl, weight: 1, format: txt}]",
        ],
        "give data.path or data.sources, not both": ["data.sources=[{path: a.jsonl, weight: 1}]"],
    }
    for needle, overrides in cases.items():
        with pytest.raises(ConfigError, match=re.escape(needle)):
            load_config("demo", overrides)


def test_subset_and_split_reach_load_dataset(tmp_path, tok):
    """A local dataset directory with two configurations (declared in its README.md, as on the
    hub) stands in for a hub id: data.subset and data.split choose which files stream."""
    for subset in ("easy", "hard"):
        for split in ("train", "test"):
            (tmp_path / subset).mkdir(exist_ok=True)
            rows = [{"text": f"{subset} {split} {i}"} for i in range(3)]
            Dataset.from_list(rows).to_parquet(tmp_path / subset / f"{split}.parquet")
    configs = "".join(
        f"- config_name: {c}\n  data_files:\n"
        + "".join(f"  - split: {s}\n    path: {c}/{s}.parquet\n" for s in ("train", "test"))
        for c in ("easy", "hard")
    )
    (tmp_path / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    cfg = DataConfig(
        path=str(tmp_path),
        format="text",
        subset="hard",
        split="test",
        streaming=True,
        shuffle_buffer=0,
        val_size=0,
    )
    stream, _ = build_datasets(cfg, tok, seed=0)
    (source,) = stream.sources
    assert [r["text"] for r in source._epoch_records(0, 0)] == [f"hard test {i}" for i in range(3)]


def test_a_source_with_nothing_to_train_on_is_an_error_not_an_endless_read(files, tok):
    """max_seq_len=8 cuts every Alpaca example inside its prompt: no trained token is left."""
    # shuffle_buffer=0: datasets sleeps 5 s after a pass over shuffled parquet shards (arrow#45214)
    cfg = DataConfig(
        path=str(files["shards"]), streaming=True, max_seq_len=8, val_size=0, shuffle_buffer=0
    )
    stream, _ = build_datasets(cfg, tok, seed=0)
    with pytest.raises(ValueError, match="none of its 18 training records has a token to train"):
        next(stream.batches(1))


def test_a_streamed_position_is_refused_by_a_loaded_run(files, tok):
    stream, _ = build_datasets(_mixture(files, streaming=True, val_size=0), tok, seed=0)
    state = stream.batches(2).state()
    loaded, _ = build_datasets(
        DataConfig(path=str(files["texts"]), format="text", text_field="body", val_size=0),
        tok,
        seed=0,
    )
    with pytest.raises(ValueError, match="position is of a streamed run"):
        batches(loaded, 1).restore(state)


def test_a_stream_reads_nothing_before_training_asks(files, tok, tmp_path):
    """Building the stream reads no training record (only the held-out first ones): a bad
    record far in the file surfaces when the stream reaches it, named by its position."""
    lines = files["texts"].read_text().splitlines() + ['{"title": "no body"}']
    path = tmp_path / "late_error.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(
        path=str(path),
        format="text",
        text_field="body",
        streaming=True,
        val_size=1,
        shuffle_buffer=0,
    )
    stream, _ = build_datasets(cfg, tok, seed=0)
    (source,) = stream.sources
    assert source.read == 0
    it = stream.batches(1)
    with pytest.raises(ValueError, match='record 12 of epoch 0 .*"body" must be a string'):
        for _ in range(12):
            next(it)
    # A line that is not JSON at all: pyarrow's error, with the file and the position
    path.write_text("\n".join([*lines[:-1], '{"body": "unterminated']) + "\n")
    with pytest.raises(DataError, match=r"late_error\.jsonl: reading the 1 held-out .*row 12"):
        build_datasets(cfg, tok, seed=0)  # the first block holds the whole file
    held_out_elsewhere = dataclasses.replace(cfg, val_size=0, eval_path=str(files["texts"]))
    stream, _ = build_datasets(held_out_elsewhere, tok, seed=0)
    with pytest.raises(DataError, match=r"late_error\.jsonl: reading record 1 of epoch 0 .*row"):
        next(stream.batches(1))


def test_the_expected_mixture_is_logged_per_source(files, tok, caplog):
    """Weights 2:1 give 66.7 % / 33.3 % of the examples; the Alpaca records are far longer than
    the text ones, so their share of the tokens is larger than their share of the examples."""
    stream, _ = build_datasets(_mixture(files, val_size=0), tok, seed=0)
    # Only what log_plan says: build_datasets logs too when an earlier test in this worker left
    # jaxlora's loggers at INFO (the train CLI, run in-process, does).
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jaxlora.data.streams"):
        stream.log_plan(rows=40)
    shards, texts = (r.getMessage() for r in caplog.records)
    assert str(files["shards"]) in shards and "66.7% of examples" in shards
    assert str(files["texts"]) in texts and "33.3% of examples" in texts
    share = [float(re.search(r"([\d.]+)% of positions", m)[1]) for m in (shards, texts)]
    assert abs(sum(share) - 100) <= 0.1 and share[0] > 66.7


# ---- the parts of the run's data: each source, the held-out file -----------------------------


def test_the_held_out_file_is_read_whole_whatever_the_training_data_selects(files, tok, tmp_path):
    """``data.split`` / ``data.subset`` / ``data.max_examples`` / ``data.sources`` choose
    training records; the ``data.eval_path`` file (local: its only split is ``train``) is read
    whole in ``data.format``: a sliced split no longer cuts it, and a mixture's copy of the
    config for it holds no sources."""
    texts = tmp_path / "held.jsonl"
    texts.write_text("".join(json.dumps({"body": f"held {i} fox"}) + "\n" for i in range(6)))
    common = dict(format="text", text_field="body", val_size=0, eval_path=str(texts))
    for split in ("train[:50%]", "train"):
        cfg = DataConfig(path=str(files["texts"]), split=split, max_examples=4, **common)
        _, val = build_datasets(cfg, tok, seed=0)
        assert len(val.examples) == 6, split
    alpaca = tmp_path / "held_alpaca.jsonl"
    rows = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(5)]
    alpaca.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mixture = _mixture(files, val_size=0, eval_path=str(alpaca), split="train[:50%]")
    _, val = build_datasets(mixture, tok, seed=0)
    assert len(val.examples) == 5
    assert held_out(mixture).sources == () and held_out(mixture).split == "train"


def test_a_chat_template_serves_the_chat_sources_of_a_mixture(files, tok, tmp_path):
    """``data.chat_template`` with an alpaca source beside a chat one (what a base tokenizer
    needs to train on both): each source's config keeps the template only if it renders
    conversations, so neither the alpaca source nor the held-out alpaca file refuses it."""
    chat = tmp_path / "chat.jsonl"
    convo = lambda i: {
        "messages": [
            {"role": "user", "content": f"Hi {i}"},
            {"role": "assistant", "content": f"Hello {i}"},
        ]
    }
    chat.write_text("".join(json.dumps(convo(i)) + "\n" for i in range(8)))
    held = tmp_path / "held_alpaca.jsonl"
    held.write_text(json.dumps({"instruction": "Say 1.", "input": "", "output": "1"}) + "\n")
    sources = [
        {"path": str(files["shards"]), "weight": 1},
        {"path": str(chat), "weight": 1, "format": "chat"},
    ]
    cfg = DataConfig(
        sources=sources,
        chat_template="chatml",
        max_seq_len=256,
        shuffle_buffer=0,
        val_size=0,
        eval_path=str(held),
    )
    stream, val = build_datasets(cfg, tok, seed=0)
    assert [s.cfg.chat_template for s in stream.sources] == [None, "chatml"]
    assert len(val.examples) == 1
    rows = next(stream.batches(4))
    assert rows["input_ids"].shape[0] == 4
