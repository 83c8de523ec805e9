"""``python -m jaxlora.export`` refusals that need no trained run: an ``out`` that is the base
model's own directory, a run that saved no checkpoint (refused without creating one), and
``dtype`` for a format that does not take it."""

from __future__ import annotations

from jaxlora.config import load_config
from jaxlora.config.recipe import to_yaml
from jaxlora.export import main as export_main


def _run(tmp_path, base):
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config("demo", [f"model.path={base}", f"output_dir={run}"])
    (run / "config.yaml").write_text(to_yaml(cfg))
    return run


def test_out_at_the_base_model_directory_is_refused(tmp_path, capsys):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    run = _run(tmp_path, base)
    for fmt in ("merged", "peft", "bnb4"):
        assert export_main([f"checkpoint={run}", f"format={fmt}", f"out={base}/."]) == 2
        assert "is the run's base model directory (model.path)" in capsys.readouterr().err
    assert sorted(p.name for p in base.iterdir()) == ["config.json"]


def test_a_run_without_checkpoints_is_refused_and_left_as_it_was(tmp_path, capsys):
    run = _run(tmp_path, tmp_path / "base")
    assert export_main([f"checkpoint={run}", "format=peft", f"out={tmp_path / 'a'}"]) == 2
    assert "checkpoints does not exist: the run saved no checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]
    assert not (tmp_path / "a").exists()


def test_dtype_for_a_format_that_does_not_take_it_is_refused(tmp_path, capsys):
    run = _run(tmp_path, tmp_path / "base")
    for fmt, out in (("peft", "a"), ("gguf", "m.gguf")):
        argv = [f"checkpoint={run}", f"format={fmt}", f"out={tmp_path / out}", "dtype=bfloat16"]
        assert export_main(argv) == 2
        assert "dtype: applies to format=merged or bnb4" in capsys.readouterr().err
