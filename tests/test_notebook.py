"""The Colab notebook, executed end to end on CPU against the shipped demo model and data.

The notebook's ``parameters`` cell is followed by an injected cell (papermill's convention) that
points it at ``assets/demo``, a few steps, no pip install and a temporary output directory. The
kernel is this interpreter, through a kernelspec written to a temporary directory, so the test
never picks up another Python that happens to be registered as ``python3``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "qlora_colab_tpu.ipynb"
DEMO = ROOT / "assets" / "demo"


def _kernel_manager(kernels: Path):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = kernels / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "jaxlora test kernel",
                "language": "python",
            }
        )
    )
    ksm = KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)
    return KernelManager(kernel_name="python3", kernel_spec_manager=ksm)


def _inject(nb, params: dict) -> None:
    """Insert a cell assigning ``params`` right after the cell tagged ``parameters``."""
    import nbformat

    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(tagged[0] + 1, cell)


def test_notebook_structure():
    """Every code cell has a markdown cell before it; TPU-only cells have an else branch."""
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert i > 0 and nb.cells[i - 1].cell_type == "markdown", f"code cell {i} unexplained"
            assert not cell.outputs, f"code cell {i} has committed outputs"
            if "if ON_TPU:" in cell.source:
                assert "\nelse:" in cell.source, f"cell {i}: TPU-only branch without an else"
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    for name in ("INSTALL", "MODEL", "DATASET", "OUTPUT_DIR", "MAX_STEPS", "PUSH_TO_HUB"):
        assert f"\n{name} = " in "\n" + params.source, f"parameters cell lacks {name}"
    assert "PUSH_TO_HUB = False" in params.source, "push_to_hub must be off by default"


@pytest.mark.slow
def test_notebook_runs_on_cpu_with_the_demo(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    if not (DEMO / "base" / "config.json").is_file():
        pytest.fail(f"the demo model is missing: {DEMO / 'base'} (build it with tools/)")
    samples = json.loads((DEMO / "data" / "sample_prompts.json").read_text())
    nb = nbformat.read(NOTEBOOK, as_version=4)
    out = tmp_path / "run"
    _inject(
        nb,
        {
            "INSTALL": False,
            "MODEL": str(DEMO / "base"),
            "DATASET": str(DEMO / "data" / "train.jsonl"),
            "EVAL_PATH": str(DEMO / "data" / "eval.jsonl"),
            "EXACT_MATCH_EXAMPLES": 3,
            "OUTPUT_DIR": str(out),
            "MAX_STEPS": 3,
            "MAX_SEQ_LEN": 128,
            "BATCH_SIZE": 4,
            "GRAD_ACCUM": 1,
            "LORA_R": 8,
            "LORA_ALPHA": 16,
            "LEARNING_RATE": 2e-3,
            "OVERRIDES": ["train.eval_every=2", "train.log_every=1"],
            "PROMPTS": [r["instruction"] for r in samples[:2]],  # held-out demo questions
            "MAX_NEW_TOKENS": 8,
            "EXPORT_MERGED": True,
            "MERGED_DTYPE": "float32",
            "PUSH_TO_HUB": False,
        },
    )
    client = NotebookClient(
        nb,
        km=_kernel_manager(tmp_path / "kernels"),
        timeout=600,
        resources={"metadata": {"path": str(ROOT)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error

    text = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "skipped: not a TPU runtime" in text  # the TPU-only cell explains itself on CPU
    assert "skipped: no planning target" in text  # so does the plan cell
    assert "CPU runtime: computing in float32" in text
    assert "max |logit difference|" in text  # the merged model was checked in transformers
    assert "PUSH_TO_HUB = False: not uploading" in text
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
    assert (out / "merged" / "config.json").is_file()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
