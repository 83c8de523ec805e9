"""What a careful practitioner watches while training: metrics, a progress bar, and warnings.

* ``output_dir/metrics.jsonl``: one JSON object per logged step (step, loss, lr, grad_norm,
  tokens_per_sec, step_time; memory_bytes and peak_memory_bytes where the device reports them
  (accelerators; not the CPU); eval_loss on eval steps). Written by process 0 only, appended
  and flushed line by line; on resume, lines past the restored step, and a last line a kill cut
  short, are dropped so the file has no gap and no duplicate step.
* TensorBoard event files in ``output_dir/tb`` and a Weights & Biases run in ``output_dir/wandb``,
  where ``train.report_to`` lists them: the same scalars at the same steps as metrics.jsonl
  (``WANDB_MODE=offline`` keeps the run on disk for ``wandb sync``). Only process 0 reports.
* Warnings with advice (TUNING.md): non-finite loss, gradient-norm spikes, eval loss rising while
  train loss falls (overfitting), device-memory headroom under 10 % (the guides keep 10–20 %).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from jaxlora.config import Config, ConfigError
from jaxlora.config.typed import to_plain
from jaxlora.training.checkpoint import ResumeError

log = logging.getLogger("jaxlora.train")

NONFINITE_ADVICE = (
    "lower train.lr (LoRA 1e-4–5e-4, QLoRA 5e-5–2e-4), keep train.max_grad_norm=1.0, "
    "prefer bfloat16 over float16, lower lora.alpha, and check the data for empty or "
    "garbage examples"
)


MEMORY_ADVICE = (
    "lower train.batch_size and raise train.grad_accum by the same factor (same effective "
    "batch), set train.remat=full, lower train.loss_chunk, or move memory off the device: "
    "activations and optimizer state to host memory (train.remat=offload, "
    "train.optimizer_offload=host) or optimizer state in 8 bits (train.optimizer=adamw_8bit)"
)
MIN_HEADROOM = 0.10  # below this fraction of device memory free, warn (the guides keep 10–20 %)

MemoryStats = Callable[[], Mapping[str, int] | None]


def require_sinks(report_to: Sequence[str]) -> None:
    """Refuse, before any work, a ``train.report_to`` whose sink's package is not installed."""
    if "wandb" in report_to and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "train.report_to includes wandb, but the wandb package is not installed: "
            "pip install 'jaxlora[wandb]' (or drop wandb from train.report_to)"
        )


def wandb_args(cfg: Config) -> dict[str, Any]:
    """``wandb.init`` arguments: the run is named for its output directory and carries the
    resolved config, so a dashboard row says exactly what ran."""
    return {
        "project": cfg.train.wandb_project,
        "name": cfg.train.wandb_name or Path(cfg.output_dir).name,
        "config": to_plain(cfg),
        "dir": str(cfg.output_dir),
    }


def device_memory_stats() -> Mapping[str, int] | None:
    """The first local device's allocator statistics (``bytes_in_use``, ``peak_bytes_in_use``,
    ``bytes_limit``), or ``None`` where the backend keeps none (the CPU)."""
    return jax.local_devices()[0].memory_stats()


