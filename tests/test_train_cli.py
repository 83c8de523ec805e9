"""``python -m jaxlora.train``: overrides and errors, a short run whose loss falls, NaN handling,
kill -9 and resume, export from a checkpoint."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from jaxlora import lora, train
from jaxlora.export import main as export_main
from jaxlora.interop.safetensors import read_file
from jaxlora.training import checkpoint
from tests.hf_models import make_run_assets
from tests.processes import logged_steps

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
        ("train.report_to=[wandb]", "must include jsonl"),
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


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        # the Pallas kernel, which CPUs run only interpreted
        ((), "quant.kernel=fused: no compiled 4-bit matmul kernel for cpu"),
        # blocks the kernels do not take: not a silent dequantize-then-dot on any device
        (("quant.blocksize=256",), "quant.kernel=fused: the Pallas 4-bit kernels take blocks"),
    ],
)
def test_a_kernel_these_devices_cannot_run_is_an_error(assets, tmp_path, capsys, extra, needle):
    out = tmp_path / "run"
    assert train.main(_args(assets, out, "quant.type=nf4", "quant.kernel=fused", *extra)) == 2
    assert needle in capsys.readouterr().err
    assert not (out / "metrics.jsonl").exists()


def test_target_module_that_matches_nothing_is_an_error(assets, tmp_path, capsys):
    assert train.main(_args(assets, tmp_path / "run", "lora.target_modules=[qq_proj]")) == 2
    err = capsys.readouterr().err
    assert "qq_proj" in err and "q_proj" in err


# ---- a short run ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("short") / "run"
    with pytest.MonkeyPatch.context() as env:  # wandb writes its run files, offline and quiet
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_CONSOLE", "off")
        env.setenv("WANDB_SILENT", "true")
        rc = train.main(
            _args(
                assets,
                out,
                "train.max_steps=12",
                "train.lr=3e-3",
                "train.exact_match_examples=4",
                "train.sample_every=6",
                "train.sample_prompts=['What is 2 plus 3?']",
                "train.report_to=[jsonl,tensorboard,wandb]",
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


def _tensorboard_scalars(tb_dir: Path) -> dict[int, dict[str, float]]:
    """step -> {tag: value} from TensorBoard event files (TFRecord framing: u64 length,
    u32 crc, the Event proto, u32 crc)."""
    from tensorboardX.proto.event_pb2 import Event

    steps: dict[int, dict[str, float]] = {}
    for path in tb_dir.iterdir():
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 16 + n
            for v in event.summary.value:
                steps.setdefault(event.step, {})[v.tag] = v.simple_value
    return steps


def _wandb_records(run_file: Path) -> list:
    """The ``wandb_internal_pb2.Record`` protos of an offline ``run-<id>.wandb`` file: a 7-byte
    W&B header, then LevelDB log records (32 KiB blocks; u32 crc, u16 length, u8 kind: 1 whole,
    2 first, 3 middle, 4 last)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, part = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        n, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        part, pos = part + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            records, part = [*records, Record.FromString(part)], b""
    return records


def test_tensorboard_and_wandb_hold_the_scalars_of_metrics_jsonl(short_run):
    """train.report_to=[jsonl,tensorboard,wandb]: both trackers hold every numeric field of
    every metrics.jsonl row at its step. wandb keeps float64 (JSON), so values are equal;
    TensorBoard stores float32, so each equals the jsonl value rounded to float32."""
    rows = {r.pop("step"): r for r in _metrics(short_run)}
    tb = _tensorboard_scalars(short_run / "tb")
    (run_file,) = (short_run / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(run_file)
    wb = {}  # wandb's own keys (_step, _runtime, _timestamp) start with "_"
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item
            }
            wb[r.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    assert sorted(tb) == sorted(wb) == sorted(rows)
    for step, row in rows.items():
        assert wb[step] == row
        assert tb[step] == {k: float(np.float32(v)) for k, v in row.items()}
    # the wandb run is named for the run directory and carries the resolved config
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name) == ("jaxlora", short_run.name)
    from jaxlora.config import load_config
    from jaxlora.config.typed import to_plain

    config = {u.key: json.loads(u.value_json) for u in run.config.update if u.key != "_wandb"}
    assert config == to_plain(load_config(str(short_run / "config.yaml")))


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


