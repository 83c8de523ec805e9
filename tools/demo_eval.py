"""Fact recall of the demo base: greedy continuations of plain-text probes, scored per attribute.

Used by ``tools/make_demo.py`` to check what the freshly pretrained base knows, in the
plain-text form it was trained on (:func:`fact_probes`, :func:`fact_recall`). Generation is
jaxlora's own :func:`jaxlora.sampling.generate` (batched, left-padded, KV-cached), the path the
commands and the train loop's evaluation use.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxlora.model import Model
from jaxlora.sampling import generate
from tools.demo_world import Person


def greedy_generate(
    model: Model, prompts: Sequence[str], max_new_tokens: int = 16, batch_size: int = 64
) -> list[str]:
    """Greedy continuations of ``prompts`` (BOS prepended by the tokenizer), cut at EOS, decoded;
    ``batch_size`` prompts per :func:`jaxlora.sampling.generate` call."""
    outs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        outs += generate(model, chunk, max_new_tokens=max_new_tokens)
    return outs


def accuracy_by_task(tasks: Sequence[str], hits: Sequence[bool]) -> dict[str, float]:
    """Fraction of ``hits`` per task name and over ``"all"``."""
    groups: dict[str, list[bool]] = {"all": list(hits)}
    for task, hit in zip(tasks, hits, strict=True):
        groups.setdefault(task, []).append(hit)
    return {k: round(float(np.mean(v)), 4) for k, v in sorted(groups.items())}


def fact_probes(people: Sequence[Person]) -> list[tuple[str, str, str]]:
    """Plain-text probes (attribute, prompt, answer) in the pretraining phrasing, per person."""
    out = []
    for p in people:
        out.append(("town", f"{p.name} lives in", f" {p.town}."))
        out.append(("job", f"The job of {p.name} is", f" {p.job}."))
        out.append(("pet", f"{p.name} has a pet", f" {p.pet}."))
        out.append(("colour", f"The favourite colour of {p.name} is", f" {p.colour}."))
    return out


def fact_recall(model: Model, people: Sequence[Person]) -> dict[str, float]:
    """Accuracy of greedy continuations of :func:`fact_probes`, per attribute and overall.

    A probe passes when the continuation starts with the answer (the text runs on after it).
    """
    probes = fact_probes(people)
    gens = greedy_generate(model, [p for _, p, _ in probes], max_new_tokens=6)
    hits = [g.startswith(ans) for (_, _, ans), g in zip(probes, gens, strict=True)]
    return accuracy_by_task([t for t, _, _ in probes], hits)
