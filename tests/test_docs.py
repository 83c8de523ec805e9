"""The user docs agree with the code: the generated key reference is current, and every command and
jaxlora call in README.md, docs/ and the notebook exists (tools/check_docs.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def check_docs():
    return _tool("check_docs")


def test_recipes_md_is_generated_from_the_config():
    gen = _tool("gen_recipe_docs")
    committed = (ROOT / "docs" / "recipes.md").read_text()
    assert committed == gen.render(), (
        "docs/recipes.md is stale: run python tools/gen_recipe_docs.py"
    )


def test_recipes_md_documents_every_key():
    from jaxlora.config import Config
    from jaxlora.config.typed import all_keys

    text = (ROOT / "docs" / "recipes.md").read_text()
    for key in all_keys(Config):
        assert f"| `{key}` |" in text, key


def test_every_documented_command_and_call_exists(check_docs):
    problems = [p for path in check_docs.default_paths() for p in check_docs.check_file(path)]
    assert problems == []


def test_check_docs_finds_bad_commands(check_docs, tmp_path):
    bad = tmp_path / "bad.md"
    bad.write_text(
        "```bash\n"
        "python -m jaxlora.train recipe=llama_qlora lora.rank=8\n"  # no such key
        "python -m jaxlora.train train.lr=-1 \\\n  output_dir=x\n"  # out of range, continued
        "python -m jaxlora.train recipe=no_such_recipe\n"
        "python -m jaxlora.train lora.r=$R train.max_stpes=$N\n"  # placeholder value, bad key
        "gcloud compute tpus tpu-vm ssh t --worker=all --command 'python -m jaxlora.nope'\n"
        "python -m jaxlora.generate model=m prompt=hi max_new_tokenz=3\n"
        "python -m jaxlora.export checkpoint=<run> format=onnx out=x\n"
        "python -m jaxlora.export checkpoint=runs/a format=merged out=<dir> dtype=bfloat16\n"
        "python -m jaxlora.train recipe=demo train.max_steps=3 lora.r=$R\n"  # fine
        "```\n"
    )
    problems = check_docs.check_file(bad)
    assert len(problems) == 7, problems
    for needle in (
        "lora.rank",
        "train.lr",
        "no_such_recipe",
        "train.max_stpes",
        "jaxlora.nope",
        "max_new_tokenz",
        "onnx",
    ):
        assert sum(needle in p for p in problems) == 1, (needle, problems)


def test_check_docs_finds_bad_python(check_docs):
    code = (
        "import jaxlora\n"
        "from jaxlora.config import load_config, no_such_name\n"
        "model = jaxlora.load_model('x', dtype='bfloat16', quantize='nf4')\n"
        "cfg = load_config('demo', ['lora.r=8'])\n"
        "jaxlora.missing_fn()\n"
        "jaxlora.nomodule.fn()\n"
        "model = jaxlora.load_model('x')\n"  # annotated -> Model: its methods are checked
        "model.save_merged('out', dtyp='bfloat16')\n"
        "print(model.tokenizer, model.params, model.no_such_attr)\n"
        "model = object()\n"  # rebound to something unknown: no longer checked
        "model.anything()\n"
    )
    problems = check_docs.check_python(code)
    assert len(problems) == 6, problems
    assert any("nomodule" in p for p in problems)
    assert any("'dtyp'" in p for p in problems)
    assert any("no_such_attr" in p for p in problems)
    assert any("no_such_name" in p for p in problems)
    assert any("'quantize'" in p for p in problems)
    assert any("missing_fn" in p for p in problems)


def test_planning_tables_are_rendered_from_the_raw_rows():
    """docs/planning.md's tables are exactly what tools/plan_table.py renders from
    assets/plans/plans.jsonl: a row compiled but not rendered, or a figure edited by hand, fails."""
    plan_table = _tool("plan_table")
    rows = [
        json.loads(line)
        for line in (ROOT / "assets" / "plans" / "plans.jsonl").read_text().splitlines()
    ]
    committed = (ROOT / "docs" / "planning.md").read_text()
    assert committed == plan_table.write_blocks(committed, rows), (
        "docs/planning.md's tables are stale: run python tools/plan_table.py "
        "--out assets/plans/plans.jsonl --write docs/planning.md"
    )


def test_plan_table_refuses_a_file_without_its_markers(tmp_path):
    plan_table = _tool("plan_table")
    with pytest.raises(SystemExit, match="plan_table.py: matrix"):
        plan_table.write_blocks("# no generated blocks here\n", [])


def test_a_search_row_stands_for_the_row_it_compiled_first():
    """A ``--search batch`` row without its micro-batch-1 row: the search's first compile (one
    row per device, the same step) fills the memory cells, its largest micro-batch the rest;
    where nothing fits, the first plan says so and the largest is 0."""
    plan_table = _tool("plan_table")
    GiB = 2**30

    def plan(mb, total, fits=True):
        per_device = {"total_bytes": total, "device_bytes": 16 * GiB, "fits": fits}
        return {"micro_batch": mb, "per_device": per_device, "flops_source": "unknown"}

    def row(target, largest, first, best):
        tried = [{"micro_batch": 1, "total_bytes": 5 * GiB, "fits": True, "cpu_s": 42.0}]
        search = {"largest_micro_batch": largest, "tried": tried, "first": first}
        key = {"model": "Llama-3.1-8B", "quant": "qlora", "seq": 2048, "layers": None}
        return (
            key
            | {"target": target, "scan": "auto", "search": "batch", "cpu_s": 300.0}
            | {"plan": best | {"search": search}}
        )

    def limited(target, largest):  # every micro-batch compiled fitted, up to the limit
        found = row(target, largest, plan(1, 5 * GiB), plan(largest, 6 * GiB))
        found["plan"]["search"]["tried"].append(
            {"micro_batch": largest, "total_bytes": 6 * GiB, "fits": True, "cpu_s": 40.0}
        )
        return found

    rows = [
        row("l4-1", 3, plan(1, 5 * GiB), plan(3, 14 * GiB)),
        row("t4-1", 0, plan(1, None, fits=False), plan(1, None, fits=False)),
        limited("h100-1", 1024),
    ]
    rows[0]["plan"]["search"]["tried"].append(
        {"micro_batch": 4, "total_bytes": 17 * GiB, "fits": False, "cpu_s": 40.0}
    )
    matrix = plan_table.render_matrix(rows)
    assert "| 5.0 ✓ mb 3 |" in matrix and "| OOM ✗ mb 0 |" in matrix
    assert "| 5.0 ✓ mb ≥1024 |" in matrix  # a lower bound, not the boundary
    table = plan_table.render(rows)
    assert "| l4-1 | 5.00 (16.00) | 68.8 % | yes | 3 | — | 42 |" in table
    assert "| t4-1 | does not fit" in table


def test_a_row_of_one_per_device_that_does_not_fit_answers_the_search():
    """Without a search, a micro-batch-1 row (one row per device) that does not fit, or that
    the compiler refused, is the search's answer (largest 0): the search would compile that
    same step first and stop. A larger micro-batch's row, a row that fits and a † row do not
    answer it."""
    plan_table = _tool("plan_table")
    old = sorted(plan_table.FACTORS_WHOLE)[0]
    key = {"model": "Llama-3.1-8B", "quant": "lora", "seq": 2048, "layers": None}

    def row(target, mb, total, fits, devices=1, commit="20f55d1"):
        per_device = {"total_bytes": total, "device_bytes": 2**34, "fits": fits}
        mesh = {"data": 1, "fsdp": devices, "tensor": 1}
        plan = {"micro_batch": mb, "mesh": mesh, "per_device": per_device}
        extra = {"scan": "auto", "search": "none", "cpu_s": 1.0, "commit": commit}
        return key | {"target": target, "plan": plan | {"flops_source": "unknown"}} | extra

    rows = [
        row("t4-1", 1, 2**35, False),  # over the device: mb 0
        row("tpu-v5e-1", 1, None, False),  # refused by the compiler: mb 0
        row("tpu-v5e-8", 8, 2**34, False, devices=8),  # one row on each of 8: mb 0
        row("l4-1", 2, 2**35, False),  # two rows: one might fit
        row("h100-1", 1, 2**32, True),  # fits: the largest is unknown
        row("tpu-v4-8", 8, 2**34, False, devices=8, commit=old),  # †: out of date
    ]
    cols = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in plan_table.render(rows).splitlines()
    ]
    cells = {c[3]: c[7] for c in cols[2:]}  # target: largest mb
    assert cells["t4-1"] == cells["tpu-v5e-1"] == cells["tpu-v5e-8"] == "0"
    assert cells["l4-1"] == cells["h100-1"] == cells["tpu-v4-8"] == "—"
    matrix = plan_table.render_matrix(rows)
    assert "OOM ✗ mb 0" in matrix and "32.0 ✗ mb 0" in matrix and "16.0 ✗ † |" in matrix


def test_multi_device_rows_from_before_the_factor_split_are_marked():
    """Rows of a mesh compiled before LoRA factors were split over fsdp (plan_table's
    FACTORS_WHOLE commits) overstate the per-device bytes: both tables mark them "†";
    one-device rows of those commits, and rows of later commits, are not marked."""
    plan_table = _tool("plan_table")
    old = sorted(plan_table.FACTORS_WHOLE)[0]
    per_device = {"total_bytes": 2**32, "device_bytes": 2**34, "fits": True}
    key = {"model": "Llama-3.1-8B", "quant": "qlora", "seq": 2048, "layers": None}

    def row(target, commit):
        plan = {"micro_batch": 1, "per_device": per_device, "flops_source": "unknown"}
        extra = {"scan": "auto", "search": "none", "cpu_s": 1.0, "commit": commit}
        return key | {"target": target, "plan": plan} | extra

    rows = [row("tpu-v5e-8", old), row("tpu-v5e-1", old), row("h100-8", "20f55d1")]
    matrix = plan_table.render_matrix(rows)
    assert "| 4.0 ✓ | 4.0 ✓ † |" in matrix  # tpu-v5e-1, then tpu-v5e-8
    assert "| 4.0 ✓ |" in matrix.split("`h100-1`")[1]
    table = plan_table.render(rows).splitlines()
    marked = [line.split(" | ")[3] for line in table if "†" in line]
    assert marked == ["tpu-v5e-8"]
