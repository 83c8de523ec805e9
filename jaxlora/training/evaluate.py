"""Held-out measures: eval loss, exact-match accuracy of greedy answers, sample generations.

The train loop uses these to print what a fine-tune achieved: the same measures on the same
held-out examples before the first step and after the last.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlora import data, lora
from jaxlora.sampling import generate


def eval_loss(eval_step, trainable, frozen, ds, batch_size: int) -> float | None:
    """Token-weighted mean cross-entropy over a whole packed dataset (``None`` without one)."""
    if ds is None:
        return None
    total, count = 0.0, 0.0
    it = data.batches(ds, batch_size, shuffle=False, drop_last=False, repeat=False)
    for batch in it:
        s, n = jax.device_get(eval_step(trainable, frozen, batch))
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)


def prompts_and_answers(cfg_data, limit: int) -> tuple[list[data.Prompt], list[str]]:
    """The first ``limit`` held-out records as (prompt, reference answer). A prompt is the
    conversation up to the answer, rendered by the run's chat template when sampled
    (:mod:`jaxlora.data.prompts`: for ``alpaca`` data, the Alpaca template)."""
    records = data.load_records(cfg_data)
    prompts: list[data.Prompt] = []
    answers: list[str] = []
    for rec in records.select(range(min(limit, len(records)))):
        if cfg_data.format == "alpaca":
            instruction = rec[cfg_data.instruction_field]
            prompts.append(data.user_prompt(instruction, rec.get(cfg_data.input_field)))
            answers.append(rec[cfg_data.output_field])
        elif cfg_data.format in data.CHAT_FORMATS:
            msgs = data.conversation(rec, cfg_data)
            turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
            if not turns:
                raise data.DataError(
                    f"{cfg_data.path}: record {len(answers) + 1} has no assistant turn to "
                    "score exact match against"
                )
            prompts.append(msgs[: turns[-1]])
            answers.append(msgs[turns[-1]]["content"])
        else:
            raise ValueError(
                "exact match needs question/answer records (data.format alpaca, chat or sharegpt)"
            )
    return prompts, answers


def exact_match(
    model, prompts: Sequence[str], answers: Sequence[str], max_new_tokens: int, batch_size: int = 32
) -> tuple[float, list[str]]:
    """Fraction of greedy completions equal to the reference after stripping whitespace."""
    outs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        outs += generate(model, list(prompts[i : i + batch_size]), max_new_tokens=max_new_tokens)
    hits = [o.strip() == a.strip() for o, a in zip(outs, answers, strict=True)]
    return float(np.mean(hits)) if hits else float("nan"), outs


def format_prompt(cfg_data, instruction: str) -> data.Prompt:
    """A user prompt as the model saw prompts in training: a one-turn conversation (rendered by
    the run's chat template) for ``alpaca`` and ``chat`` data, the raw text for ``text``."""
    if cfg_data.format == "text":
        return instruction
    return data.user_prompt(instruction)


def print_samples(model, cfg, write: Callable, step: int) -> None:
    """Greedy answers to the recipe's ``train.sample_prompts``, formatted like the training data."""
    t = cfg.train
    prompts = [format_prompt(cfg.data, p) for p in t.sample_prompts]
    outs = generate(model, prompts, max_new_tokens=t.sample_max_new_tokens)
    for prompt, text in zip(t.sample_prompts, outs, strict=True):
        write(f"[sample @ step {step}] {prompt!r} -> {text!r}")


class Report:
    """Measures the model on held-out data at construction (before) and in ``finish`` (after)."""

    def __init__(self, cfg, model, frozen, trainable, loss_fn: Callable[[Any], float | None]):
        self.cfg, self.model, self.frozen, self.loss_fn = cfg, model, frozen, loss_fn
        self.n = cfg.train.exact_match_examples
        self.prompts: list[data.Prompt] = []
        self.answers: list[str] = []
        if self.n and cfg.data.eval_path:
            held = data.held_out(cfg.data)
            self.prompts, self.answers = prompts_and_answers(held, self.n)
        self.before = self._measure(trainable)

    def _measure(self, trainable) -> dict[str, Any]:
        out: dict[str, Any] = {"eval_loss": self.loss_fn(trainable)}
        if self.prompts:
            model = self.model.replace(params=lora.combine(self.frozen, trainable))
            t = self.cfg.train
            out["exact_match"], out["outputs"] = exact_match(
                model, self.prompts, self.answers, t.sample_max_new_tokens, t.batch_size
            )
        return out

    def finish(self, trainable, print_it: bool = True) -> dict[str, Any]:
        after = self._measure(trainable)
        rows = [("eval loss", self.before["eval_loss"], after["eval_loss"])]
        if self.prompts:
            rows.append(("exact match", self.before["exact_match"], after["exact_match"]))
        summary = {
            "before": {k: v for k, v in self.before.items() if k != "outputs"},
            "after": {k: v for k, v in after.items() if k != "outputs"},
        }
        if print_it:
            print(f"\nheld-out results ({len(self.prompts) or 'val'} examples):")
            print(f"  {'measure':<12} {'before':>10} {'after':>10}")
            for name, b, a in rows:
                if b is not None:
                    print(f"  {name:<12} {b:>10.4f} {a:>10.4f}")
            for p, ref, b, a in list(
                zip(
                    self.prompts,
                    self.answers,
                    self.before.get("outputs", []),
                    after.get("outputs", []),
                    strict=False,
                )
            )[:3]:
                text = data.render_prompt(self.model.tokenizer, p)
                print(
                    f"\n--- prompt ---\n{text}\n--- reference: {ref!r}\n"
                    f"--- before:    {b!r}\n--- after:     {a!r}"
                )
            out = Path(self.cfg.output_dir) / "report.json"
            out.write_text(json.dumps(summary, indent=2))
        return summary
