"""Examples drawn as they are needed: a streamed dataset or a weighted mixture of sources,
tokenized and packed on the fly, at a position a checkpoint holds exactly.

A *source* is one dataset (``data.path``, or one entry of ``data.sources``) read as records,
epoch after epoch:

* ``data.streaming=true``: ``datasets.load_dataset(path, subset, split=..., streaming=True)``,
  an ``IterableDataset``: nothing is downloaded before the first record is read. It is shuffled
  by ``datasets``' buffer shuffle (``data.shuffle_buffer`` records, the data seed); epoch ``e``
  reshuffles (``set_epoch(e)``).
* otherwise (a mixture of local files): the source is loaded whole and each epoch is a full
  permutation by ``(seed, source, epoch)``.

``data.shuffle_buffer=0`` reads every source in order. The first ``data.val_size`` records of
each source (a count) are the validation set and never trained on; ``data.max_examples`` keeps
the first N records of a source (its held-out ones included).

**Epochs.** A stream has no length, so a run is ``train.max_steps`` long; a source that runs
out begins its next epoch, reshuffled, each source on its own count (logged).

**Mixture.** Each example comes from source ``i`` with probability ``w_i / sum(w)``, drawn by
:class:`MixtureSampler` from the seed. The expected share of tokens (row positions) per
source is logged at the start (from the first records' lengths); the realized counts are in
each checkpoint's data state.

**Packing** is greedy in arrival order: an example joins the open row when it fits; otherwise
the row is closed (padded) and the example opens the next one, the *carry-over*. Without
``data.packing`` each example is its own row. A batch is ``batch_size`` consecutive rows.

**Position.** Between batches the state is the sampler's draw count, each source's epoch and
records read, and the carry-over itself (its tokens). :meth:`StreamIterator.restore` reopens each
source at its epoch and skips the records read, so a resumed run gets exactly the batches of an
uninterrupted one. ``datasets``' own ``state_dict`` is not used: it does not keep the shuffle
buffer's contents, so a resume from it would see other examples. Skipping re-reads the current
epoch up to the position (for a hub stream, downloads it again).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import datasets
import numpy as np

from jaxlora.config import DataConfig, SourceConfig
from jaxlora.data.packing import DataError, Example, PackedDataset
from jaxlora.data.records import check_record, dataset_args, derived, held_out, load_records
from jaxlora.data.tokenize import check_tokenizer, tokenize, tokenize_record

log = logging.getLogger(__name__)

BLOCK = 1024  # sampler draws made at a time
PEEK = 32  # records per source whose lengths estimate the mixture's token shares
_MIX = 0x6D6978  # tags the sampler's random stream apart from the sources' permutations
# the data.* keys a source may set for itself (every SourceConfig key but path and weight)
_OWN_KEYS = tuple(
    f.name for f in dataclasses.fields(SourceConfig) if f.name not in ("path", "weight")
)


class MixtureSampler(Iterator[int]):
    """Source indices, i.i.d. with probabilities ``weights / sum(weights)``, from ``seed``.

    Draw ``k`` depends only on ``(seed, k)``: the uniforms come in blocks of :data:`BLOCK` from
    ``default_rng([seed, _MIX, k // BLOCK])``, so the whole state is the number of draws.
    """

    def __init__(self, weights: Sequence[float], seed: int, draws: int = 0) -> None:
        w = np.asarray(weights, np.float64)
        if w.ndim != 1 or not len(w) or not np.all(np.isfinite(w) & (w > 0)):
            raise DataError(f"mixture weights must be finite and > 0; got {list(weights)}")
        self.cdf = np.cumsum(w / w.sum())
        self.seed, self.draws = seed, draws
        self._block: tuple[int, np.ndarray] = (-1, np.empty(0))

    def __next__(self) -> int:
        block, k = divmod(self.draws, BLOCK)
        if self._block[0] != block:
            rng = np.random.default_rng([self.seed, _MIX, block])
            self._block = (block, rng.random(BLOCK))
        self.draws += 1
        # the first i with u < cdf[i]; min() guards a cdf[-1] rounded below 1
        i = int(np.searchsorted(self.cdf, self._block[1][k], side="right"))
        return min(i, len(self.cdf) - 1)


def source_configs(cfg: DataConfig) -> list[tuple[DataConfig, float]]:
    """``(config, weight)`` per source: ``data.path`` alone (weight 1), or each ``data.sources``
    entry as a :class:`DataConfig` whose unset keys are the ``data.`` ones."""
    if not cfg.sources:
        return [(cfg, 1.0)]
    out = []
    for src in cfg.sources:
        own = {k: getattr(src, k) for k in _OWN_KEYS if getattr(src, k) is not None}
        out.append((derived(cfg, path=src.path, sources=(), **own), src.weight))
    return out


class Source:
    """One dataset's training records, epoch by epoch, turned into examples as they are read.

    ``epoch`` and ``read`` (records of this epoch read so far) are its position; ``examples``,
    ``tokens`` (positions filled), ``truncated`` and ``dropped`` (no trained token left) count
    what it has given over the run.
    """

    def __init__(self, cfg: DataConfig, index: int, seed: int, holdout: int, tokenizer: Any):
        check_tokenizer(tokenizer, cfg)
        self.cfg, self.index, self.seed, self.tokenizer = cfg, index, seed, tokenizer
        self.records, self.held_out = _open(cfg, holdout, seed + index)
        self.epoch = self.read = self.examples = self.tokens = self.truncated = self.dropped = 0
        self._it: Iterator[dict] | None = None
        self._whole_epoch_kept: int | None = None  # examples of an epoch read from its start

    def _epoch_records(self, epoch: int, start: int) -> Iterator[dict]:
        if isinstance(self.records, datasets.IterableDataset):
            self.records.set_epoch(epoch)  # the buffer shuffle's seed becomes seed + epoch
            return itertools.islice(iter(self.records), start, None)
        n = len(self.records)
        order = (
            np.random.default_rng([self.seed, self.index, epoch]).permutation(n)
            if self.cfg.shuffle_buffer
            else np.arange(n)
        )
        return (self.records[int(i)] for i in order[start:])

    def _example(self, rec: Any, where: str) -> tuple[Example | None, bool]:
        if problem := check_record(rec, self.cfg):
            raise DataError(f"{self.cfg.path}: {where}: {problem}")
        return tokenize_record(rec, self.tokenizer, self.cfg)

    def __next__(self) -> Example:
        """The next example; a record left without a trained token is skipped (and counted)."""
        while True:
            if self._it is None:
                self._it = self._epoch_records(self.epoch, self.read)
                self._whole_epoch_kept = 0 if self.read == 0 else None
            where = f"record {self.read + 1} of epoch {self.epoch} (in its shuffled order)"
            with _reading(self.cfg.path, where):
                rec = next(self._it, None)
            if rec is None:
                self._end_epoch()
                continue
            self.read += 1
            ex, truncated = self._example(rec, where)
            if truncated and not self.truncated:
                log.warning(
                    "data: %s has examples longer than data.max_seq_len=%d: they are cut "
                    "(counted per source in the data state)",
                    self.cfg.path,
                    self.cfg.max_seq_len,
                )
            self.truncated += truncated
            if ex is None:
                self.dropped += 1
                continue
            self.examples, self.tokens = self.examples + 1, self.tokens + ex.length
            if self._whole_epoch_kept is not None:
                self._whole_epoch_kept += 1
            return ex

    def _end_epoch(self) -> None:
        """Start the next epoch; refuse a source whose whole epoch gave no example (it would
        be read forever)."""
        if self._whole_epoch_kept == 0 and self.read == 0:
            raise DataError(
                f"{self.cfg.path}: no records to train on (split {self.cfg.split!r}, after the "
                f"{len(self.held_out)} held out by data.val_size)"
            )
        if self._whole_epoch_kept == 0:
            raise DataError(
                f"{self.cfg.path}: none of its {self.read} training records has a token to "
                f"train on after truncation to data.max_seq_len={self.cfg.max_seq_len}; raise "
                "data.max_seq_len, set data.train_on_inputs, or add records"
            )
        self.epoch, self.read, self._it = self.epoch + 1, 0, None
        log.info("data: %s begins epoch %d", self.cfg.path, self.epoch)

    def peek_lengths(self, n: int) -> list[int]:
        """Positions filled by the examples of the first ``n`` records (epoch 0), for the log."""
        with _reading(self.cfg.path, f"its first {n} records"):
            records = list(itertools.islice(self._epoch_records(0, 0), n))
        examples = [self._example(rec, f"record {k + 1}")[0] for k, rec in enumerate(records)]
        self._it = None  # a stream's epoch was reset: reopen before the next record
        return [ex.length for ex in examples if ex is not None]

    def validation(self) -> list[Example]:
        """The held-out first records, as examples."""
        if not self.held_out:
            return []
        for k, rec in enumerate(self.held_out):
            if problem := check_record(rec, self.cfg):
                raise DataError(f"{self.cfg.path}: held-out record {k + 1}: {problem}")
        return tokenize(self.held_out, self.tokenizer, self.cfg)[0]

    def state(self) -> dict[str, Any]:
        return {
            "path": self.cfg.path,
            "epoch": self.epoch,
            "read": self.read,
            "examples": self.examples,
            "tokens": self.tokens,
            "truncated": self.truncated,
            "dropped": self.dropped,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.epoch, self.read = int(state["epoch"]), int(state["read"])
        self.examples, self.tokens = int(state["examples"]), int(state["tokens"])
        self.truncated, self.dropped = int(state["truncated"]), int(state["dropped"])
        self._it = None


@contextlib.contextmanager
def _reading(path: str, what: str) -> Iterator[None]:
    """Name the source and the position when reading a stream fails: pyarrow's parse errors
    ("JSON parse error ... in row 12", of the block being parsed) name neither."""
    try:
        yield
    except DataError:
        raise
    except (ValueError, OSError) as e:
        raise DataError(
            f"{path}: reading {what} failed (the bad record may be further on, in the block "
            f"being parsed): {type(e).__name__}: {e}. A stream reads as training asks; with "
            "data.streaming=false a local JSON Lines file is checked line by line first"
        ) from e


def _open(cfg: DataConfig, holdout: int, seed: int) -> tuple[Any, list[dict]]:
    """``(training records, held-out records)``: the first ``holdout`` records are held out."""
    if not cfg.streaming:  # a mixture of local files: loaded and checked whole
        ds = load_records(cfg)
        if holdout >= len(ds):
            raise DataError(
                f"data.val_size={holdout} holds out every one of the {len(ds)} records of "
                f"{cfg.path}, leaving none to train on"
            )
        return ds.select(range(holdout, len(ds))), list(ds.select(range(holdout)))
    _, args, kwargs = dataset_args(cfg)
    try:
        ds = datasets.load_dataset(*args, split=cfg.split, streaming=True, **kwargs)
    except (ValueError, OSError) as e:  # bad split, missing dataset, no network
        raise DataError(f"cannot stream {cfg.path} (split {cfg.split!r}): {e}") from e
    if cfg.max_examples is not None:
        ds = ds.take(cfg.max_examples)
    with _reading(cfg.path, f"the {holdout} held-out records"):
        held_out = list(ds.take(holdout)) if holdout else []
    if holdout:  # skip() pins the shard order, so the held-out records stay the first ones
        ds = ds.skip(holdout)
    if cfg.shuffle_buffer:
        ds = ds.shuffle(seed=seed, buffer_size=cfg.shuffle_buffer)
    return ds, held_out


class ExampleStream:
    """The opened sources of a streamed run, and how their examples become rows."""

    def __init__(
        self, sources: list[Source], weights: list[float], cfg: DataConfig, pad_id: int, seed: int
    ):
        self.sources, self.weights, self.seed = sources, weights, seed
        self.seq_len, self.packing, self.pad_id = cfg.max_seq_len, cfg.packing, pad_id

    def log_plan(self, rows: int) -> None:
        """The mixture a run of ``rows`` rows should realize: per source, its share of examples
        and, from its first :data:`PEEK` records' lengths, of row positions (tokens read)."""
        p = np.asarray(self.weights) / sum(self.weights)
        mean = np.asarray([np.mean(s.peek_lengths(PEEK) or [0]) for s in self.sources])
        per_row = self.seq_len / max(float(p @ mean), 1.0) if self.packing else 1.0
        for s, pi, mi in zip(self.sources, p, mean, strict=True):
            log.info(
                "data: source %s: %.1f%% of examples, ~%.0f positions each (first %d records), "
                "%.1f%% of positions, ~%s over the run's %d rows",
                s.cfg.path,
                100 * pi,
                mi,
                PEEK,
                100 * pi * mi / max(float(p @ mean), 1e-9),
                f"{rows * per_row * pi * mi:,.0f}",
                rows,
            )

    def batches(
        self, batch_size: int, *, process_index: int = 0, process_count: int = 1
    ) -> StreamIterator:
        return StreamIterator(self, batch_size, process_index, process_count)


class StreamIterator(Iterator[dict[str, np.ndarray]]):
    """Global batches of ``batch_size`` rows from an :class:`ExampleStream` (layout as
    :class:`~jaxlora.data.packing.PackedDataset.batch`); this process gets its contiguous share.
    Every process reads the whole stream, so all agree on each global batch."""

    def __init__(
        self, stream: ExampleStream, batch_size: int, process_index: int, process_count: int
    ):
        if batch_size < 1 or batch_size % process_count or not 0 <= process_index < process_count:
            raise DataError(
                f"batch_size {batch_size} does not split over {process_count} processes "
                f"(process {process_index})"
            )
        self.stream, self.batch_size = stream, batch_size
        self.process_index, self.process_count = process_index, process_count
        self.sampler = MixtureSampler(stream.weights, stream.seed)
        self.carry: list[Example] = []  # the open row

    def _row(self) -> list[Example]:
        """The next row: examples join it until one does not fit, which opens the next row."""
        row, self.carry, filled = self.carry, [], sum(ex.length for ex in self.carry)
        while True:
            ex = next(self.stream.sources[next(self.sampler)])
            if not self.stream.packing:
                return [ex]
            if filled + ex.length > self.stream.seq_len:
                self.carry = [ex]
                return row
            row.append(ex)
            filled += ex.length

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [self._row() for _ in range(self.batch_size)]
        examples = [ex for row in rows for ex in row]
        bounds = np.cumsum([0] + [len(row) for row in rows])
        index = [list(range(a, b)) for a, b in itertools.pairwise(bounds)]
        packed = PackedDataset(examples, index, self.stream.seq_len, self.stream.pad_id)
        share = self.batch_size // self.process_count
        return packed.batch(range(self.process_index * share, (self.process_index + 1) * share))

    def state(self) -> dict[str, Any]:
        """The exact position: draws, each source's epoch and records read, the carry-over."""
        return {
            "seed": self.stream.seed,
            "batch_size": self.batch_size,
            "draws": self.sampler.draws,
            "sources": [s.state() for s in self.stream.sources],
            "carry": [[ex.tokens.tolist(), ex.trained.astype(int).tolist()] for ex in self.carry],
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from ``state()``; refuses a state taken over other sources, seed or batch."""
        if "sources" not in state:
            raise DataError(
                "the checkpoint's data position is of a run that read its data whole, this run "
                "streams it (data.streaming / data.sources changed since the checkpoint)"
            )
        paths = [s["path"] for s in state["sources"]]
        ours = [s.cfg.path for s in self.stream.sources]
        for key, saved, now in (
            ("sources", paths, ours),
            ("seed", state["seed"], self.stream.seed),
            ("batch_size", state["batch_size"], self.batch_size),
        ):
            if saved != now:
                raise DataError(
                    f"data stream state has {key}={saved}, this run has {now}: the data, seed "
                    "or batch size changed since the checkpoint"
                )
        self.sampler = MixtureSampler(self.stream.weights, self.stream.seed, int(state["draws"]))
        for source, saved in zip(self.stream.sources, state["sources"], strict=True):
            source.restore(saved)
        self.carry = [
            Example(np.asarray(tokens, np.int32), np.asarray(trained, bool))
            for tokens, trained in state["carry"]
        ]

    def counts(self) -> dict[str, dict[str, int]]:
        """Per source: examples, positions, truncated and dropped records so far (the realized
        mixture)."""
        keys = ("examples", "tokens", "truncated", "dropped")
        return {s.cfg.path: {k: getattr(s, k) for k in keys} for s in self.stream.sources}


def build_stream(
    cfg: DataConfig, tokenizer: Any, seed: int
) -> tuple[ExampleStream, PackedDataset | None]:
    """``(train, val)`` for a streamed dataset or a mixture (``cfg.is_stream``): the sources
    opened (nothing read but the held-out records), and the validation rows: the first
    ``val_size`` records of each source, or ``cfg.eval_path``."""
    holdout = int(cfg.val_size)  # a count: config refuses a fraction for streams
    sources = [
        Source(c, i, seed, holdout, tokenizer) for i, (c, _) in enumerate(source_configs(cfg))
    ]
    weights = [w for _, w in source_configs(cfg)]
    if cfg.eval_path is None:
        val = [ex for s in sources for ex in s.validation()]
    else:
        held = held_out(cfg)
        val = tokenize(load_records(held), tokenizer, held)[0]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    val_ds = PackedDataset.build(val, cfg.max_seq_len, cfg.packing, pad) if val else None
    log.info(
        "data: %s %d source(s) (%s), %d validation examples",
        "streaming" if cfg.streaming else "mixing",
        len(sources),
        ", ".join(f"{s.cfg.path} weight {w:g}" for s, w in zip(sources, weights, strict=True)),
        len(val),
    )
    return ExampleStream(sources, weights, cfg, pad, seed), val_ds
