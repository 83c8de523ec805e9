"""The CLI-against-PEFT benchmark (tools/bench_cli.py): its first-step check, its refusals, and
one end-to-end run on the tiny shape (3 steps, 1 round)."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tools import bench_cli

ROOT = Path(__file__).resolve().parents[1]


def bench(*args: str, cache: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tools" / "bench_cli.py"), *args, "--cache-dir", str(cache)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def records(losses=(7.5, 7.1, 6.9), tokens=(950, 925, 891), trained=(82, 109, 97)):
    """Three steps' metrics lines as the CLI writes them (step 1: compile_time)."""
    out = []
    for i, (loss, tok, tr) in enumerate(zip(losses, tokens, trained, strict=True), start=1):
        rec = {"step": i, "loss": loss, "lr": 4e-3, "grad_norm": 7.0, "tokens": tok}
        rec["trained_tokens"] = tr
        rec |= {"compile_time": 9.0} if i == 1 else {"step_time": 0.1, "tokens_per_sec": tok / 0.1}
        out.append(rec)
    return out


def test_loss_bound_is_the_derived_float32_bound():
    # 2 × 1e-4 (logits) + 1e-5 (log-softmax) + 2 × (n + 1) × 2^-24 × loss
    assert bench_cli.loss_bound(8.0, 99) == pytest.approx(2.1e-4 + 200 * 8.0 / 2**24, rel=1e-12)
    assert bench_cli.loss_bound(-8.0, 99) == bench_cli.loss_bound(8.0, 99)


def test_agreement_accepts_rounding_and_refuses_other_batches_or_models():
    ours = records()
    bound = bench_cli.loss_bound(7.5, 82)
    ref = copy.deepcopy(ours)
    ref[0]["loss"] += 0.5 * bound
    ok = bench_cli.agreement(ours, ref)
    assert ok["ok"] and ok["differences"] == []
    assert ok["loss"]["bound"] == bench_cli.loss_bound(ref[0]["loss"], 82)

    ref[0]["loss"] = 7.5 + 2 * bound  # another model or another batch, same counts
    assert not bench_cli.agreement(ours, ref)["ok"]

    ref = copy.deepcopy(ours)
    ref[1]["trained_tokens"] += 1  # another batch at step 2, same first step
    check = bench_cli.agreement(ours, ref)
    assert not check["ok"] and check["differences"] == ["step 2 trained_tokens: 109 vs 110"]

    ref = copy.deepcopy(ours)
    ref[2]["lr"] = 2e-3  # another schedule
    assert "step 3 lr: 0.004 vs 0.002" in bench_cli.agreement(ours, ref)["differences"]
    assert not bench_cli.agreement(ours, ref[:2])["ok"]  # a step on one side only


def test_window_is_read_from_the_metrics_lines():
    run = {"records": records(), "cpu_at": {1: 10.0, 2: 10.3, 3: 10.5}, "peak_rss": 2**30}
    r = bench_cli.round_result(run, 2, 3, {"xla": "default"})
    assert r["tokens_per_s"] == pytest.approx((9250 + 8910) / 2)
    assert r["step_times"] == [0.1, 0.1] and r["first_step_s"] == 9.0
    assert r["cpu_s"] == pytest.approx(0.5)  # from step 1's line to step 3's
    assert r["losses"] == [7.5, 7.1, 6.9]
    del run["cpu_at"][3]
    with pytest.raises(RuntimeError, match="CPU time was not read at steps 1 and 3"):
        bench_cli.round_result(run, 2, 3, {})


@pytest.mark.parametrize(
    "args, message",
    [
        (["lora.dropout=0.1", "train.optimizer=lion"], "lora.dropout must be 0"),
        (["quant.type=nf4"], "quant.type must be none for --mode lora"),
        (["lora.dropot=0.1"], "did you mean 'lora.dropout'"),
    ],
)
def test_settings_the_reference_cannot_share_are_refused_before_anything_runs(
    tmp_path, capsys, args, message
):
    assert bench_cli.main(["--shape", "tiny", *args, "--cache-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no checkpoint built, nothing run


def test_keys_the_harness_owns_are_refused():
    with pytest.raises(SystemExit):
        bench_cli.parse_args(["--shape", "tiny", "train.max_steps=3"])
    with pytest.raises(SystemExit):
        bench_cli.parse_args(["--shape", "tiny", "--window", "1-3"])  # step 1 compiles


@pytest.mark.slow
def test_end_to_end_tiny_run(tmp_path):
    out = tmp_path / "r.json"
    cache = tmp_path / "cache"
    proc = bench(
        "--shape", "tiny", "--rounds", "1", "--window", "2-3", "--out", str(out), cache=cache
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert set(r["sides"]) == {"jaxlora CLI", "PEFT"}
    check = r["agreement"]
    assert check["ok"] and check["differences"] == []
    loss = check["loss"]
    assert math.isfinite(loss["jaxlora"]) and loss["jaxlora"] > 1.0  # a real cross-entropy
    assert abs(loss["jaxlora"] - loss["peft"]) <= loss["bound"] < 1e-3
    for side in r["sides"].values():
        (one,) = side["rounds"]
        assert len(one["step_times"]) == 2 and len(one["losses"]) == 3
        assert [x["step"] for x in one["records"]] == [1, 2, 3, 4]  # window + one more step
        assert one["cpu_s"] > 0 and one["peak_memory"] > 2**20
        assert side["tokens_per_s"]["median"] > 0
    # the reference trained on the CLI's batches: the same real tokens at every step
    cli, ref = (r["sides"][s]["rounds"][0]["records"] for s in ("jaxlora CLI", "PEFT"))
    assert [x["tokens"] for x in cli] == [x["tokens"] for x in ref]
    assert "| tokens/s, median (min–max over rounds) |" in proc.stdout
    assert "jaxlora / PEFT" in proc.stdout and "first-step loss: jaxlora" in proc.stdout
