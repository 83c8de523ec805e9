"""Examples -> fixed-size rows of tokens -> batches, with a checkpointable iterator.

An :class:`Example` is one tokenized training example: ``tokens`` int32 ``[n]`` (BOS, text,
EOS) and ``trained`` bool ``[n]`` (token ``i`` is a loss target). The model reads
``tokens[:-1]`` and predicts ``tokens[1:]``: the shift happens per example, so a target never
crosses into the next example and every example fills ``n - 1`` positions of a row.

Packing puts several examples into one row of ``seq_len`` positions (best-fit decreasing: each
example, longest first, goes into the fullest row that still has room). An example is never
split across rows. Without packing each row holds one example.

A batch is a dict of numpy arrays, all ``[B, S]`` with ``S = seq_len``:

* ``input_ids``  int32: ``tokens[:-1]`` of each example, back to back; padding ``pad_id``.
* ``targets``    int32: ``tokens[1:]`` at the same positions (``targets[t]`` is the token that
  follows ``input_ids[t]`` in the same example); padding ``pad_id``.
* ``loss_mask``  float32: 1 where ``targets[t]`` is trained (a response token, EOS), else 0
  (prompt tokens, padding).
* ``segment_ids`` int32: 1, 2, 3, ... per example in the row, 0 for padding. Attention is
  allowed only between equal, non-zero segment ids (and causally).
* ``positions``  int32: restart at 0 for every example (RoPE positions); 0 for padding.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


class DataError(ValueError):
    """Data that cannot be turned into training batches; the message says where and why."""


@dataclass(frozen=True, eq=False)
class Example:
    """One tokenized example: ``tokens`` int32 [n], ``trained`` bool [n] (``trained[0]`` False)."""

    tokens: np.ndarray
    trained: np.ndarray

    @property
    def length(self) -> int:
        """Positions the example fills in a row: ``n - 1`` (the last token is only a target)."""
        return len(self.tokens) - 1


def pack(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: example indices grouped into rows of ``seq_len``.

    Deterministic: ties keep input order. Rows are listed in creation order.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted: the first fit is the best fit
    for i in order:
        n = lengths[i]
        if not 0 < n <= seq_len:
            raise ValueError(f"example {i} fills {n} positions; rows hold 1..{seq_len}")
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([i])
            row, left = len(rows) - 1, seq_len - n
        else:
            room, row = free.pop(k)
            rows[row].append(i)
            left = room - n
        if left > 0:
            bisect.insort(free, (left, row))
    return rows


@dataclass(frozen=True, eq=False)
class PackedDataset:
    """Examples arranged into rows of ``seq_len`` positions; ``rows[r]`` lists example indices."""

    examples: Sequence[Example]
    rows: Sequence[Sequence[int]]
    seq_len: int
    pad_id: int = 0

    @classmethod
    def build(
        cls, examples: Sequence[Example], seq_len: int, packing: bool, pad_id: int = 0
    ) -> PackedDataset:
        """Pack ``examples`` (each at most ``seq_len + 1`` tokens) into rows."""
        lengths = [ex.length for ex in examples]
        rows = pack(lengths, seq_len) if packing else [[i] for i in range(len(examples))]
        return cls(examples, rows, seq_len, pad_id)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_trained_tokens(self) -> int:
        return int(sum(ex.trained[1:].sum() for ex in self.examples))

    def batch(self, row_ids: Sequence[int]) -> dict[str, np.ndarray]:
        """The rows ``row_ids`` as a batch (layout in the module docstring); -1 = an empty row."""
        shape = (len(row_ids), self.seq_len)  # (batch, seq)
        out = {
            "input_ids": np.full(shape, self.pad_id, np.int32),
            "targets": np.full(shape, self.pad_id, np.int32),
            "loss_mask": np.zeros(shape, np.float32),
            "segment_ids": np.zeros(shape, np.int32),
            "positions": np.zeros(shape, np.int32),
        }
        for b, r in enumerate(row_ids):
            if r < 0:
                continue
            t = 0
            for segment, i in enumerate(self.rows[r], start=1):
                ex = self.examples[i]
                n = ex.length
                out["input_ids"][b, t : t + n] = ex.tokens[:-1]
                out["targets"][b, t : t + n] = ex.tokens[1:]
                out["loss_mask"][b, t : t + n] = ex.trained[1:]
                out["segment_ids"][b, t : t + n] = segment
                out["positions"][b, t : t + n] = np.arange(n)
                t += n
        return out


class BatchIterator(Iterator[dict[str, np.ndarray]]):
    """Global batches of ``batch_size`` rows; this process gets its contiguous share.

    Epoch ``e`` visits the rows in ``permutation(seed, e)`` order (or in order without
    ``shuffle``). Process ``p`` of ``P`` yields rows ``[p*B/P, (p+1)*B/P)`` of each global
    batch, so the processes together see exactly the global batch. ``drop_last`` drops the
    incomplete last batch of an epoch; otherwise it is filled with empty rows (all-zero
    ``loss_mask``, segment 0). ``state()``/``restore()`` give the exact position.
    """

    def __init__(
        self,
        dataset: PackedDataset,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        repeat: bool = True,
        process_index: int = 0,
        process_count: int = 1,
    ) -> None:
        if batch_size < 1 or process_count < 1 or not 0 <= process_index < process_count:
            raise DataError(
                f"need batch_size >= 1 and 0 <= process_index < process_count; got "
                f"{batch_size}, {process_index}, {process_count}"
            )
        if batch_size % process_count:
            raise DataError(
                f"batch_size {batch_size} does not split over {process_count} processes"
            )
        n = len(dataset)
        steps = n // batch_size if drop_last else math.ceil(n / batch_size)
        if steps == 0:
            raise DataError(
                f"the data makes {n} rows of {dataset.seq_len} tokens, not one full batch of "
                f"{batch_size}; lower train.batch_size or data.max_seq_len, or add examples"
            )
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.shuffle, self.drop_last, self.repeat = shuffle, drop_last, repeat
        self.process_index, self.process_count = process_index, process_count
        self.steps_per_epoch = steps
        self.epoch, self.index = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            n = len(self.dataset)
            order = (
                np.random.default_rng([self.seed, self.epoch]).permutation(n)
                if self.shuffle
                else np.arange(n)
            )
            self._order = (self.epoch, order)
        return self._order[1]

    def __next__(self) -> dict[str, np.ndarray]:
        if self.index >= self.steps_per_epoch:
            if not self.repeat:
                raise StopIteration
            self.epoch, self.index = self.epoch + 1, 0
        b = self.batch_size
        rows = self._epoch_order()[self.index * b : (self.index + 1) * b]
        rows = np.concatenate([rows, np.full(b - len(rows), -1)])  # empty rows fill a short batch
        share = b // self.process_count
        self.index += 1
        return self.dataset.batch(
            rows[self.process_index * share : (self.process_index + 1) * share]
        )

    def state(self) -> dict[str, int]:
        """The position (next batch = ``index`` of ``epoch``) plus what must match on restore."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "num_rows": len(self.dataset),
            "batch_size": self.batch_size,
        }

    def restore(self, state: dict[str, int]) -> None:
        """Continue from ``state()``; refuses a state taken over different data or batching."""
        if "num_rows" not in state:
            raise DataError(
                "the checkpoint's data position is of a streamed run (data.streaming or "
                "data.sources), this run reads its data whole: resume with the same data keys"
            )
        for key in ("seed", "num_rows", "batch_size"):
            if int(state[key]) != self.state()[key]:
                raise DataError(
                    f"data iterator state has {key}={state[key]}, this run has "
                    f"{self.state()[key]}: the data, seed or batch size changed since the "
                    "checkpoint"
                )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def batches(
    dataset: PackedDataset,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    repeat: bool = True,
    process_index: int = 0,
    process_count: int = 1,
) -> BatchIterator:
    """Iterate over ``dataset`` in global batches of ``batch_size`` rows (see BatchIterator).

    Training: the defaults (shuffled, full batches, epochs repeat forever; the loop stops at
    its step count). Evaluation: ``shuffle=False, drop_last=False, repeat=False``.
    """
    return BatchIterator(
        dataset,
        batch_size,
        seed=seed,
        shuffle=shuffle,
        drop_last=drop_last,
        repeat=repeat,
        process_index=process_index,
        process_count=process_count,
    )