def test_gguf_export_from_checkpoint(short_run, tmp_path):
    """format=gguf through the command: the f32 GGUF holds the merged export's float32 weights
    exactly (q/k permutation undone), and the Modelfile beside it the run's Alpaca template."""
    import gguf

    from tests.interop.test_gguf import _gguf_to_hf, _unpermuted

    run = f"checkpoint={short_run}"
    assert export_main([run, "format=gguf", f"out={tmp_path / 'm.gguf'}", "gguf.type=f32"]) == 0
    assert export_main([run, "format=merged", f"out={tmp_path / 'hf'}", "dtype=float32"]) == 0
    merged = read_file(tmp_path / "hf" / "model.safetensors")
    config = _base_config(short_run)
    tensors = gguf.GGUFReader(tmp_path / "m.gguf").tensors
    assert {_gguf_to_hf(t.name) for t in tensors} == set(merged)
    for t in tensors:
        got = _unpermuted(t.name, np.asarray(t.data), config)
        np.testing.assert_array_equal(got, merged[_gguf_to_hf(t.name)], err_msg=t.name)
    modelfile = (tmp_path / "Modelfile").read_text()
    assert (
        modelfile.startswith("FROM ./m.gguf\n") and "### Instruction:\n{{ .Content }}" in modelfile
    )


def _base_config(run: Path):
    from jaxlora.config import load_config
    from jaxlora.interop import hf

    return hf.read_config(Path(load_config(str(run / "config.yaml")).model.path))[0]


# ---- push_to_hub: the folder that would be uploaded, its model card; vLLM's needs --------------


@pytest.fixture(scope="module")
def pushed(short_run, tmp_path_factory):
    """peft and merged exports pushed through the CLI, with huggingface_hub's HfApi replaced by
    a recorder (no network here): {fmt: export dir}, and the calls it received."""
    from jaxlora.interop import hub

    calls: list[tuple] = []

    class RecordingHfApi:
        def __init__(self, token=None):
            calls.append(("HfApi", token))

        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def upload_folder(self, folder_path, repo_id):
            files = sorted(str(p.relative_to(folder_path)) for p in folder_path.rglob("*"))
            calls.append(("upload_folder", folder_path, repo_id, files))
            return f"https://huggingface.co/{repo_id}/commit/0"

    root, outs = tmp_path_factory.mktemp("pushed"), {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hub, "HfApi", RecordingHfApi)
        for fmt, private in [("peft", "true"), ("merged", "false")]:
            outs[fmt] = root / fmt
            argv = [f"checkpoint={short_run}", f"format={fmt}", f"out={outs[fmt]}", "step=8"]
            argv += [f"push_to_hub=me/tiny-{fmt}", f"private={private}"]
            assert export_main(argv) == 0
    return outs, calls


