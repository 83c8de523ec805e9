"""Records in: local JSON / JSON Lines / CSV / parquet files, directories of them, or hub
datasets, all through ``datasets.load_dataset``, each record checked for ``data.format``.

JSON files are first checked line by line (streamed ones too, before the stream opens), so a
bad record is reported as ``path:LINE: what is wrong``; other sources are checked record by
record after loading. A CSV file's columns are read as the text they hold (CSV has no types:
pandas would make ``5`` an int and ``NA`` or ``None`` a missing value).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any

import datasets
from transformers import AutoTokenizer

from jaxlora.config import DataConfig
from jaxlora.data.conversations import CHAT_FORMATS, check_sharegpt
from jaxlora.data.packing import DataError

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_tokenizer(path: str, revision: str | None = None) -> Any:
    """``transformers.AutoTokenizer`` from a local directory or hub id (fast tokenizers only)."""
    tok = AutoTokenizer.from_pretrained(path, revision=revision)
    if not tok.is_fast:
        raise DataError(f"tokenizer at {path} has no fast (Rust) version; jaxlora needs one")
    return tok


def check_record(rec: Any, cfg: DataConfig) -> str | None:
    """What is wrong with one record for ``cfg.format``, or None if nothing."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"

    def need_str(name: str, optional: bool = False) -> str | None:
        if name not in rec or (optional and rec[name] is None):
            return None if optional else f'missing field "{name}"'
        if not isinstance(rec[name], str):
            return f'field "{name}" must be a string, got {type(rec[name]).__name__}'
        return None

    if cfg.format == "alpaca":
        return (
            need_str(cfg.instruction_field)
            or need_str(cfg.input_field, optional=True)
            or need_str(cfg.output_field)
        )
    if cfg.format == "text":
        return need_str(cfg.text_field)
    if cfg.format == "sharegpt":
        return check_sharegpt(rec, cfg)
    name = cfg.messages_field
    msgs = rec.get(name)
    if not isinstance(msgs, list) or not msgs:
        return f'field "{name}" must be a non-empty list of {{"role", "content"}} objects'
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return f'{name}[{j}] must be an object with a string "role"'
        if not isinstance(m.get("content"), str):
            return f'{name}[{j}] must have a string "content"'
    return None


def check_local_files(files: list[Path], cfg: DataConfig) -> None:
    """Check each local JSON / JSON Lines file before ``datasets`` reads it (whose errors name
    neither file nor line)."""
    for f in files:
        if f.suffix in (".json", ".jsonl"):
            _check_json_file(f, cfg)


def _is_json_array(path: Path) -> bool:
    if path.suffix != ".json":
        return False
    with path.open(encoding="utf-8") as f:
        while chunk := f.read(4096):
            if stripped := chunk.lstrip():
                return stripped.startswith("[")
    return False


def _check_json_file(path: Path, cfg: DataConfig) -> None:
    """Validate JSON Lines (or a ``.json`` array) record by record: ``path:LINE: problem``.
    Lines end at ``\n`` alone (``\r\n`` too), not at the U+2028 / U+0085 a JSON string may hold
    raw; a JSON Lines file is read a line at a time."""
    if _is_json_array(path):  # one JSON array of records
        records = _json(path.read_text(encoding="utf-8"), path)
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON array of records")
        for k, rec in enumerate(records):
            if problem := check_record(rec, cfg):
                raise DataError(f"{path}: record {k + 1}: {problem}")
        count = len(records)
    else:
        count = 0
        with path.open(encoding="utf-8", newline="") as f:
            for lineno, line in enumerate(_lines(f), start=1):
                if not line.strip():
                    continue
                rec = _json(line, path, lineno)
                if problem := check_record(rec, cfg):
                    raise DataError(f"{path}:{lineno}: {problem}")
                count += 1
    if count == 0:
        raise DataError(f"{path}: the file holds no records")


