"""The README's demo, end to end: the default run, then the README's ``generate`` command asks
the trained adapter a held-out question and prints exactly what the README shows — the answer
the held-out data holds."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from jaxlora.generate import main as generate_main

ROOT = Path(__file__).resolve().parents[1]


def _readme_generate() -> tuple[list[str], str]:
    """(arguments of the README's demo generate command, the output the README shows)."""
    text = (ROOT / "README.md").read_text()
    found = re.search(
        r"```bash\n(python -m jaxlora\.generate model=assets/demo/base [^\n]*)\n```\n\n"
        r"prints[^\n]*\n\n```\n(.*?)```",
        text,
        re.S,
    )
    assert found, "README.md: the demo's generate command and its output block"
    return shlex.split(found.group(1))[3:], found.group(2)


@pytest.mark.slow
@pytest.mark.xdist_group("demo")
def test_readme_generate_answers_the_held_out_question_as_shown(demo_run, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the command's paths are relative to the repository root
    run = demo_run  # `python -m jaxlora.train output_dir=...` (tests/conftest.py)
    argv, shown = _readme_generate()
    assert "adapter=runs/demo/adapter" in argv
    argv = [f"adapter={run / 'adapter'}" if a.startswith("adapter=") else a for a in argv]
    capsys.readouterr()
    assert generate_main(argv) == 0
    assert capsys.readouterr().out == shown
    (question,) = [a.removeprefix("prompt=") for a in argv if a.startswith("prompt=")]
    held_out = ROOT / "assets" / "demo" / "data" / "eval.jsonl"
    records = [json.loads(line) for line in held_out.read_text().splitlines()]
    (answer,) = [r["output"] for r in records if r["instruction"] == question and not r["input"]]
    assert shown == f"### {question}\n{answer}\n"