def _card(folder: Path) -> tuple[dict, str]:
    import yaml

    text = (folder / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_push_to_hub_uploads_the_export_and_its_model_card(short_run, pushed):
    """One create_repo (private as asked) and one upload_folder of exactly the export's files
    plus README.md, whose card carries the run: step, recipe, held-out numbers, how to load."""
    from jaxlora.config import load_config, to_yaml

    outs, calls = pushed
    for i, (fmt, private) in enumerate([("peft", True), ("merged", False)]):
        folder, repo = outs[fmt], f"me/tiny-{fmt}"
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
        assert calls[3 * i : 3 * i + 3] == [
            ("HfApi", True),
            ("create_repo", repo, private, True),
            ("upload_folder", folder, repo, files),
        ]
        assert "README.md" in files and "tokenizer_config.json" in files
        assert ("adapter_model.safetensors" if fmt == "peft" else "model.safetensors") in files
        meta, body = _card(folder)
        assert meta["library_name"] == ("peft" if fmt == "peft" else "transformers")
        assert {"jaxlora", "lora", "qlora"} <= set(meta["tags"])
        assert "Step 8 of a run of 12 optimizer steps" in body
        report = json.loads((short_run / "report.json").read_text())
        for key, name in [("eval_loss", "eval loss"), ("exact_match", "exact match")]:
            b, a = report["before"][key], report["after"][key]
            assert f"| {name} | {b:.4f} | {a:.4f} |" in body
        eval8 = next(r["eval_loss"] for r in _metrics(short_run) if r["step"] == 8)
        assert f"Eval loss at step 8: {eval8:.4f}." in body
        recipe = body.split("```yaml\n")[1].split("```")[0]
        assert recipe == to_yaml(load_config(str(short_run / "config.yaml")))
        serve = "--enable-lora --lora-modules adapter=me/tiny-peft --max-lora-rank 16`"  # r=16
        if fmt == "merged":
            serve = "vllm serve me/tiny-merged`"
        loads = "PeftModel.from_pretrained" if fmt == "peft" else f'from_pretrained("{repo}")'
        assert loads in body and serve in body


# What vLLM (0.33, read from its wheel: vllm/lora/peft_helper.py, lora/utils.py,
# model_executor/models/llama.py and registry.py) asks of what it serves.
VLLM_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

VLLM_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")  # strings it takes


def test_exports_carry_what_vllm_loads(pushed):
    """``vllm serve <merged>`` and ``--enable-lora --lora-modules name=<adapter>`` would accept
    these folders: a registered architecture with safetensors, an adapter config without the
    features vLLM refuses, weights named as its parser expects, the tokenizer (and the chat
    template the run trained with) beside each."""
    from safetensors import safe_open

    from jaxlora.interop import hub  # VLLM_MAX_LORA_RANKS: --max-lora-rank's choices

    outs, _ = pushed
    merged = json.loads((outs["merged"] / "config.json").read_text())
    assert merged["architectures"] == ["LlamaForCausalLM"]  # vLLM's registry has it
    adapter = outs["peft"]
    c = json.loads((adapter / "adapter_config.json").read_text())
    assert c["peft_type"] == "LORA" and isinstance(c["r"], int) and c["lora_alpha"] > 0
    assert c["bias"] == "none" and not c["use_dora"] and not c.get("lora_bias")
    assert not c["modules_to_save"] and not c.get("layer_replication")
    init = c["init_lora_weights"]
    assert not isinstance(init, str) or init.lower() in VLLM_INITS
    assert max([c["r"], *c["rank_pattern"].values()]) <= max(hub.VLLM_MAX_LORA_RANKS)
    # a list must name modules vLLM wraps; a pattern ("all-linear") is checked on the tensors
    assert isinstance(c["target_modules"], str) or set(c["target_modules"]) <= VLLM_LORA_MODULES
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="numpy") as f:
        names = list(f.keys())
    for name in names:  # vLLM's parse_fine_tuned_lora_name, and its module check
        parts = name.split(".")
        assert parts[:2] == ["base_model", "model"] and parts[-2:] in (
            ["lora_A", "weight"],
            ["lora_B", "weight"],
        ), name
        assert parts[-3] in VLLM_LORA_MODULES, name
    for folder in (adapter, outs["merged"]):
        tok = json.loads((folder / "tokenizer_config.json").read_text())
        assert (folder / "tokenizer.json").exists()
        assert tok.get("chat_template") or (folder / "chat_template.jinja").exists()


# ---- the prompt format travels with every export (issue: generate answers as trained) ---------