class Monitor:
    """Sinks for metrics (jsonl, TensorBoard, wandb, progress bar) and the training-health
    warnings. ``report_to`` picks the sinks besides metrics.jsonl (always written);
    ``wandb_init`` holds ``wandb.init``'s arguments (:func:`wandb_args`)."""

    def __init__(
        self,
        output_dir: Path,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        memory_stats: MemoryStats = device_memory_stats,
        report_to: Sequence[str] = ("jsonl", "tensorboard"),
        wandb_init: Mapping[str, Any] | None = None,
    ):
        self.enabled = enabled
        self._memory_stats = memory_stats
        self._memory_warned = False
        self.path = Path(output_dir) / "metrics.jsonl"
        self._grad_ema: float | None = None
        self._train_ema: float | None = None
        self._evals: list[tuple[float, float]] = []  # (eval_loss, train_ema) at each eval
        self.warnings: list[str] = []
        self._tb = self._bar = self._wandb = None
        if not enabled:
            return
        self._truncate_after(start_step)
        from tqdm.auto import tqdm

        if "tensorboard" in report_to:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(output_dir) / "tb"))
        if "wandb" in report_to:
            require_sinks(report_to)
            import wandb

            self._wandb = wandb.init(**(wandb_init or {"dir": str(output_dir)}))
        self._bar = tqdm(
            total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
        )

    def _truncate_after(self, step: int) -> None:
        """Drop the lines a killed run wrote past the checkpoint it resumes from, and a last
        line it was still writing (no newline yet, or cut short: not JSON). Any other line that
        is not JSON is damage this does not guess at: an error naming the line, the file left
        as it is."""
        if not self.path.exists():
            return
        text = self.path.read_text()
        lines = text.splitlines()
        if lines and not text.endswith("\n"):
            lines.pop()  # the write a kill interrupted
        keep = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ResumeError(
                    f"{self.path}, line {i}: not JSON ({e.msg}); the run's metrics record is "
                    "damaged: repair or move the file to resume"
                ) from None
            if record["step"] <= step:
                keep.append(line)
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, record: dict[str, Any]) -> None:
        """Append one step's metrics everywhere and run the health checks on it."""
        step = record["step"]
        record = {k: (float(v) if hasattr(v, "item") else v) for k, v in record.items()}
        self._check(record)
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {
            k: v
            for k, v in record.items()
            if k != "step" and isinstance(v, int | float) and math.isfinite(v)
        }
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        shown = {
            k: record[k]
            for k in ("loss", "eval_loss", "lr", "grad_norm", "loss_scale")
            if k in record
        }
        postfix = {k: f"{v:.3g}" for k, v in shown.items()}
        if "memory_bytes" in record:
            postfix["mem"] = f"{record['memory_bytes'] / 2**30:.1f}G"
            postfix["peak"] = f"{record['peak_memory_bytes'] / 2**30:.1f}G"
        self._bar.set_postfix(postfix, refresh=False)

    def memory(self, step: int) -> dict[str, int]:
        """Device memory in use and its peak so far, for this step's record (``{}`` where the
        device keeps no statistics); warns once, with advice, when the peak leaves less than
        :data:`MIN_HEADROOM` of the device's memory free."""
        stats = self._memory_stats()
        if not stats:
            return {}
        used, peak = int(stats["bytes_in_use"]), int(stats["peak_bytes_in_use"])
        limit = stats.get("bytes_limit")
        if limit and not self._memory_warned and 1 - peak / limit < MIN_HEADROOM:
            self._memory_warned = True
            self.warn(
                f"step {step}: device memory peaked at {peak / 2**30:.2f} of "
                f"{limit / 2**30:.2f} GiB ({100 * (1 - peak / limit):.1f} % headroom, under "
                f"{100 * MIN_HEADROOM:.0f} %): the next longer batch may run out. "
                f"To free memory: {MEMORY_ADVICE}"
            )
        return {"memory_bytes": used, "peak_memory_bytes": peak}

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def write(self, text: str) -> None:
        """Print above the progress bar (process 0 only)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text)

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        if self.enabled:
            log.warning(text)

    def _check(self, r: dict[str, Any]) -> None:
        step, loss, gnorm = r["step"], r.get("loss"), r.get("grad_norm")
        if gnorm is not None and math.isfinite(gnorm):
            if self._grad_ema is not None and step > 10 and gnorm > 10 * self._grad_ema:
                self.warn(
                    f"step {step}: gradient-norm spike {gnorm:.3g} (10x its running mean "
                    f"{self._grad_ema:.3g}); if the loss jumps too, lower train.lr or lora.alpha "
                    "and keep train.max_grad_norm=1.0"
                )
            self._grad_ema = gnorm if self._grad_ema is None else 0.9 * self._grad_ema + 0.1 * gnorm
        if loss is not None and math.isfinite(loss):
            self._train_ema = (
                loss if self._train_ema is None else 0.9 * self._train_ema + 0.1 * loss
            )
        if "eval_loss" in r and self._train_ema is not None:
            self._evals.append((r["eval_loss"], self._train_ema))
            if len(self._evals) >= 3:
                (e0, t0), (e1, t1), (e2, t2) = self._evals[-3:]
                if e2 > e1 > e0 and t2 < t1 < t0:
                    self.warn(
                        f"step {step}: eval loss rose twice in a row ({e0:.4g} -> {e1:.4g} -> "
                        f"{e2:.4g}) while train loss fell: overfitting. Use the checkpoint with "
                        "the lowest eval loss; train fewer epochs, raise lora.dropout (0.05–0.1), "
                        "lower lora.r, or add more (or more general) data"
                    )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
