"""``python -m jaxlora.train``: overrides and errors, a short run whose loss falls, NaN handling,
kill -9 and resume, export from a checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxlora import train
from jaxlora.export import main as export_main
from jaxlora.interop.safetensors import read_file
from tests.hf_models import make_run_assets

# One worker runs this module, so its module-scoped runs happen once.
pytestmark = pytest.mark.xdist_group("train_cli")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_run_assets(tmp_path_factory.mktemp("assets"))


def _args(assets, out, *extra):
    return [
        f"model.path={assets['model']}",
        f"data.path={assets['train']}",
        "data.val_size=0",
        f"data.eval_path={assets['eval']}",
        "data.max_seq_len=192",
        "train.batch_size=4",
        "train.log_every=1",
        "train.eval_every=4",
        "train.save_every=4",
        f"output_dir={out}",
        *extra,
    ]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _adapter(out: Path) -> dict[str, np.ndarray]:
    return read_file(out / "adapter" / "adapter_model.safetensors")


# ---- configuration errors: exit 2, a message naming the key, nothing written ----------------


@pytest.mark.parametrize(
    "override, needle",
    [
        ("lora.rank=8", "did you mean 'lora.r'"),
        ("train.lr=-1", "train.lr"),
        ("train.schedule=exponential", "train.schedule"),
        ("lora.dropout=1.5", "lora.dropout"),
        ("recipe=no_such_recipe", "unknown recipe"),
    ],
)
def test_bad_config_exits_2_naming_the_key(assets, tmp_path, capsys, override, needle):
    out = tmp_path / "run"
    assert train.main(_args(assets, out, override)) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_malformed_data_line_is_reported_with_file_and_line(assets, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = assets["train"].read_text().splitlines()
    lines[6] = '{"instruction": "What is 1 plus 1?", "output": '
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    assert train.main(_args(assets, out, f"data.path={bad}")) == 2
    assert f"{bad}:7" in capsys.readouterr().err
    assert not (out / "metrics.jsonl").exists()


def test_target_module_that_matches_nothing_is_an_error(assets, tmp_path, capsys):
    assert train.main(_args(assets, tmp_path / "run", "lora.target_modules=[qq_proj]")) == 2
    err = capsys.readouterr().err
    assert "qq_proj" in err and "q_proj" in err


# ---- a short run ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("short") / "run"
    rc = train.main(
        _args(
            assets,
            out,
            "train.max_steps=12",
            "train.lr=3e-3",
            "train.exact_match_examples=4",
            "train.sample_every=6",
            "train.sample_prompts=['What is 2 plus 3?']",
        )
    )
    assert rc == 0
    return out


def test_short_run_loss_falls_and_writes_everything(short_run):
    m = _metrics(short_run)
    assert [r["step"] for r in m] == list(range(1, 13))
    first, last = np.mean([r["loss"] for r in m[:3]]), np.mean([r["loss"] for r in m[-3:]])
    assert last < first - 0.3, (first, last)  # nats: a random tiny model learns the format fast
    for r in m[1:]:
        for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "step_time"):
            assert key in r and np.isfinite(r[key])
    assert "compile_time" in m[0]
    assert [r["step"] for r in m if "eval_loss" in r] == [4, 8, 12]
    assert (short_run / "config.yaml").exists() and list((short_run / "tb").iterdir())
    assert (short_run / "adapter" / "adapter_config.json").exists()
    report = json.loads((short_run / "report.json").read_text())
    assert report["after"]["eval_loss"] < report["before"]["eval_loss"]


def test_saved_config_reproduces_the_run_config(short_run):
    from jaxlora.config import load_config

    cfg = load_config(str(short_run / "config.yaml"))
    assert cfg.train.max_steps == 12 and cfg.output_dir == str(short_run)


@pytest.mark.parametrize("fmt", ["peft", "merged", "bnb4"])
def test_export_from_checkpoint(short_run, tmp_path, fmt):
    out = tmp_path / fmt
    assert export_main([f"checkpoint={short_run}", f"format={fmt}", f"out={out}"]) == 0
    if fmt == "peft":  # the same files and numbers as the end-of-run export
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            assert (out / name).read_bytes() == (short_run / "adapter" / name).read_bytes()
    elif fmt == "merged":  # dense weights = dequantized NF4 base + the adapter, same numbers
        import jaxlora
        from jaxlora.config import load_config

        base = load_config(str(short_run / "config.yaml")).model.path
        qlora = jaxlora.load_model(base, quant="nf4", adapter=short_run / "adapter")
        merged = jaxlora.load_model(out)
        ids = np.random.default_rng(0).integers(0, merged.config.vocab_size, size=(2, 7))
        np.testing.assert_allclose(
            np.asarray(merged(ids)), np.asarray(qlora(ids)), atol=1e-4, rtol=0
        )
    else:
        assert json.loads((out / "config.json").read_text())["quantization_config"]
        assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_existing_checkpoints_without_resume_are_not_overwritten(assets, short_run, capsys):
    before = sorted(p.name for p in (short_run / "checkpoints").iterdir())
    config = (short_run / "config.yaml").read_bytes()
    assert train.main(_args(assets, short_run, "train.max_steps=12", "train.lr=1e-3")) == 2
    assert "train.resume=true" in capsys.readouterr().err
    assert sorted(p.name for p in (short_run / "checkpoints").iterdir()) == before
    assert (short_run / "config.yaml").read_bytes() == config  # nothing written is damaged


def test_resume_against_another_base_is_refused(assets, short_run, tmp_path, capsys):
    import shutil

    from tests.hf_models import make_hf_model

    other = tmp_path / "other"
    shutil.copytree(assets["model"], other)
    cfg = json.loads((other / "config.json").read_text())
    make_hf_model(
        "llama2_mha",
        other,
        seed=99,
        vocab_size=cfg["vocab_size"],
        hidden_size=64,
        intermediate_size=128,
    )
    config = (short_run / "config.yaml").read_bytes()
    rc = train.main(
        _args(assets, short_run, "train.max_steps=16", "train.resume=true", f"model.path={other}")
    )
    assert rc == 2
    assert "different base model" in capsys.readouterr().err
    assert (short_run / "config.yaml").read_bytes() == config


def test_resume_with_another_rank_is_refused(assets, short_run, capsys):
    rc = train.main(_args(assets, short_run, "train.max_steps=16", "train.resume=true", "lora.r=4"))
    assert rc == 2
    assert "lora.r: 16 -> 4" in capsys.readouterr().err


# ---- scanned layers: the same first step, the same adapter on the way out -------------------


@pytest.fixture(scope="module")
def scanned_run(assets, tmp_path_factory):
    """One step with the layers scanned over stacked parameters (samples decode with stacked
    caches), no dropout (scanned and unrolled layers draw different dropout masks)."""
    out = tmp_path_factory.mktemp("scanned") / "run"
    common = ("train.max_steps=1", "train.save_every=1", "lora.dropout=0")
    extra = ("train.sample_every=1", "train.sample_prompts=['What is 2 plus 3?']")
    assert train.main(_args(assets, out, "model.scan_layers=true", *common, *extra)) == 0
    return out


def test_scanned_run_equals_unrolled_at_step_1(assets, scanned_run, tmp_path):
    """Step 1 of AdamW moves each weight by ``lr·g/(|g|+eps)``: gradients an ulp apart
    (tests/models/test_scan.py) give adapters within 1e-6 of their scale."""
    ref = tmp_path / "ref"
    common = ("train.max_steps=1", "train.save_every=1", "lora.dropout=0")
    assert train.main(_args(assets, ref, "model.scan_layers=false", *common)) == 0
    got, want = _adapter(scanned_run), _adapter(ref)
    assert got.keys() == want.keys()  # Hugging Face names, layers unstacked
    for k, w in want.items():
        np.testing.assert_allclose(got[k], w, rtol=0, atol=1e-6 * max(1.0, np.abs(w).max()))


def test_export_from_a_scanned_checkpoint(scanned_run, tmp_path):
    out = tmp_path / "peft"
    assert export_main([f"checkpoint={scanned_run}", "format=peft", f"out={out}"]) == 0
    name = "adapter_model.safetensors"
    assert (out / name).read_bytes() == (scanned_run / "adapter" / name).read_bytes()


def test_resume_with_other_layers_is_refused(assets, scanned_run, capsys):
    rc = train.main(
        _args(
            assets, scanned_run, "model.scan_layers=false", "train.max_steps=2", "train.resume=true"
        )
    )
    assert rc == 2
    assert "model.scan_layers differs" in capsys.readouterr().err


# ---- NaN: stop, keep the last good checkpoint, say what to try -----------------------------


def test_nonfinite_loss_stops_with_advice_and_keeps_checkpoints(assets, tmp_path, capsys):
    out = tmp_path / "run"
    rc = train.main(
        _args(
            assets,
            out,
            "train.max_steps=12",
            "train.lr=1e30",
            "train.save_every=1",
            "train.max_grad_norm=0",
            "train.warmup_ratio=0",
        )
    )
    assert rc == 3
    err = capsys.readouterr().err
    assert "not finite" in err and "lower train.lr" in err
    logged = _metrics(out)
    assert logged and all(np.isfinite(r["loss"]) for r in logged)  # the bad step is not logged
    last_good = max(r["step"] for r in logged)
    assert last_good < 12
    assert f"last good checkpoint (step {last_good})" in err
    assert (
        max(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == last_good
    )
    assert not (out / "adapter").exists()


# ---- kill -9 mid-run, resume, and get the same adapter ---------------------------------------


@pytest.mark.slow
def test_sigkill_and_resume_gives_bit_identical_adapter(assets, tmp_path):
    common = ["train.max_steps=240", "train.save_every=40", "train.eval_every=0"]
    ref = tmp_path / "ref"
    assert train.main(_args(assets, ref, *common)) == 0

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "jaxlora.train", *_args(assets, out, *common)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=Path(__file__).parents[1]
    )
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once a checkpoint exists and training has moved past it
        done = [r["step"] for r in _metrics(out)] if (out / "metrics.jsonl").exists() else []
        if done and max(done) >= 100:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter").exists()
    assert train.main(_args(assets, out, *common, "train.resume=true")) == 0
    steps = [r["step"] for r in _metrics(out)]
    assert steps == list(range(1, 241))  # no gap, no duplicate
    a, b = _adapter(out), _adapter(ref)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