def _training_ids(tokenizer_dir: Path, cfg_data, record: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, whole example ids) of ``record`` as the run tokenized it for training."""
    from jaxlora import data

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    (ex,), _ = data.tokenize([record], tok, cfg_data)
    first_trained = int(np.argmax(ex.trained))
    return ex.tokens[:first_trained].tolist(), ex.tokens.tolist()


def _template_ids(directory: Path, messages: list[dict], gen: bool) -> list[int]:
    tok = AutoTokenizer.from_pretrained(str(directory))
    return tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)["input_ids"]


def test_every_export_carries_the_alpaca_prompt_as_its_chat_template(short_run, tmp_path):
    """transformers' ``apply_chat_template`` on any export builds the ids the run trained on:
    the prompt (with the generation prompt) and the whole example (answer and EOS)."""
    from jaxlora import data
    from jaxlora.config import load_config

    cfg = load_config(str(short_run / "config.yaml"))
    dirs = [short_run / "adapter"]
    for fmt in ("peft", "merged", "bnb4"):
        assert (
            export_main([f"checkpoint={short_run}", f"format={fmt}", f"out={tmp_path / fmt}"]) == 0
        )
        dirs.append(tmp_path / fmt)
    dirs.append(tmp_path / "bnb4" / "adapter")
    records = [json.loads(line) for line in Path(cfg.data.eval_path).read_text().splitlines()][:3]
    records[1] = {"instruction": "Add these.", "input": "2 and 3", "output": "It is 5."}
    base_tok = AutoTokenizer.from_pretrained(cfg.model.path)
    assert base_tok.chat_template and "### Instruction" not in base_tok.chat_template
    for rec in records:
        convo = data.user_prompt(rec["instruction"], rec["input"])
        prompt_ids, example_ids = _training_ids(cfg.model.path, cfg.data, rec)
        for d in dirs:
            assert _template_ids(d, convo, gen=True) == prompt_ids, d
            answered = [*convo, {"role": "assistant", "content": rec["output"]}]
            assert _template_ids(d, answered, gen=False) == example_ids, d
        text = AutoTokenizer.from_pretrained(str(dirs[0])).apply_chat_template(
            convo, tokenize=False, add_generation_prompt=True
        )
        assert text == "<s>" + data.alpaca_prompt(rec["instruction"], rec["input"])


def test_transformers_and_peft_greedy_answer_equals_jaxlora_generate(short_run, assets):
    """The run's adapter, prompted through its own tokenizer's chat template: PEFT on the
    float32 base in transformers and jaxlora on the same base give the same greedy tokens."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import jaxlora
    from jaxlora import data
    from jaxlora.sampling import generate

    adapter = short_run / "adapter"
    tok = AutoTokenizer.from_pretrained(str(adapter))
    hf = AutoModelForCausalLM.from_pretrained(str(assets["model"]), dtype=torch.float32)
    pm = PeftModel.from_pretrained(hf, str(adapter)).eval()
    ours = jaxlora.load_model(assets["model"], adapter=adapter)
    questions = ["What is 2 plus 3?", "What is 7 plus 1?", "What is 4 plus 4?"]
    answers = generate(ours, [data.user_prompt(q) for q in questions], max_new_tokens=8)
    for q, ans in zip(questions, answers, strict=True):
        enc = tok.apply_chat_template(
            data.user_prompt(q), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = pm.generate(
                **enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id
            )
        theirs = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        assert ans == theirs, (q, ans, theirs)
    assert any(a.startswith("It is") for a in answers)  # the run learned the answer format


def test_a_chat_run_exports_the_template_it_trained_with(assets, tmp_path):
    """Chat data is rendered with the tokenizer's own template; that template is what the
    adapter carries, and it rebuilds the training prompt ids."""
    from jaxlora.config import load_config

    convos = [
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"It is {a + b}."},
        ]
        for a in range(1, 9)
        for b in range(1, 4)
    ]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convos))
    out = tmp_path / "run"
    argv = _args(assets, out, f"data.path={chat}", "data.format=chat", "train.max_steps=2")
    held_out = ("data.eval_path", "data.val_size")
    argv = [a for a in argv if not a.startswith(held_out)]
    argv += ["data.eval_path=null", "data.val_size=4", "train.exact_match_examples=0"]
    assert train.main(argv) == 0
    cfg = load_config(str(out / "config.yaml"))
    exported = AutoTokenizer.from_pretrained(str(out / "adapter"))
    assert exported.chat_template == AutoTokenizer.from_pretrained(cfg.model.path).chat_template
    convo = convos[5]
    prompt_ids, example_ids = _training_ids(cfg.model.path, cfg.data, {"messages": convo})
    assert _template_ids(out / "adapter", convo[:2], gen=True) == prompt_ids
    assert _template_ids(out / "adapter", convo, gen=False) == example_ids


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