def _json(text: str, path: Path, line: int | None = None) -> Any:
    """``json.loads``; a syntax error is ``path:LINE: invalid JSON (...)``, ``LINE`` being
    ``line`` (the line ``text`` is) or the error's own."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"{path}:{line or e.lineno}"
        raise DataError(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from None


def _lines(f: Any) -> Any:
    """A file opened with ``newline=""``, split at ``\n`` only (``\r`` stays, JSON whitespace):
    the file object's own iteration would split at a lone ``\r`` too."""
    rest = ""
    while chunk := f.read(1 << 20):
        *whole, rest = (rest + chunk).split("\n")
        yield from whole
    if rest:
        yield rest


def derived(cfg: DataConfig, **changes: Any) -> DataConfig:
    """``cfg`` with ``changes``, for one part of the run's data (a ``data.sources`` entry, the
    ``data.eval_path`` file): ``data.chat_template`` is kept where that part's format renders
    conversations and dropped elsewhere (whether the run uses it at all is the whole config's
    check, made once)."""
    fmt = changes.get("format", cfg.format)
    template = cfg.chat_template if fmt in CHAT_FORMATS else None
    return dataclasses.replace(cfg, **{"chat_template": template, **changes})


def held_out(cfg: DataConfig) -> DataConfig:
    """The config that reads ``data.eval_path``: a local file or directory in ``data.format``,
    whole (no ``max_examples``), read at once, and none of the training data's hub selection
    (``split``, ``subset``) or mixture."""
    return derived(
        cfg,
        path=cfg.eval_path,
        max_examples=None,
        streaming=False,
        sources=(),
        split="train",
        subset=None,
    )


def load_records(cfg: DataConfig) -> Any:
    """``cfg.path`` -> a ``datasets.Dataset`` of valid records (first ``max_examples`` only)."""
    files, args, kwargs = dataset_args(cfg)
    check_local_files(files, cfg)
    try:
        ds = datasets.load_dataset(*args, split=cfg.split, **kwargs)
    except (ValueError, OSError) as e:  # bad split, missing dataset, no network
        raise DataError(f"cannot load {cfg.path} (split {cfg.split!r}): {e}") from e
    if cfg.max_examples is not None:
        ds = ds.select(range(min(cfg.max_examples, len(ds))))
    if len(ds) == 0:
        raise DataError(f"{cfg.path}: the dataset has no examples")
    for k, rec in enumerate(ds):  # CSV, parquet and hub data get the same record checks
        if problem := check_record(rec, cfg):
            raise DataError(f"{cfg.path}: record {k + 1}: {problem}")
    return ds


def dataset_args(cfg: DataConfig) -> tuple[list[Path], tuple, dict[str, Any]]:
    """``cfg.path`` as ``datasets.load_dataset(*args, **kwargs)`` takes it, and its local files
    (none for a hub id): a file, a directory of files, or a hub dataset id with ``cfg.subset``."""
    path = Path(cfg.path).expanduser()
    if path.is_file():
        if path.suffix not in _BUILDERS:
            raise DataError(f"{path}: unsupported file type; use one of {', '.join(_BUILDERS)}")
        files = [path]
        args: tuple = (_BUILDERS[path.suffix],)
        kwargs: dict[str, Any] = {"data_files": str(path)}
        if path.suffix == ".csv":
            kwargs |= _csv_as_text(path)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS)
        if not files:
            raise DataError(f"{path}: no {'/'.join(_BUILDERS)} files in this directory")
        args, kwargs = (str(path), cfg.subset), {}  # a subset: a config in its README.md
    elif cfg.path.startswith((".", "/", "~")) or cfg.path.endswith(tuple(_BUILDERS)):
        raise DataError(f"data.path {cfg.path} does not exist")
    else:  # a hub dataset id
        files, args, kwargs = [], (cfg.path, cfg.subset), {}
    return files, args, kwargs


def _csv_as_text(path: Path) -> dict[str, Any]:
    """``load_dataset("csv")`` arguments that read every column as the text it holds (an empty
    cell as ``""``): pandas' inference would make an all-digit answer column ``int64`` and an
    answer ``NA``, ``null`` or ``None`` a missing value."""
    with path.open(encoding="utf-8", newline="") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise DataError(f"{path}: the file holds no records (not even a header line)")
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return {"features": features, "keep_default_na": False}
