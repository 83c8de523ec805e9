"""What a plan that does not fit tells the user to change (``training.plan.advice``): only levers
the config leaves unused, each a valid override, and following them converges; ``train`` stops
with that advice, exit 2, when the compiler refuses the step as larger than the device."""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlora.config import load_config
from jaxlora.train import main
from jaxlora.training import loop
from jaxlora.training.plan import StepTooLarge, advice, advice_lines

MODEL = "model.path=assets/configs/Llama-3.1-8B"


def _keys(tries):
    return [o.partition("=")[0] for a in tries for o in a["set"]]


def test_every_unused_lever_is_advised_and_following_the_advice_converges():
    overrides = [MODEL, "data.max_seq_len=8192", "train.remat=none", "train.loss_chunk=0"]
    cfg = load_config("llama_lora", overrides)
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.optimizer) == (4, 4, "adamw")
    tries = advice(cfg, cfg.train.batch_size, 1, "gpu")
    assert _keys(tries) == [
        "quant.type",
        "train.remat",
        "train.batch_size",
        "train.grad_accum",
        "train.loss_chunk",
        "train.mlp_chunk",
        "train.optimizer",
    ]
    assert tries[-1]["set"] == [] and "jaxlora.plan targets" in tries[-1]["why"]
    rows_per_step = cfg.train.batch_size * cfg.train.grad_accum
    for _ in range(4):  # each round applies every override: they must all be valid
        overrides += [o for a in tries for o in a["set"]]
        cfg = load_config("llama_lora", overrides)
        assert cfg.train.batch_size * cfg.train.grad_accum == rows_per_step
        tries = advice(cfg, cfg.train.batch_size, 1, "gpu")
        if len(tries) == 1:
            break
    assert len(tries) == 1 and cfg.train.batch_size == 1 and cfg.quant.type == "nf4"
    assert (cfg.train.remat, cfg.train.loss_chunk, cfg.train.mlp_chunk) == ("full", 512, 2048)


def test_the_tiled_mlp_is_advised_for_long_sequences_with_its_platforms_saving():
    """The tiled MLP saves memory on the TPU too since its codes are laid out once a layer
    (docs/memory.md): advised on both, each with the saving measured there."""
    cfg = load_config("llama_qlora", [MODEL, "data.max_seq_len=8192"])
    why = {
        p: [a["why"] for a in advice(cfg, 1, 1, p) if "train.mlp_chunk=2048" in a["set"]]
        for p in ("gpu", "tpu")
    }
    assert "H100" in why["gpu"][0] and "v5e" in why["tpu"][0]
    short = load_config("llama_qlora", [MODEL, "data.max_seq_len=2048"])
    assert "train.mlp_chunk" not in _keys(advice(short, 1, 1, "tpu"))


def test_the_micro_batch_is_halved_in_whole_rows_per_device():
    cfg = load_config("llama_qlora", [MODEL, "train.batch_size=32", "train.grad_accum=1"])
    (batch,) = [a for a in advice(cfg, 32, 8, "tpu") if "train.batch_size=16" in a["set"]]
    assert batch["set"] == ["train.batch_size=16", "train.grad_accum=2"]
    assert not [
        k for k in _keys(advice(cfg, 8, 8, "tpu")) if k == "train.batch_size"
    ]  # one row each


def test_advice_lines_put_the_overrides_first():
    cfg = load_config("llama_qlora", [MODEL, "train.optimizer=adamw"])
    lines = advice_lines(advice(cfg, 1, 1, "gpu"))
    assert lines[0].startswith("train.optimizer=adamw_8bit -- Adam's moments in 8 bits")
    assert lines[-1].startswith("more devices")


class _Refusing:
    """A jitted step whose compile XLA:TPU refuses as larger than the chip."""

    def __init__(self, message):
        self.message = message

    def lower(self, *args):
        return self

    def compile(self):
        raise jax.errors.JaxRuntimeError(self.message)


def _shardings():
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    return types.SimpleNamespace(
        batch=NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"))),
        replicated=NamedSharding(mesh, PartitionSpec()),
    )


def test_train_stops_with_the_advice_when_the_compiler_refuses_the_step():
    cfg = load_config("llama_lora", [MODEL, "train.batch_size=4"])
    refused = _Refusing(
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (16.58G) exceeds available HBM (15.75G).\nmore"
    )
    with pytest.raises(StepTooLarge) as err:
        loop._compile_and_report(refused, {}, {}, {}, _shardings(), cfg)
    text = str(err.value)
    assert text.startswith("the compiler refused the train step: Ran out of memory on HBM")
    assert "16.58G" in text and "\n  quant.type=nf4 -- " in text
    assert "train.batch_size=2 train.grad_accum=8" in text


def test_any_other_compile_failure_is_not_called_too_large():
    cfg = load_config("llama_lora", [MODEL])
    other = _Refusing("RESOURCE_EXHAUSTED: Shared memory size limit exceeded")
    with pytest.raises(jax.errors.JaxRuntimeError, match="Shared memory"):
        loop._compile_and_report(other, {}, {}, {}, _shardings(), cfg)


def test_train_cli_exits_2_on_a_step_too_large(monkeypatch, capsys):
    def refuse(cfg):
        raise StepTooLarge("the compiler refused the train step: Ran out of memory on HBM")

    monkeypatch.setattr("jaxlora.train.run", refuse)
    assert main(["output_dir=/nonexistent/never-written"]) == 2
    assert "StepTooLarge: the compiler refused the train step" in capsys.readouterr().err
