"""Data pipeline: formats and loss masks, truncation, bad input, packing, splits, iteration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxlora.config import DataConfig
from jaxlora.data import (
    ALPACA_TEMPLATE_NO_INPUT,
    DataError,
    Example,
    PackedDataset,
    alpaca_prompt,
    batches,
    build_datasets,
    load_records,
    split_validation,
    tokenize,
)
from jaxlora.data.packing import pack
from tests._tokenizers import make_tokenizer

ALPACA = [
    {"instruction": "Name a colour.", "input": "sky", "output": "The sky is blue."},
    {"instruction": "What is two plus three?", "output": "It is five."},
    {"instruction": "Count to three.", "input": "", "output": "1 2 3"},
    {"instruction": "Name a city.", "input": None, "output": "Paris is the capital of France."},
    {"instruction": "Say hi.", "input": "politely", "output": "Hello there, friend."},
]
CHATS = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is two plus three?"},
            {"role": "assistant", "content": "five"},
            {"role": "user", "content": "And plus four?"},
            {"role": "assistant", "content": "nine"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "blue"},
        ]
    },
]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _jsonl(path: Path, records: list) -> str:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def _cfg(path: str, **kw) -> DataConfig:
    return DataConfig(path=path, **{"max_seq_len": 251, "val_size": 0, **kw})


def _decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=False)


def test_alpaca_masks_cover_the_response_and_eos(tok, tmp_path):
    cfg = _cfg(_jsonl(tmp_path / "a.jsonl", ALPACA))
    examples, stats = tokenize(load_records(cfg), tok, cfg)
    assert stats.examples == stats.records == len(ALPACA) and stats.truncated == stats.dropped == 0
    for rec, ex in zip(ALPACA, examples, strict=True):
        assert ex.tokens.dtype == np.int32 and ex.trained.dtype == bool
        assert ex.tokens[0] == tok.bos_token_id and ex.tokens[-1] == tok.eos_token_id
        assert _decode(tok, ex.tokens[ex.trained]) == rec["output"] + "</s>"
        # Everything untrained is BOS + the Alpaca prompt (the template with or without input).
        prompt = alpaca_prompt(rec["instruction"], rec.get("input"))
        assert _decode(tok, ex.tokens[~ex.trained]) == "<s>" + prompt
        assert ex.trained[np.argmax(ex.trained) :].all()  # one contiguous trained tail
    assert alpaca_prompt("Do it.", "") == ALPACA_TEMPLATE_NO_INPUT.format(instruction="Do it.")
    assert "### Input:\nsky\n\n### Response:\n" in alpaca_prompt("x", "sky")


def test_train_on_inputs_trains_every_target(tok, tmp_path):
    cfg = _cfg(_jsonl(tmp_path / "a.jsonl", ALPACA), train_on_inputs=True)
    examples, _ = tokenize(load_records(cfg), tok, cfg)
    for ex in examples:
        assert not ex.trained[0] and ex.trained[1:].all()


def test_chat_masks_cover_only_assistant_turns(tok, tmp_path):
    cfg = _cfg(_jsonl(tmp_path / "c.jsonl", CHATS), format="chat")
    examples, _ = tokenize(load_records(cfg), tok, cfg)
    for rec, ex in zip(CHATS, examples, strict=True):
        msgs = rec["messages"]
        assert _decode(tok, ex.tokens) == tok.apply_chat_template(msgs, tokenize=False)
        # Each assistant turn trains its content and the template's end of turn ("</s>\n").
        want = "".join(m["content"] + "</s>\n" for m in msgs if m["role"] == "assistant")
        assert _decode(tok, ex.tokens[ex.trained]) == want
        untrained = _decode(tok, ex.tokens[~ex.trained])
        for m in msgs:
            assert (m["content"] in untrained) == (m["role"] != "assistant")
    cfg = _cfg(cfg.path, format="chat", train_on_inputs=True)
    examples, _ = tokenize(load_records(cfg), tok, cfg)
    assert all(ex.trained[1:].all() for ex in examples)


def test_chat_needs_a_chat_template(tmp_path):
    cfg = _cfg(_jsonl(tmp_path / "c.jsonl", CHATS), format="chat")
    with pytest.raises(DataError, match="no chat_template"):
        tokenize(load_records(cfg), make_tokenizer(chat_template=False), cfg)


def test_text_format_trains_everything_and_appends_eos(tok, tmp_path):
    texts = ["The quick brown fox.", "Paris is the capital of France. It is big."]
    cfg = _cfg(_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts]), format="text")
    examples, _ = tokenize(load_records(cfg), tok, cfg)
    for text, ex in zip(texts, examples, strict=True):
        assert _decode(tok, ex.tokens) == "<s>" + text + "</s>"
        assert not ex.trained[0] and ex.trained[1:].all()


def test_custom_field_names_and_csv_and_parquet(tok, tmp_path):
    import pandas as pd

    frame = pd.DataFrame(
        {"q": [r["instruction"] for r in ALPACA], "a": [r["output"] for r in ALPACA]}
    )
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        cfg = _cfg(str(tmp_path / name), instruction_field="q", output_field="a")
        examples, _ = tokenize(load_records(cfg), tok, cfg)
        assert [_decode(tok, ex.tokens[ex.trained]) for ex in examples] == [
            r["output"] + "</s>" for r in ALPACA
        ]
    with pytest.raises(DataError, match=r"d.csv: record 1: missing field \"instruction\""):
        load_records(_cfg(str(tmp_path / "d.csv")))


def test_csv_columns_are_read_as_the_text_they_hold(tok, tmp_path):
    """pandas would read an all-digit answer column as int64 and "NA" / "None" as missing."""
    path = tmp_path / "math.csv"
    path.write_text(
        'instruction,input,output\nAdd 2 and 3.,,5\nSay NA.,,NA\n"Say ""None"".",x,None\n'
    )
    cfg = _cfg(str(path))
    records = load_records(cfg)
    assert [r["output"] for r in records] == ["5", "NA", "None"]
    assert [r["input"] for r in records] == ["", "", "x"]
    examples, _ = tokenize(records, tok, cfg)
    assert [_decode(tok, ex.tokens[ex.trained]) for ex in examples] == [
        "5</s>",
        "NA</s>",
        "None</s>",
    ]
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"empty\.csv: the file holds no records"):
        load_records(_cfg(str(tmp_path / "empty.csv")))


def test_json_lines_end_at_newline_only(tmp_path):
    """U+2028, U+2029 and U+0085 may stand raw inside a JSON string (json.dumps with
    ensure_ascii=False writes them so); they do not end a line, and line numbers count \\n."""
    recs = [{"text": "a\u2028b"}, {"text": "c\x85d\u2029"}, {"txt": "no"}]
    path = tmp_path / "raw.jsonl"
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in recs), newline="")
    with pytest.raises(DataError, match=r'raw\.jsonl:3: missing field "text"'):
        load_records(_cfg(str(path), format="text"))
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs[:2]))
    assert [r["text"] for r in load_records(_cfg(str(path), format="text"))] == [
        "a\u2028b",
        "c\x85d\u2029",
    ]


@pytest.mark.parametrize(
    "lines, fmt, message",
    [
        (
            ['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": "b"'],
            "alpaca",
            r":2: invalid JSON",
        ),
        (
            ['{"instruction": "a", "output": "b"}', "", '{"instruction": "a"}'],
            "alpaca",
            r':3: missing field "output"',
        ),
        (['["not", "an", "object"]'], "alpaca", r":1: expected a JSON object, got list"),
        (
            ['{"instruction": 3, "output": "b"}'],
            "alpaca",
            r':1: field "instruction" must be a string, got int',
        ),
        (
            ['{"instruction": "a", "input": 1, "output": "b"}'],
            "alpaca",
            r':1: field "input" must be a string',
        ),
        (['{"text": "ok"}', '{"txt": "no"}'], "text", r':2: missing field "text"'),
        (['{"messages": []}'], "chat", r':1: field "messages" must be a non-empty list'),
        (
            ['{"messages": [{"role": "user"}]}'],
            "chat",
            r':1: messages\[0\] must have a string "content"',
        ),
        (
            ['{"messages": [{"content": "x"}]}'],
            "chat",
            r':1: messages\[0\] must be an object with a string "role"',
        ),
    ],
)
def test_malformed_lines_are_reported_as_file_and_line(tmp_path, lines, fmt, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl" + message):
        load_records(_cfg(str(path), format=fmt))


def test_json_array_files_and_directories(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ALPACA[:3], indent=1))
    assert len(load_records(_cfg(str(tmp_path / "a.json")))) == 3
    (tmp_path / "d").mkdir()
    _jsonl(tmp_path / "d" / "part1.jsonl", ALPACA[:2])
    _jsonl(tmp_path / "d" / "part2.jsonl", ALPACA[2:])
    assert len(load_records(_cfg(str(tmp_path / "d")))) == len(ALPACA)
    assert len(load_records(_cfg(str(tmp_path / "d"), max_examples=3))) == 3
    _jsonl(tmp_path / "d" / "part3.jsonl", [{"instruction": "x"}])
    with pytest.raises(DataError, match=r'part3\.jsonl:1: missing field "output"'):
        load_records(_cfg(str(tmp_path / "d")))
    (tmp_path / "b.json").write_text(json.dumps([ALPACA[0], {"output": "y"}]))
    with pytest.raises(DataError, match=r'b\.json: record 2: missing field "instruction"'):
        load_records(_cfg(str(tmp_path / "b.json")))


def test_empty_and_missing_data_stop_early(tok, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: the file holds no records"):
        load_records(_cfg(str(tmp_path / "empty.jsonl")))
    with pytest.raises(DataError, match="does not exist"):
        load_records(_cfg(str(tmp_path / "nope.jsonl")))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        load_records(_cfg(str(tmp_path / "d.txt")))


def test_truncation_from_the_right_and_dropping(tok, tmp_path):
    long = {"instruction": "Name a colour.", "output": " ".join(["blue"] * 80)}
    huge_prompt = {"instruction": " ".join(["colour"] * 300), "output": "blue"}
    path = _jsonl(tmp_path / "a.jsonl", [ALPACA[0], long, huge_prompt])
    full, _ = tokenize([ALPACA[0], long], tok, _cfg(path, max_seq_len=9999))
    seq_len = len(full[0].tokens) + 7  # the first fits whole; `long` and `huge_prompt` do not
    assert len(full[1].tokens) > seq_len + 1
    cfg = _cfg(path, max_seq_len=seq_len)
    examples, stats = tokenize(load_records(cfg), tok, cfg)
    assert (stats.records, stats.examples, stats.truncated, stats.dropped) == (3, 2, 2, 1)
    np.testing.assert_array_equal(examples[0].tokens, full[0].tokens)
    assert len(examples[1].tokens) == seq_len + 1 and examples[1].length == seq_len
    np.testing.assert_array_equal(examples[1].tokens, full[1].tokens[: seq_len + 1])  # cut right
    np.testing.assert_array_equal(examples[1].trained, full[1].trained[: seq_len + 1])
    assert examples[1].trained.any() and examples[1].tokens[-1] != tok.eos_token_id
    with pytest.raises(DataError, match=rf"none of the 1 examples .*max_seq_len={seq_len}"):
        tokenize([huge_prompt], tok, cfg)


def _random_examples(rng, n, lo=2, hi=40, vocab=97) -> list[Example]:
    out = []
    for _ in range(n):
        size = int(rng.integers(lo, hi + 1))
        trained = rng.random(size) < 0.6
        trained[0], trained[-1] = False, True
        out.append(Example(rng.integers(1, vocab, size).astype(np.int32), trained))
    return out


def test_pack_is_a_partition_into_rows_that_fit():
    rng = np.random.default_rng(3)
    lengths = [int(x) for x in rng.integers(1, 38, 101)]
    rows = pack(lengths, 37)
    assert sorted(i for row in rows for i in row) == list(range(101))
    assert all(sum(lengths[i] for i in row) <= 37 for row in rows)
    assert len(rows) < 101 and len(rows) >= sum(lengths) / 37
    assert pack(lengths, 37) == rows  # deterministic
    with pytest.raises(ValueError, match="fills 38 positions"):
        pack([3, 38], 37)


@pytest.mark.parametrize("packing", [True, False])
def test_batch_layout_segments_positions_and_targets(packing):
    rng = np.random.default_rng(7)
    examples = _random_examples(rng, 23)
    ds = PackedDataset.build(examples, 41, packing, pad_id=0)
    b = ds.batch(list(range(len(ds))))
    assert {k: (v.dtype, v.shape) for k, v in b.items()} == {
        "input_ids": (np.int32, (len(ds), 41)),
        "targets": (np.int32, (len(ds), 41)),
        "loss_mask": (np.float32, (len(ds), 41)),
        "segment_ids": (np.int32, (len(ds), 41)),
        "positions": (np.int32, (len(ds), 41)),
    }
    seen = []
    for r, row in enumerate(ds.rows):
        seg, pos = b["segment_ids"][r], b["positions"][r]
        assert packing or len(row) == 1
        t = 0
        for k, i in enumerate(row, start=1):  # each example whole, in one segment
            ex, n = examples[i], examples[i].length
            np.testing.assert_array_equal(seg[t : t + n], k)
            np.testing.assert_array_equal(pos[t : t + n], np.arange(n))
            np.testing.assert_array_equal(b["input_ids"][r, t : t + n], ex.tokens[:-1])
            np.testing.assert_array_equal(b["targets"][r, t : t + n], ex.tokens[1:])
            np.testing.assert_array_equal(b["loss_mask"][r, t : t + n], ex.trained[1:])
            seen.append(i)
            t += n
        assert (seg[t:] == 0).all() and (b["loss_mask"][r, t:] == 0).all() and (pos[t:] == 0).all()
        # Inside a segment the target is the next input; the segment's last target is its EOS.
        same = (seg[:-1] == seg[1:]) & (seg[:-1] > 0)
        np.testing.assert_array_equal(b["targets"][r, :-1][same], b["input_ids"][r, 1:][same])
    assert sorted(seen) == list(range(23))
    assert (
        b["loss_mask"].sum()
        == sum(ex.trained[1:].sum() for ex in examples)
        == ds.num_trained_tokens
    )
    if packing:
        assert len(ds) < 23
        assert (b["segment_ids"].max(axis=1) > 1).any()


def test_validation_split_sizes_and_determinism():
    examples = _random_examples(np.random.default_rng(0), 41)
    for val_size, n_val in [(0.1, 4), (0.01, 1), (7, 7), (0, 0)]:
        train, val = split_validation(examples, val_size, seed=5)
        assert (len(train), len(val)) == (41 - n_val, n_val)
        assert {id(e) for e in train} | {id(e) for e in val} == {id(e) for e in examples}
    a = split_validation(examples, 9, seed=5)[1]
    assert [id(e) for e in a] == [id(e) for e in split_validation(examples, 9, seed=5)[1]]
    assert [id(e) for e in a] != [id(e) for e in split_validation(examples, 9, seed=6)[1]]
    with pytest.raises(DataError, match="val_size=41 takes 41 of 41"):
        split_validation(examples, 41, seed=0)


def _dataset(n=29, seq_len=13) -> PackedDataset:
    rng = np.random.default_rng(11)
    return PackedDataset.build(
        _random_examples(rng, n, lo=2, hi=seq_len + 1), seq_len, packing=False
    )


def _take(it, k):
    return [next(it) for _ in range(k)]


def _assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_iterator_is_deterministic_and_shuffles_per_epoch():
    ds = _dataset()
    it = batches(ds, 6, seed=1)
    assert it.steps_per_epoch == 4  # 29 rows: 4 full batches of 6, the rest dropped
    first = _take(it, 8)
    _assert_batches_equal(first, _take(batches(ds, 6, seed=1), 8))
    assert it.epoch == 1 and it.index == 4
    other = _take(batches(ds, 6, seed=2), 1)[0]
    assert not np.array_equal(first[0]["input_ids"], other["input_ids"])
    assert not np.array_equal(first[0]["input_ids"], first[4]["input_ids"])  # a new order


def test_iterator_state_restore_resumes_exactly():
    ds = _dataset()
    reference = _take(batches(ds, 5, seed=3), 13)  # crosses epochs (5 steps each)
    it = batches(ds, 5, seed=3)
    _take(it, 7)
    state = json.loads(json.dumps(it.state()))  # survives a JSON round trip (checkpoint metadata)
    resumed = batches(ds, 5, seed=3)
    resumed.restore(state)
    _assert_batches_equal(_take(resumed, 6), reference[7:])
    with pytest.raises(DataError, match="seed=3, this run has 4"):
        batches(ds, 5, seed=4).restore(state)
    with pytest.raises(DataError, match="batch_size=5, this run has 6"):
        batches(ds, 6, seed=3).restore(state)


def test_process_sharding_partitions_the_global_batch():
    ds = _dataset()
    whole = _take(batches(ds, 6, seed=9), 6)
    parts = [_take(batches(ds, 6, seed=9, process_index=p, process_count=3), 6) for p in range(3)]
    for step, full in enumerate(whole):
        for key in full:
            assert parts[0][step][key].shape[0] == 2
            joined = np.concatenate([parts[p][step][key] for p in range(3)])
            np.testing.assert_array_equal(joined, full[key])
    with pytest.raises(DataError, match="does not split over 4 processes"):
        batches(ds, 6, process_count=4)


def test_eval_iteration_covers_every_row_once():
    ds = _dataset()
    out = list(batches(ds, 6, shuffle=False, drop_last=False, repeat=False))
    assert len(out) == 5
    ids = np.concatenate([b["input_ids"] for b in out])
    np.testing.assert_array_equal(ids[:29], ds.batch(list(range(29)))["input_ids"])
    assert (np.concatenate([b["loss_mask"] for b in out])[29:] == 0).all()  # empty filler rows
    with pytest.raises(DataError, match="not one full batch of 30"):
        batches(ds, 30)


def test_build_datasets_end_to_end(tok, tmp_path):
    records = [dict(r, output=f"{r['output']} {k}") for k, r in enumerate(ALPACA * 5)]
    cfg = _cfg(_jsonl(tmp_path / "a.jsonl", records), val_size=0.2, max_seq_len=255)
    train, val = build_datasets(cfg, tok, seed=0)
    assert len(train.examples) == 20 and len(val.examples) == 5
    assert len(train) < 20  # packed
    batch = next(batches(train, 2, seed=0))
    assert batch["input_ids"].shape == (2, 255) and batch["loss_mask"].sum() > 0
    again, _ = build_datasets(cfg, tok, seed=0)
    assert [e.tokens.tolist() for e in again.examples] == [
        e.tokens.tolist() for e in train.examples
    ]
    assert build_datasets(_cfg(cfg.path, val_size=0), tok, seed=0)[1] is None
    held_out = _jsonl(tmp_path / "eval.jsonl", ALPACA[:3])
    train, val = build_datasets(_cfg(cfg.path, eval_path=held_out, max_examples=11), tok, seed=0)
    assert len(train.examples) == 11 and len(val.examples) == 3  # max_examples: training only
    want = [r["output"] + "</s>" for r in ALPACA[:3]]
    assert [_decode(tok, e.tokens[e.trained]) for e in val.examples] == want
