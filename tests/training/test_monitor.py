"""The training-health warnings fire on the patterns they describe, and only then."""

from __future__ import annotations

import json

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
