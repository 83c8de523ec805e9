"""The training-health warnings fire on the patterns they describe, and only then."""

from __future__ import annotations

import json

import pytest

from jaxlora.config import ConfigError
from jaxlora.training import monitor
from jaxlora.training.checkpoint import ResumeError
from jaxlora.training.monitor import Monitor


def _feed(monitor, rows):
    for r in rows:
        monitor.log(r)


def test_grad_norm_spike_warns_with_advice(tmp_path):
    m = Monitor(tmp_path, total_steps=40, enabled=False)
    _feed(m, [{"step": s, "loss": 2.0, "grad_norm": 1.0} for s in range(1, 30)])
    assert m.warnings == []
    m.log({"step": 30, "loss": 2.0, "grad_norm": 25.0})
    assert len(m.warnings) == 1 and "spike" in m.warnings[0] and "train.lr" in m.warnings[0]


def test_eval_rising_while_train_falls_warns_overfitting(tmp_path):
    m = Monitor(tmp_path, total_steps=40, enabled=False)
    evals = {10: 1.0, 20: 1.1, 30: 1.2}
    for s in range(1, 31):
        r = {"step": s, "loss": 3.0 - 0.05 * s, "grad_norm": 1.0}
        if s in evals:
            r["eval_loss"] = evals[s]
        m.log(r)
    assert len(m.warnings) == 1 and "overfitting" in m.warnings[0]
    assert "lora.dropout" in m.warnings[0]


def test_healthy_run_gives_no_warning_and_metrics_resume_without_duplicates(tmp_path):
    m = Monitor(tmp_path, total_steps=20, enabled=True)
    _feed(
        m,
        [
            {"step": s, "loss": 3.0 / s, "grad_norm": 1.0, "eval_loss": 3.0 / s}
            for s in range(1, 11)
        ],
    )
    m.close()
    assert m.warnings == []
    # a resume from step 6 drops the lines a killed run wrote past its checkpoint
    m2 = Monitor(tmp_path, total_steps=20, start_step=6, enabled=True)
    _feed(m2, [{"step": s, "loss": 0.1, "grad_norm": 1.0} for s in range(7, 9)])
    m2.close()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def _stats(used, peak, limit=16 * 2**30):
    return lambda: {"bytes_in_use": used, "peak_bytes_in_use": peak, "bytes_limit": limit}


def test_memory_in_records_and_bar_and_low_headroom_warns_once(tmp_path):
    """Device memory (an injected statistics source standing in for an accelerator's) goes
    into the record and the progress bar; a peak past 90 % of the device warns, once."""
    gib = 2**30
    m = Monitor(tmp_path, total_steps=3, enabled=True, memory_stats=_stats(10 * gib, 12 * gib))
    mem = m.memory(1)
    assert mem == {"memory_bytes": 10 * gib, "peak_memory_bytes": 12 * gib}
    m.log({"step": 1, "loss": 2.0, "grad_norm": 1.0} | mem)
    assert m.warnings == []  # 25 % headroom
    assert m._bar.postfix.endswith("mem=10.0G, peak=12.0G")
    m._memory_stats = _stats(14 * gib, int(14.5 * gib))  # 9.4 % headroom
    m.memory(2)
    m.memory(3)
    assert len(m.warnings) == 1 and "9.4 % headroom" in m.warnings[0]
    assert "train.grad_accum" in m.warnings[0] and "train.remat=full" in m.warnings[0]
    m.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert row["memory_bytes"] == 10 * gib and row["peak_memory_bytes"] == 12 * gib


def test_no_memory_fields_where_the_device_keeps_no_statistics(tmp_path):
    m = Monitor(tmp_path, total_steps=1, enabled=False, memory_stats=lambda: None)
    assert m.memory(1) == {} and m.warnings == []


def test_only_the_reporting_process_opens_trackers(tmp_path):
    """Processes other than 0 (enabled=False) write nothing and never start a wandb run."""
    m = Monitor(tmp_path, total_steps=2, enabled=False, report_to=("jsonl", "tensorboard", "wandb"))
    m.log({"step": 1, "loss": 2.0, "grad_norm": 1.0})
    m.close()
    assert list(tmp_path.iterdir()) == []


def test_wandb_without_its_package_is_refused_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(monitor.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"jaxlora\[wandb\]"):
        monitor.require_sinks(("jsonl", "wandb"))
    monitor.require_sinks(("jsonl", "tensorboard"))


def test_resume_drops_a_line_a_kill_cut_short_and_refuses_a_damaged_one(tmp_path):
    """A run killed while it wrote a metrics line leaves it without its newline: resuming drops
    it with the lines past the checkpoint. A line in the middle that is not JSON is damage:
    the resume stops, naming the file and line, and leaves the file as it was."""
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0}) for s in range(1, 6)]
    path.write_text("\n".join(rows) + "\n" + rows[0][:7])  # killed in its 6th write
    Monitor(tmp_path, total_steps=10, start_step=4, enabled=True).close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]

    damaged = "\n".join([rows[0], rows[1][:7], rows[2]]) + "\n"
    path.write_text(damaged)
    with pytest.raises(ResumeError, match=r"metrics.jsonl, line 2: not JSON"):
        Monitor(tmp_path, total_steps=10, start_step=2, enabled=True)
    assert path.read_text() == damaged