def test_a_randomized_pissa_run_exports_and_resumes_on_the_base_it_trained(
    assets, tmp_path, capsys
):
    """``lora.init=pissa_niter_K`` draws its base ``W − s·B₀A₀`` from the run's init key
    (``train.seed``): the merged export rebuilds that base, so after one step of lr 1e-6 the
    merged weights are the original ones to within the step (another key's base is ~40 % of
    ‖W‖ off); a resume with another seed, which would draw another base, is refused."""
    from jaxlora.interop.safetensors import read_file as read_tensors

    run = tmp_path / "run"
    extra = ("quant.type=none", "lora.init=pissa_niter_2", "train.seed=7", "train.lr=1e-6")
    common = ("train.max_steps=1", "train.save_every=1", "train.eval_every=0")
    assert train.main(_args(assets, run, *extra, *common)) == 0
    out = tmp_path / "merged"
    assert export_main([f"checkpoint={run}", "format=merged", f"out={out}"]) == 0
    merged = read_tensors(out / "model.safetensors")
    original = read_tensors(Path(assets["model"]) / "model.safetensors")
    linears = [k for k in original if k.endswith("proj.weight")]
    assert linears
    for k in linears:  # rank-2 step of lr 1e-6 on factors of norm ~1: far under 1e-4
        np.testing.assert_allclose(merged[k], original[k], rtol=0, atol=1e-4, err_msg=k)
    rc = train.main(
        _args(assets, run, *extra[:-2], "train.seed=8", "train.resume=true", "train.max_steps=2")
    )
    assert rc == 2
    assert "train.seed=7" in capsys.readouterr().err


# ---- scanned layers: the same first step, the same adapter on the way out -------------------


@pytest.fixture(scope="module")
def scanned_run(assets, tmp_path_factory):
    """One step with the layers scanned over stacked parameters, stacked while the base
    loaded (samples decode with stacked caches), with the recipe's LoRA dropout (0.05): scanned
    and unrolled layers draw the same masks."""
    out = tmp_path_factory.mktemp("scanned") / "run"
    common = ("train.max_steps=1", "train.save_every=1")
    extra = ("train.sample_every=1", "train.sample_prompts=['What is 2 plus 3?']")
    assert train.main(_args(assets, out, "model.scan_layers=true", *common, *extra)) == 0
    return out


def test_scanned_run_equals_unrolled_at_step_1(assets, scanned_run, tmp_path):
    """Step 1 of AdamW moves each weight by ``lr·g/(|g|+eps)``: gradients an ulp apart
    (tests/models/test_scan.py) give adapters within 1e-6 of their scale."""
    ref = tmp_path / "ref"
    common = ("train.max_steps=1", "train.save_every=1")
    assert train.main(_args(assets, ref, "model.scan_layers=false", *common)) == 0
    got, want = _adapter(scanned_run), _adapter(ref)
    assert got.keys() == want.keys()  # Hugging Face names, layers unstacked
    for k, w in want.items():
        np.testing.assert_allclose(got[k], w, rtol=0, atol=1e-6 * max(1.0, np.abs(w).max()))


@pytest.mark.parametrize(
    "extra",
    [
        ("train.optimizer=adafactor", "train.lr=1e-2", "lora.use_dora=true"),
        ("train.optimizer=adamw_8bit", "lora.use_dora=true", "lora.loraplus_lr_ratio=16"),
        ("lora.modules_to_save=[layers.0.input_layernorm]",),
    ],
    ids=["adafactor_dora", "adamw_8bit_loraplus_dora", "one_layers_module_saved"],
)
def test_scanned_run_equals_unrolled_at_step_1_with(assets, tmp_path, extra):
    """The optimizer sees each scanned layer as its own tensor: Adafactor's step is × the RMS of
    each layer's DoRA magnitudes (its norms of W's rows), and LoRA+ gives the stacked
    magnitudes (1-D per layer) the ratio × LR as it does unrolled. A module saved in one layer
    only makes that layer a run of its own (its halves differ from the other layers'). Step 1's
    update is continuous in the gradients, which are an ulp apart: adapters within 1e-6 of
    their scale."""
    common = ("train.max_steps=1", "train.save_every=1", "train.eval_every=0", *extra)
    runs = {}
    for scan in ("true", "false"):
        out = tmp_path / scan
        assert train.main(_args(assets, out, f"model.scan_layers={scan}", *common)) == 0
        runs[scan] = _adapter(out)
    got, want = runs["true"], runs["false"]
    assert got.keys() == want.keys()
    for k, w in want.items():
        np.testing.assert_allclose(got[k], w, rtol=0, atol=1e-6 * max(1.0, np.abs(w).max()))


