"""``python -m jaxlora.train`` on the dataset shapes people bring: a ShareGPT file on a base
model without a chat template, rendered with ``data.chat_template=chatml``; the template travels
with the exports, and the run resumes bit-identically after kill -9."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from jaxlora import train
from jaxlora.data.templates import NAMED
from tests.hf_models import make_hf_model
from tests.processes import logged_steps
from tests.test_train_cli import _adapter, _metrics

pytestmark = pytest.mark.xdist_group("train_cli")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Llama whose tokenizer has ChatML's tokens but no chat template (a base model),
    and ShareGPT conversations."""
    from tests._tokenizers import make_tokenizer

    directory = tmp_path_factory.mktemp("sharegpt")
    tok = make_tokenizer(chat_template=False)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    model = directory / "base"
    make_hf_model(
        "llama2_mha",
        model,
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    tok.save_pretrained(model)
    rng = random.Random(0)
    lines = []
    for _ in range(64):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        turns = [("system", "Answer briefly."), ("human", f"What is {a} plus {b}?")]
        turns.append(("gpt", f"It is {a + b}."))
        lines.append(json.dumps({"conversations": [{"from": f, "value": v} for f, v in turns]}))
    (directory / "train.jsonl").write_text("\n".join(lines) + "\n")
    return {"model": model, "train": directory / "train.jsonl"}


def _args(assets, out: Path, *extra: str) -> list[str]:
    return [
        f"model.path={assets['model']}",
        f"data.path={assets['train']}",
        "data.format=sharegpt",
        "data.chat_template=chatml",
        "data.val_size=0",
        "data.eval_path=null",
        "data.max_seq_len=128",
        "train.batch_size=4",
        "train.log_every=1",
        "train.eval_every=0",
        "train.exact_match_examples=0",
        "train.sample_every=0",
        "train.lr=3e-3",
        f"output_dir={out}",
        *extra,
    ]


def _kill_and_resume(argv: list[str], out: Path, after_step: int) -> None:
    """Start ``python -m jaxlora.train argv``, SIGKILL it once it has logged ``after_step``
    (past a checkpoint), then resume the run in this process."""
    cmd = [sys.executable, "-m", "jaxlora.train", *argv]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=Path(__file__).parents[1]
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        done = logged_steps(out)
        if done and max(done) >= after_step:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter").exists(), "the run finished before it was killed"
    assert train.main([*argv, "train.resume=true"]) == 0


@pytest.mark.slow
def test_sharegpt_with_a_named_template_trains_exports_it_and_resumes_after_sigkill(
    assets, tmp_path
):
    common = ["train.max_steps=60", "train.save_every=15"]
    ref = tmp_path / "ref"
    assert train.main(_args(assets, ref, *common)) == 0
    m = _metrics(ref)
    first, last = np.mean([r["loss"] for r in m[:5]]), np.mean([r["loss"] for r in m[-5:]])
    assert last < first - 0.3, (first, last)  # nats: the tiny model learns the answer format

    out = tmp_path / "killed"
    _kill_and_resume(_args(assets, out, *common), out, after_step=20)
    assert [r["step"] for r in _metrics(out)] == list(range(1, 61))  # no gap, no duplicate
    a, b = _adapter(out), _adapter(ref)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    # The base has no template; the adapter carries ChatML (every export writes the run's
    # tokenizer: test_train_cli.py checks merged and bnb4), with its end of turn as EOS, and
    # prompts with the ids training saw before the answer.
    import jaxlora
    from jaxlora import data
    from jaxlora.config import load_config

    assert AutoTokenizer.from_pretrained(str(assets["model"])).chat_template is None
    exported = AutoTokenizer.from_pretrained(str(out / "adapter"))
    assert exported.chat_template == NAMED["chatml"].jinja and exported.eos_token == "<|im_end|>"
    cfg = load_config(str(out / "config.yaml"))
    record = json.loads(assets["train"].read_text().splitlines()[0])
    base_tok = data.install_template(AutoTokenizer.from_pretrained(str(assets["model"])), cfg.data)
    (ex,), _ = data.tokenize([record], base_tok, cfg.data)
    convo = data.conversation(record, cfg.data)
    model = jaxlora.load_model(assets["model"], adapter=out / "adapter")
    prompt = data.encode_prompt(model.tokenizer, convo[:2])  # what jaxlora.generate sends
    assert prompt == ex.tokens[: int(np.argmax(ex.trained))].tolist()
