"""What a careful practitioner watches while training: metrics, a progress bar, and warnings.

* ``output_dir/metrics.jsonl``: one JSON object per logged step (step, loss, lr, grad_norm,
  tokens_per_sec, step_time, peak_memory_bytes where the backend reports it; eval_loss on eval
  steps). Written by process 0 only, appended and flushed line by line; on resume, lines past
  the restored step are dropped so the file has no gap and no duplicate step.
* TensorBoard event files in ``output_dir/tb``.
* Warnings with advice (TUNING.md): non-finite loss, gradient-norm spikes, eval loss rising while
  train loss falls (overfitting).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import jax

log = logging.getLogger("jaxlora.train")

NONFINITE_ADVICE = (
    "lower train.lr (LoRA 1e-4–5e-4, QLoRA 5e-5–2e-4), keep train.max_grad_norm=1.0, "
    "prefer bfloat16 over float16, lower lora.alpha, and check the data for empty or "
    "garbage examples"
)


def peak_memory_bytes() -> int | None:
    """Peak device memory in use on the first local device, where the backend reports it."""
    stats = jax.local_devices()[0].memory_stats()
    if not stats:
        return None
    return stats.get("peak_bytes_in_use")


class Monitor:
    """Sinks for metrics (jsonl, TensorBoard, progress bar) and the training-health warnings."""

    def __init__(
        self, output_dir: Path, total_steps: int, start_step: int = 0, enabled: bool = True
    ):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._grad_ema: float | None = None
        self._train_ema: float | None = None
        self._evals: list[tuple[float, float]] = []  # (eval_loss, train_ema) at each eval
        self.warnings: list[str] = []
        if not enabled:
            self._tb = self._bar = None
            return
        self._truncate_after(start_step)
        from tensorboardX import SummaryWriter
        from tqdm.auto import tqdm

        self._tb = SummaryWriter(str(Path(output_dir) / "tb"))
        self._bar = tqdm(
            total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
        )

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line.strip()]
        keep = [line for line in keep if json.loads(line)["step"] <= step]
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
        for k, v in record.items():
            if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        self._tb.flush()
        shown = {
            k: record[k]
            for k in ("loss", "eval_loss", "lr", "grad_norm", "loss_scale")
            if k in record
        }
        self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)

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