@pytest.mark.parametrize("init", ["loftq", "pissa"])
def test_a_4bit_run_whose_init_rewrites_the_base_quantizes_after_it(assets, tmp_path, init):
    """``lora.init=loftq`` / ``pissa`` on the demo's NF4 run: the base loads in float, each
    target's factors (and LoftQ's NF4 base) are exactly what ``Model.apply_lora`` gives on the
    float model, PiSSA's float residual and every other decoder linear are quantized as a
    ``quant.type=nf4`` load quantizes them; a step runs on that base, and ``plan``'s abstract
    build of the run holds the same shapes."""
    import jax
    from flax.traverse_util import flatten_dict

    from jaxlora.config import load_config
    from jaxlora.interop.bnb import quantizing_converter
    from jaxlora.model import load_model
    from jaxlora.training import run as run_builder
    from jaxlora.weights.lora import LoRAWeight
    from jaxlora.weights.nf4 import NF4Tensor

    plain = _args(assets, tmp_path / "run", "lora.target_modules=[q_proj,down_proj]")
    args = [*plain, f"lora.init={init}"]
    cfg = load_config("demo", args)
    key = jax.random.key(0)
    _, frozen, trainable = run_builder.init_lora(cfg, run_builder.load_base(cfg), key)
    got = flatten_dict(lora.combine(frozen, trainable), sep=".")
    want = flatten_dict(
        load_model(cfg.model.path, dtype=cfg.model.dtype).apply_lora(cfg.lora, key=key).params,
        sep=".",
    )
    nf4 = flatten_dict(run_builder.load_base(load_config("demo", plain)).params, sep=".")
    convert = quantizing_converter("nf4", dtype=cfg.model.dtype)
    kinds = {"lora": 0, "nf4": 0}
    for k, w in want.items():
        if isinstance(w, LoRAWeight):  # LoftQ's NF4 base, PiSSA's residual quantized here
            if init == "pissa":
                assert not isinstance(w.base, NF4Tensor)
                w = w.replace(base=convert(k, np.asarray(w.base)))
            assert isinstance(got[k].base, NF4Tensor)
            jax.tree.map(np.testing.assert_array_equal, got[k], w)
            kinds["lora"] += 1
        elif isinstance(nf4[k], NF4Tensor):  # not a target: quantized as a QLoRA load does
            jax.tree.map(np.testing.assert_array_equal, got[k], nf4[k])
            kinds["nf4"] += 1
        else:
            np.testing.assert_array_equal(got[k], w)
    assert kinds["lora"] == 2 * 2 and kinds["nf4"] == 2 * 5  # 2 layers
    shapes = jax.eval_shape(
        lambda p, k: lora.inject(p, run_builder.lora_for_shapes(cfg), k),
        run_builder.abstract_base(cfg, *_config(cfg)),
        key,
    )
    same = lambda x, y: (x.shape, x.dtype) == (y.shape, y.dtype)
    assert jax.tree.all(jax.tree.map(same, shapes, lora.combine(frozen, trainable)))
    assert train.main([*args, "train.max_steps=1", "train.save_every=1"]) == 0
    assert _metrics(tmp_path / "run")[0]["step"] == 1


def _config(cfg):
    from jaxlora.interop import hf

    return hf.read_config(hf.resolve(cfg.model.path, cfg.model.revision))


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
        done = logged_steps(out)
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


def test_float16_overflow_steps_are_skipped_and_logged(assets, tmp_path, capsys):
    """An injected overflow: at a loss scale of 2^40 the float16 backward overflows on every
    step, so each is skipped (the run goes on), the scale halves, and metrics.jsonl and the
    progress output say so; the logged lr is the schedule's at the updates applied so far."""
    out = tmp_path / "run"
    rc = train.main(
        _args(
            assets,
            out,
            "train.max_steps=3",
            "model.compute_dtype=float16",
            f"train.loss_scale_init={2.0**40}",
            "train.schedule=linear",
            "train.warmup_ratio=0",
        )
    )
    assert rc == 0
    logged = _metrics(out)
    assert [r["loss_scale"] for r in logged] == [2.0**40, 2.0**39, 2.0**38]
    assert all(r["skipped"] and np.isfinite(r["loss"]) for r in logged)
    # no update was applied, so the linear schedule has not moved: each logs its first lr
    assert len({r["lr"] for r in logged}) == 1 and logged[0]["lr"] > 0
    err = capsys.readouterr()
    assert f"update skipped, scale lowered to {2.0**39:g}" in err.out + err.err


# ---- streamed datasets and mixtures: train through the CLI, kill -9, resume bit-identically ----


@pytest.fixture(scope="module")
def stream_files(assets, tmp_path_factory) -> dict[str, Path]:
    """The run's alpaca records as 3 parquet shards (a hub dataset's layout, standing in for
    one) and as a text-format JSON Lines file under another field name."""
    d = tmp_path_factory.mktemp("stream_data")
    records = [json.loads(line) for line in assets["train"].read_text().splitlines()]
    (d / "shards").mkdir()
    for s in range(3):
        Dataset.from_list(records[s::3]).to_parquet(d / "shards" / f"part-{s}.parquet")
    lines = [json.dumps({"body": f"{r['instruction']} {r['output']}"}) for r in records]
    (d / "texts.jsonl").write_text("\n".join(lines) + "\n")
    return {"shards": d / "shards", "texts": d / "texts.jsonl"}


def _kill_after_a_checkpoint(args: list[str], out: Path, steps: int) -> int:
    """Run ``python -m jaxlora.train args`` and SIGKILL it once a checkpoint is committed and
    training has moved past it; returns the checkpoint step a resume starts from."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxlora.train", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=Path(__file__).parents[1],
    )
    ckpt = out / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        committed = [int(p.name) for p in ckpt.glob("*") if p.name.isdigit()]
        done = logged_steps(out)
        if committed and done and max(done) > min(committed):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter").exists(), "the run finished before it was killed"
    latest = checkpoint.Checkpointer(ckpt, keep=3).latest_step()
    assert latest is not None and latest < steps
    return latest


def _data_state(out: Path, step: int) -> dict:
    ckpt = checkpoint.Checkpointer(out / "checkpoints", keep=3)
    try:
        return ckpt.read_meta(step)["data_state"]
    finally:
        ckpt.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["streamed_shards", "mixture"])
def test_stream_killed_and_resumed_equals_uninterrupted(assets, stream_files, tmp_path, kind):
    """Parquet shards streamed (max_examples=60 of 96, so the run goes through several
    reshuffled epochs), or a weighted 2-source mixture (the shards as alpaca, weight 3; the text
    file as text, weight 1): the run killed with SIGKILL after a checkpoint and resumed ends
    with the losses, adapter and data position of an uninterrupted run, bit for bit. (64 steps
    of ~20 ms, a checkpoint every 16: the kill lands well before the end.)"""
    steps = 64
    data = (
        [f"data.path={stream_files['shards']}", "data.streaming=true", "data.max_examples=60"]
        if kind == "streamed_shards"
        else [
            "data.path=null",
            f"data.sources=[{{path: {stream_files['shards']}, weight: 3}}, "
            f"{{path: {stream_files['texts']}, weight: 1, format: text, text_field: body}}]",
        ]
    )
    common = [
        *data,
        "data.shuffle_buffer=16",
        "quant.type=none",
        f"train.max_steps={steps}",
        "train.save_every=16",
        "train.eval_every=0",
        "train.exact_match_examples=0",
    ]
    ref = tmp_path / "ref"
    assert train.main(_args(assets, ref, *common)) == 0
    out = tmp_path / "killed"
    _kill_after_a_checkpoint(_args(assets, out, *common), out, steps)
    assert train.main(_args(assets, out, *common, "train.resume=true")) == 0

    got, want = _metrics(out), _metrics(ref)
    assert [r["step"] for r in got] == list(range(1, steps + 1))  # no gap, no duplicate
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    a, b = _adapter(out), _adapter(ref)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    state = _data_state(out, steps)
    assert state == _data_state(ref, steps)
    if kind == "streamed_shards":
        (source,) = state["sources"]
        assert source["epoch"] >= 1  # 60 records are an epoch: the run went on past the first
    else:  # each example came from the shards with probability 3/4 (see test_streams' bound)
        n = sum(s["examples"] for s in state["sources"])
        shards = state["sources"][0]["examples"]
        assert abs(shards - 0.75 * n) <= 5 * np.sqrt(n * 0.75 * 0.25), state
